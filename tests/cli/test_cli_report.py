"""`ckptdiff report`: one pass, the single commands' numbers, a directory written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import CountingSource, bump_ulps, llama_like, save_single
from typer.testing import CliRunner

from ckptdiff import gate as R
from ckptdiff.analyses.consistency import consistency
from ckptdiff.analyses.full import full_report, split_columns
from ckptdiff.analyses.principal import principal_overlap
from ckptdiff.analyses.sparsity import sparsity
from ckptdiff.analyses.spectral import spectral
from ckptdiff.cli import app
from ckptdiff.gate.check import Shared, check
from ckptdiff.io.resolve import open_stored

runner = CliRunner()
UP0 = "model.layers.0.mlp.up_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def trio(tmp_path: Path) -> tuple[str, str, str]:
    base = llama_like(layers=2, d=16, ff=32, seed=3)
    ft1 = {k: v.clone() for k, v in base.items()}
    ft2 = {k: v.clone() for k, v in base.items()}
    ft1[UP0] = bump_ulps(base[UP0], torch.arange(0, 200, 2))
    ft2[UP0] = bump_ulps(base[UP0], torch.arange(0, 100))
    ft2[Q1] = bump_ulps(base[Q1], torch.arange(5), 4)
    paths = [save_single(sd, tmp_path / f"{n}.safetensors") for n, sd in (("base", base), ("a", ft1), ("b", ft2))]
    return str(paths[0]), str(paths[1]), str(paths[2])


def test_tensors_table_holds_the_single_commands_values(trio: tuple[str, str, str]) -> None:
    base, a, b = trio
    rep = full_report(base, [a, b], k=4, svd="exact", null="random", progress=False)
    assert rep.analyses == ("sparsity", "principal", "spectral", "consistency")
    table = rep.tensors()
    assert list(table["run"].unique()) == ["a", "b"]
    for run, ft in (("a", a), ("b", b)):
        rows = table[table["run"] == run].reset_index(drop=True)
        singles = {
            "sparsity": sparsity(base, ft, progress=False).to_frame(),
            "principal": principal_overlap(base, ft, k=4, svd="exact", progress=False).to_frame(),
            "spectral": spectral(base, ft, k=4, null="random", progress=False).to_frame(),
        }
        for name, single in singles.items():
            got = split_columns(rows, name, list(single.columns))
            pd.testing.assert_frame_equal(got, single, check_dtype=False, obj=f"{name} {run}")
    cons = consistency(base, [a, b], progress=False).to_frame()
    assert rep.consistency is not None
    pd.testing.assert_frame_equal(rep.consistency.to_frame(), cons)
    # Known by construction: 100 entries of UP0 changed in a, 105 entries in b.
    assert int(rep.sparsity["a"].overall()["changed"]) == 100
    assert int(rep.sparsity["b"].overall()["changed"]) == 105


def test_one_fine_tune_has_no_run_column_and_no_consistency(trio: tuple[str, str, str]) -> None:
    base, a, _ = trio
    rep = full_report(base, [a], k=4, analyses=["sparsity", "spectral"], progress=False)
    assert rep.analyses == ("sparsity", "spectral") and rep.consistency is None
    assert "run" not in rep.tensors().columns
    assert rep.header["analysis"] == "report" and rep.header["ft"].endswith("a.safetensors")


def test_analyses_take_the_command_names_too(trio: tuple[str, str, str]) -> None:
    """`report -a principal-overlap` is the principal analysis, as the command is named (issue 23 item 10)."""
    base, a, _ = trio
    rep = full_report(base, [a], k=4, analyses=["principal-overlap", "Sparsity"], progress=False)
    assert rep.analyses == ("sparsity", "principal")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--analyses", "sparsity,bogus"],
            "unknown analysis 'bogus'; choose from sparsity, principal (principal-overlap)",
        ),
        (["--analyses", "consistency"], "needs at least 2 fine-tuned"),
        (["--k", "0"], "--k must be"),
        (["--label", "x", "--label", "y"], "--label"),
    ],
)
def test_bad_options_exit_2_before_reading(
    trio: tuple[str, str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    base, a, _ = trio
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", base, a, "-o", str(out), "-q", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_a_directory_holding_other_files_is_refused_untouched(trio: tuple[str, str, str], tmp_path: Path) -> None:
    base, a, _ = trio
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["report", base, a, "-o", str(out), "-q"])
    assert res.exit_code == 2 and "not a report ckptdiff wrote" in res.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    res = runner.invoke(app, ["report", base, a, "-o", str(tmp_path / "no" / "such"), "-q"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_report_directory_is_written_whole_and_replaces_an_earlier_one(
    trio: tuple[str, str, str], tmp_path: Path
) -> None:
    base, a, b = trio
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", base, a, b, "-o", str(out), "-q", "--k", "4", "--svd", "exact"])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert names == {"index.html", "report.md", "tensors.csv", "report.json", "figures", ".ckptdiff-report"}
    doc = json.loads((out / "report.json").read_text())
    assert doc["analyses"] == ["sparsity", "principal", "spectral", "consistency"] and doc["runs"] == ["a", "b"]
    # What happened comes first, in the terminal and in the JSON: a changed 100 entries, b 105 (by construction).
    numel = sum(i.numel for i in open_stored(base).infos.values())
    first = f"a left {1 - 100 / numel:.1%} of entries"
    assert res.output.startswith(first) and f"b {1 - 105 / numel:.1%}" in res.output.splitlines()[0]
    assert doc["verdict"][0].startswith(first)
    assert res.output.index("Side by side") < res.output.index("Sparsity: a:")
    values = {r["figure"]: r for r in doc["comparison"]["values"]}
    assert values["update sparsity"]["a"] == pytest.approx(1 - 100 / numel)
    assert values["Jaccard with b (magnitude-matched)"]["a"] == pytest.approx(
        50 / 155
    )  # |A∩B| = 50, |A∪B| = 100 + 105 - 50
    csv = pd.read_csv(out / "tensors.csv")
    assert len(csv) == 2 * len(open_stored(base).infos)
    md = (out / "report.md").read_text()
    for link in (line for line in md.splitlines() if line.startswith("![")):
        assert (out / link.split("](", 1)[1].rstrip(")")).is_file(), link
    # Run again into the same directory: replaced whole, nothing left over, no temporary directory behind.
    res = runner.invoke(app, ["report", base, a, "-o", str(out), "-q", "--k", "4", "--analyses", "sparsity"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["analyses"] == ["sparsity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_check_reads_the_pair_once_for_any_mix_of_rules(trio: tuple[str, str, str]) -> None:
    base, a, _ = trio
    sources = [CountingSource(open_stored(base)), CountingSource(open_stored(a))]
    rules = ("sparsity >= 0.1", "ratio_principal_magnitude <= 2", "nss < 1", "nss_null_ratio < 100")
    cfg = R.CheckConfig(rules=tuple(R.parse_rule(r) for r in rules))
    rep = check(*sources, cfg, shared=Shared(device="cpu", progress=False, k=4))
    assert rep.analyses == ("sparsity", "principal", "spectral")
    for src in sources:
        assert sum(src.bytes.values()) == src.total_bytes  # every byte once: 1.00x the pair


def test_an_unwritable_place_is_found_before_the_work(
    trio: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from ckptdiff.render import report_dir

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(report_dir.tempfile, "mkdtemp", read_only)
    base, a, _ = trio
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", base, a, "-o", str(out), "-q"])
    assert res.exit_code == 2 and "the file system is read-only" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_only_the_writing_rank_writes_the_directory(
    trio: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptdiff.render import report_dir

    base, a, _ = trio
    rep = full_report(base, [a], k=4, analyses=["sparsity"], progress=False)
    monkeypatch.setattr(report_dir, "writes_files", lambda: False)  # as on rank 1 of a torchrun
    assert report_dir.write_directory(rep, tmp_path / "rep") == []
    assert not (tmp_path / "rep").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_replacement_puts_the_earlier_report_back(
    trio: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new report cannot be moved into place (here: a failing rename): the earlier one is back where it was,
    with nothing hidden left beside it."""
    import errno

    from ckptdiff.render import report_dir

    base, a, _ = trio
    out = tmp_path / "rep"
    earlier = full_report(base, [a], k=4, analyses=["sparsity"], progress=False)
    report_dir.write_directory(earlier, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = report_dir.os.rename

    def rename(src: object, dst: object) -> None:
        if Path(str(dst)) == out and ".tmp" in Path(str(src)).name:  # the new report's move into place
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(report_dir.os, "rename", rename)
    res = runner.invoke(app, ["report", base, a, "-o", str(out), "-q", "--k", "4", "--analyses", "sparsity"])
    assert res.exit_code == 2 and "Input/output error" in res.output and "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_signal_during_the_replacement_waits_until_the_new_report_is_in_place(
    trio: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM between moving the earlier report aside and moving the new one in: both moves finish first, then
    the run stops saying the output was written; no hidden folder is left."""
    import os
    import signal

    from ckptdiff.render import report_dir

    base, a, _ = trio
    out = tmp_path / "rep"
    report_dir.write_directory(full_report(base, [a], k=4, analyses=["sparsity"], progress=False), out)
    real = report_dir.os.rename

    def rename(src: object, dst: object) -> None:
        real(src, dst)  # type: ignore[arg-type]
        if Path(str(src)) == out:  # the earlier report just moved aside
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(report_dir.os, "rename", rename)
    args = ["report", base, a, "-o", str(out), "-q", "--k", "4", "--analyses", "sparsity,spectral"]
    res = runner.invoke(app, args)
    assert res.exit_code == 143 and "after the output files were written" in res.output, res.output
    assert json.loads((out / "report.json").read_text())["analyses"] == ["sparsity", "spectral"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_analyses_may_be_repeated_or_comma_separated(trio: tuple[str, str, str], tmp_path: Path) -> None:
    base, a, _ = trio
    for n, given in enumerate((["-a", "sparsity", "-a", "spectral"], ["-a", "sparsity,spectral"])):
        out = tmp_path / f"rep{n}"
        res = runner.invoke(app, ["report", base, a, "-o", str(out), "-q", "--k", "4", *given])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "report.json").read_text())["analyses"] == ["sparsity", "spectral"]
