"""The library as a notebook user calls it: plain keyword arguments, one wording for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factory import save_single

import ckptdiff
from ckptdiff.analyses.base import to_json_dict
from ckptdiff.errors import InputError
from ckptdiff.metrics.mask import CompareMode


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    w0 = torch.tensor([[1.0, 2.0, 4.0, 8.0]] * 4)
    w1 = w0.clone()
    w1[0, 0] = 1.0005  # relative change 5e-4: under rtol 1e-3, over rtol 1e-4; below bf16 resolution at 1 (2**-7)
    w1[1, 1] = 2.1  # relative change ~5e-2: over both
    w1[2, 2] = 4.0 + 2**-20  # below bf16's resolution at 4: equal once both sides are rounded to bf16
    base = save_single({"m.w": w0}, tmp_path / "b.safetensors")
    ft = save_single({"m.w": w1}, tmp_path / "f.safetensors")
    return str(base), str(ft)


@pytest.mark.parametrize(
    ("kwargs", "changed"),
    [
        ({}, 3),
        ({"rtol": 1e-3}, 1),
        ({"rtol": 1e-4}, 2),
        ({"atol": 0.01}, 1),
        ({"as_dtype": "bf16"}, 1),  # 1.0005 and 4 + 2**-20 both round back to the base value in bf16
        ({"as_dtype": torch.bfloat16}, 1),
        ({"mode": CompareMode("rtol", 1e-3)}, 1),
    ],
)
def test_sparsity_takes_plain_keywords(pair: tuple[str, str], kwargs: dict[str, object], changed: int) -> None:
    result = ckptdiff.sparsity(*pair, progress=False, **kwargs)  # type: ignore[arg-type]
    assert int(result.overall()["changed"]) == changed


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b, f: ckptdiff.sparsity(b, f, rtol=1e-3, atol=1e-3), "rtol and atol are alternatives"),
        (lambda b, f: ckptdiff.sparsity(b, f, rtol=-1.0), "rtol must be a finite non-negative number"),
        (lambda b, f: ckptdiff.sparsity(b, f, as_dtype="fp8"), "as_dtype must be one of bf16, fp16, fp32"),
        (lambda b, f: ckptdiff.sparsity(b, f, mode=CompareMode(), rtol=1e-3), "pass either mode= or rtol="),
        (lambda b, f: ckptdiff.principal_overlap(b, f, svd="fast"), "svd must be one of exact, randomized, auto"),
        (lambda b, f: ckptdiff.principal_overlap(b, f, precision="bf16"), "precision must be one of fp32, fp64"),
        (lambda b, f: ckptdiff.spectral(b, f, precision="fp16"), "precision must be one of fp32, fp64"),
        (lambda b, f: ckptdiff.spectral(b, f, k=0), "k must be a positive integer"),
        (lambda b, f: ckptdiff.principal_overlap(b, f, k=0), "k must be a positive integer"),
        (lambda b, f: ckptdiff.principal_overlap(b, f, alpha=1.5), "alpha must lie strictly between 0 and 1"),
        (lambda b, f: ckptdiff.spectral(b, f, null="gauss"), "null must be one of none, random"),
    ],
)
def test_bad_values_get_one_wording_from_every_function(pair: tuple[str, str], call, message: str) -> None:  # type: ignore[no-untyped-def]
    """A library call is told about its keyword argument, not a CLI flag it never typed (issue 23 item 13)."""
    with pytest.raises(InputError) as caught:
        call(*pair)
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_cli_still_names_its_flags(pair: tuple[str, str]) -> None:
    from typer.testing import CliRunner

    from ckptdiff.cli import app

    res = CliRunner().invoke(app, ["principal-overlap", *pair, "--alpha", "2"])
    assert res.exit_code == 2 and "ckptdiff: error: --alpha must lie strictly between 0 and 1" in res.stderr


def test_input_error_at_the_top_level() -> None:
    from ckptdiff.errors import CkptdiffError

    assert ckptdiff.InputError is InputError and issubclass(ckptdiff.InputError, CkptdiffError)
    assert "InputError" in dir(ckptdiff)


def test_by_names_the_keys_it_knows(pair: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    result = ckptdiff.sparsity(*pair, progress=False)
    with pytest.raises(InputError, match=r"by\('nonsense'\): no such rollup; choose from 'layer', 'module', 'expert'"):
        result.by("nonsense")
    with pytest.raises(InputError, match="choose from 'module', 'layer'"):
        ckptdiff.principal_overlap(*pair, k=2, progress=False).by("expert")
    with caplog.at_level("WARNING", logger="ckptdiff"):
        assert result.by("expert").empty  # a dense model: said, not silent
    assert "no tensor belongs to an expert" in caplog.text


def test_the_api_a_notebook_sees(pair: tuple[str, str]) -> None:
    assert {"sparsity", "principal_overlap", "spectral", "consistency", "full_report", "check"} <= set(dir(ckptdiff))
    results = [
        ckptdiff.sparsity(*pair, progress=False),
        ckptdiff.principal_overlap(*pair, k=2, progress=False),
        ckptdiff.spectral(*pair, k=2, progress=False),
        ckptdiff.consistency(pair[0], [pair[1], pair[1]], progress=False),
    ]
    for r in results:
        assert isinstance(r.overall(), dict) and all(isinstance(k, str) for k in r.overall())
        text = repr(r)
        assert "\n" not in text and len(text) < 300 and text.startswith("<")
    counts = results[0].overall()
    assert (counts["changed"], counts["numel"], counts["tensors"]) == (3, 16, 1)
    assert all(type(counts[k]) is int for k in ("changed", "numel", "tensors", "ulp_1"))
    gate = ckptdiff.check(*pair, rules=["changed == 3", "sparsity >= 0.9"], progress=False)
    assert [r.passed for r in gate.outcome.results] == [True, False]  # 3 of 16 changed: sparsity 0.8125
    assert repr(gate).startswith("<GateResult: FAIL, 1/2 rules pass")
    with pytest.raises(InputError, match="cannot parse rule"):
        ckptdiff.check(*pair, rules=["sparsity is high"], progress=False)


def test_as_fp16_never_hides_a_change_that_overflows(tmp_path: Path) -> None:
    # 70000 and 80000 are both beyond fp16's largest finite value (65504): rounded, both are +inf.
    w0 = torch.tensor([[70000.0, 1.0], [90000.0, 2.0]])
    w1 = torch.tensor([[80000.0, 1.0], [90000.0, 2.0]])
    b = save_single({"m.w": w0}, tmp_path / "b.safetensors")
    f = save_single({"m.w": w1}, tmp_path / "f.safetensors")
    row = ckptdiff.sparsity(str(b), str(f), as_dtype="fp16", progress=False).to_frame().iloc[0]
    assert (row["changed"], row["overflow_as"], row["changed_nonfinite"]) == (1, 2, 1)  # 90000 == 90000: unchanged
    gate = ckptdiff.check(str(b), str(f), rules=["changed == 0"], mode=CompareMode(as_dtype=torch.float16))
    assert not gate.passed
    p = ckptdiff.principal_overlap(str(b), str(f), k=1, as_dtype="fp16", progress=False).to_frame().iloc[0]
    assert p["changed"] == 1


def test_an_all_zero_base_matrix_has_no_principal_verdict(tmp_path: Path) -> None:
    w0 = torch.zeros(8, 8)
    w1 = w0.clone()
    w1[0, :4] = 1.0
    b = save_single({"m.w": w0}, tmp_path / "b.safetensors")
    f = save_single({"m.w": w1}, tmp_path / "f.safetensors")
    r = ckptdiff.principal_overlap(str(b), str(f), k=2, progress=False)
    row = r.to_frame().iloc[0]
    assert not row["analysed"] and row["outcome"] == "not_analysed" and "all zeros" in row["detail"]
    assert not any("targets the principal" in s or "avoids the principal" in s for s in r.report().summary)


def test_rollups_are_computed_once_and_handed_out_as_copies(
    pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One report run asks for the same rollup several times: it is made once, and what a caller does to the
    copy it got never reaches the next caller."""
    result = ckptdiff.principal_overlap(*pair, k=2, progress=False)
    made: list[str] = []
    analysed = type(result).analysed
    monkeypatch.setattr(type(result), "analysed", lambda self: (made.append("rows"), analysed(self))[1])
    first = result.by("module")
    expected = first.copy()
    first.iloc[:, :] = -1
    assert result.by("module").equals(expected) and result.by(key="module").equals(expected)
    assert len(made) == 1  # made once, for positional and keyword calls alike
    result.by("layer")
    assert len(made) == 2  # another key is another rollup
    full = ckptdiff.full_report(pair[0], [pair[1]], k=2, progress=False)
    (_, a), *_ = full.sections()
    (_, b), *_ = full.sections()
    assert a is b  # one report object per section, shared by the terminal, HTML, Markdown and JSON writers
    (run,) = full.runs
    assert full.to_dict()["sparsity"][run] == to_json_dict(a)
