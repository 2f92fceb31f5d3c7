"""Tied embeddings (io.views.ties): one storage under two names in a ``.bin``, or ``lm_head.weight`` dropped by a
save whose ``config.json`` says ``tie_word_embeddings``, is one tensor: counted once, compared once, said so.

Every count below is known by construction: llama_like's shapes give the parameters, and the fine-tunes change
exactly 7 entries of the input embedding and 5 of layer 0's up_proj, by one ULP each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from factory import EMBED, HEAD, bump_ulps, llama_like, save_single, save_tied_bin, save_tied_hf
from typer.testing import CliRunner

import ckptdiff
from ckptdiff.cli import app
from ckptdiff.engine.alignment import Status
from ckptdiff.errors import InputError
from ckptdiff.io.resolve import open_stored
from ckptdiff.io.source import Tie
from ckptdiff.io.views.ties import CONFIG, HINT

runner = CliRunner()
V, D, FF, L = 50, 16, 32, 2  # llama_like's vocabulary, width, MLP width and layers
UNIQUE = V * D + L * (4 * D * D + 3 * FF * D + 2 * D) + D  # every parameter once: no lm_head of its own
UP0 = "model.layers.0.mlp.up_proj.weight"
TIED = f"{HEAD} -> {EMBED}"
SHARED = f"{TIED} (shared storage)"
DECLARED = f"{TIED} ({CONFIG})"


def _changed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ft = {k: v.clone() for k, v in sd.items()}
    ft[EMBED] = bump_ulps(sd[EMBED], torch.arange(7))
    ft[UP0] = bump_ulps(sd[UP0], torch.arange(5))
    return ft


def _rows(result: Any) -> pd.DataFrame:
    return result.to_frame().set_index("tensor")


def _check(base: Path, ft: Path, *args: str) -> Any:
    return runner.invoke(app, ["check", str(base), str(ft), "-q", "-f", "json", *args])


# ---------------------------------------------------------------------------------------------
# shared storage


def test_shared_storage_is_counted_and_compared_once(tmp_path: Path) -> None:
    sd = llama_like()
    base = save_tied_bin(sd, tmp_path / "base" / "pytorch_model.bin")
    ft = save_tied_bin(_changed(sd), tmp_path / "ft" / "pytorch_model.bin")
    src = open_stored(str(base))
    try:
        assert HEAD not in src.infos and src.tied == {HEAD: Tie(EMBED, "shared storage")}
        assert src.total_bytes == 2 * UNIQUE  # bf16
    finally:
        src.close()
    r = ckptdiff.sparsity(base, ft, progress=False)
    assert HEAD not in _rows(r).index
    assert r.overall()["numel"] == UNIQUE and r.overall()["changed"] == 12
    assert r.header["tied"] == f"base: {SHARED}; ft: {SHARED}"
    # the CLI says so once on stderr; --exclude of a tied name is no glob that "matches nothing"
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "-q", "-f", "json", "--exclude", HEAD])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["header"]["tied"] == f"base: {SHARED}; ft: {SHARED}"
    assert res.stderr.splitlines() == [
        f"ckptdiff: info: tied tensors, each compared once under the tensor it is: base: {SHARED}; ft: {SHARED}"
    ]
    res = _check(base, ft, "--same-structure")
    assert res.exit_code == 0, res.output


def test_aliases_keep_the_input_embedding_and_leave_partial_views(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    embed, w, big = torch.randn(6, 4, generator=g), torch.randn(3, 3, generator=g), torch.randn(4, 4, generator=g)
    saved = {HEAD: embed, EMBED: embed, "m.b.weight": w, "m.a.weight": w, "fused": big, "half": big[:2], "t": big.t()}
    path = tmp_path / "m.pt"
    torch.save(saved, path)
    src = open_stored(str(path))
    try:
        assert src.tied == {HEAD: Tie(EMBED, "shared storage"), "m.b.weight": Tie("m.a.weight", "shared storage")}
        assert set(src.infos) == {EMBED, "m.a.weight", "fused", "half", "t"}  # partial views are tensors of their own
        assert torch.equal(src.read_full(EMBED), embed) and torch.equal(src.read_full("half"), big[:2])
    finally:
        src.close()


# ---------------------------------------------------------------------------------------------
# config.json tie_word_embeddings


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"tie_word_embeddings": True}, DECLARED),
        ({"text_config": {"tie_word_embeddings": True}}, DECLARED),
        # save_pretrained leaves out a value equal to the class default, and GPT-2's and Gemma's default is to tie
        ({"model_type": "gpt2"}, f"{HEAD} -> {EMBED} (config.json model_type gpt2, tied by default)"),
        ({"model_type": "gemma2"}, f"{HEAD} -> {EMBED} (config.json model_type gemma2, tied by default)"),
    ],
    ids=["top", "text", "gpt2 default", "gemma2 default"],
)
def test_a_tied_save_compares_like_its_shared_storage(tmp_path: Path, config: dict[str, Any], why: str) -> None:
    sd = llama_like()
    ft_sd = _changed(sd)
    base = save_tied_bin(sd, tmp_path / "base" / "pytorch_model.bin")
    ft = save_tied_hf(ft_sd, tmp_path / "ft", config)
    res = _check(base, ft, "--same-keys", "--same-param-count", "--rule", f"changed@{EMBED} == 7")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["header"]["tied"] == f"base: {SHARED}; ft: {why}"
    r = ckptdiff.sparsity(base, ft, progress=False)
    # the embeddings compared directly, with no lm_head on either side, give the same numbers
    plain = {k: v for k, v in sd.items() if k != HEAD}
    direct = ckptdiff.sparsity(
        save_single(plain, tmp_path / "b.safetensors"),
        save_single({k: v for k, v in ft_sd.items() if k != HEAD}, tmp_path / "f.safetensors"),
        progress=False,
    )
    assert r.overall() == direct.overall() and r.overall()["numel"] == UNIQUE and r.overall()["changed"] == 12
    assert _rows(r).drop(columns="detail").equals(_rows(direct).drop(columns="detail"))


def test_untied_base_against_a_tied_fine_tune_is_a_tie_change(tmp_path: Path) -> None:
    sd = llama_like()
    base = save_single(sd, tmp_path / "base" / "model.safetensors").parent  # its own lm_head
    ft = save_tied_hf(_changed(sd), tmp_path / "ft", {"tie_word_embeddings": True})
    r = ckptdiff.sparsity(base, ft, progress=False)
    row = _rows(r).loc[HEAD]
    assert row["status"] == Status.TIE_CHANGED.value and pd.isna(row["changed"])
    assert row["detail"] == f"tied to {EMBED} in ft ({CONFIG}); its own tensor in base"
    assert HEAD in set(r.structural()["tensor"]) and r.overall()["changed"] == 12
    # --same-keys passes (the name is there, as the embedding); the parameter count differs, and says why
    res = _check(base, ft, "--same-structure")
    assert res.exit_code == 1, res.output
    rules = {x["rule"]: x for x in json.loads(res.stdout)["rules"]}
    assert rules["same_keys"]["passed"] and rules["same_shapes"]["passed"] and rules["same_dtypes"]["passed"]
    (offender,) = rules["same_param_count"]["offenders"]
    assert offender["tensor"] == HEAD and f"tied to {EMBED} in ft" in offender["detail"]
    for extra in ([], ["--header-only"]):
        res = _check(base, ft, "--same-keys", *extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["header"]["tied"] == f"ft: {DECLARED}"
    shown = runner.invoke(app, ["sparsity", str(base), str(ft), "-q"])  # the finding in the terminal report
    assert shown.exit_code == 0 and "tie_changed" in shown.stdout, shown.output
    shown = runner.invoke(app, ["check", str(base), str(ft), "-q", "--same-keys"])
    assert shown.exit_code == 0 and f"tied: ft: {DECLARED}" in shown.stdout, shown.output
    # the same from a .bin: its own lm_head in base, one storage in the fine-tune
    torch.save(sd, tmp_path / "untied.bin")
    tied = save_tied_bin(_changed(sd), tmp_path / "tied.bin")
    row = _rows(ckptdiff.sparsity(tmp_path / "untied.bin", tied, progress=False)).loc[HEAD]
    assert row["status"] == Status.TIE_CHANGED.value
    assert row["detail"] == f"tied to {EMBED} in ft (shared storage); its own tensor in base"


@pytest.mark.parametrize("config", [None, {"model_type": "llama"}], ids=["no config", "silent config"])
def test_a_dropped_lm_head_without_a_declared_tie_gets_a_hint(tmp_path: Path, config: dict[str, Any] | None) -> None:
    sd = llama_like()
    base = save_single(sd, tmp_path / "base" / "model.safetensors").parent
    ft = save_tied_hf(_changed(sd), tmp_path / "ft", config)
    row = _rows(ckptdiff.sparsity(base, ft, progress=False)).loc[HEAD]
    assert row["status"] == Status.ONLY_BASE.value and row["detail"] == f"only in base; {HINT}"  # one wording
    assert "--exclude lm_head.weight" in HINT and "tie_word_embeddings" in HINT
    res = _check(base, ft, "--same-keys")
    assert res.exit_code == 1, res.output
    (rule,) = json.loads(res.stdout)["rules"]
    assert rule["offenders"] == [{"tensor": HEAD, "value": None, "detail": f"only in base; {HINT}"}]
    assert _check(base, ft, "--same-keys", "--exclude", HEAD).exit_code == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), (json.dumps({"tie_word_embeddings": "yes"}), "must be true or false")],
)
def test_a_malformed_config_is_one_line_exit_2(tmp_path: Path, text: str, message: str) -> None:
    sd = llama_like()
    base = save_single(sd, tmp_path / "base" / "model.safetensors").parent
    ft = save_tied_hf(sd, tmp_path / "ft", text)
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "-q"])
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"ckptdiff: error: {ft / 'config.json'}: ") and message in line
    with pytest.raises(InputError, match=message):
        ckptdiff.sparsity(base, ft, progress=False)


def test_a_tie_with_no_single_input_embedding_is_a_warning(tmp_path: Path) -> None:
    sd = {**llama_like(), "model.vision.embed_tokens.weight": torch.ones(4, D, dtype=torch.bfloat16)}
    base = save_single(sd, tmp_path / "base" / "model.safetensors").parent
    ft = save_tied_hf(sd, tmp_path / "ft", {"tie_word_embeddings": True})
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "-q", "-f", "json"])
    assert res.exit_code == 0, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"ckptdiff: warning: {ft / 'config.json'} says tie_word_embeddings, but ")
    assert "2 2-D input embeddings" in line
    doc = json.loads(res.stdout)
    assert "tied" not in doc["header"]
    (row,) = [t for t in doc["tensors"] if t["tensor"] == HEAD]
    assert row["status"] == Status.ONLY_BASE.value and row["detail"] == f"only in base; {HINT}"


@pytest.mark.parametrize("tied_side", ["base", "ft"])
def test_a_tie_on_one_side_and_nothing_on_the_other_is_a_missing_key(tmp_path: Path, tied_side: str) -> None:
    """A .bin whose lm_head is its embedding against a save that dropped lm_head and declares no tie: the name is
    the tied side's alone (loading the other would leave its head untied), so --same-keys fails, with the hint."""
    sd = llama_like()
    tied = save_tied_bin(sd, tmp_path / "tied" / "pytorch_model.bin")
    dropped = save_tied_hf(_changed(sd), tmp_path / "dropped", None)
    base, ft = (tied, dropped) if tied_side == "base" else (dropped, tied)
    row = _rows(ckptdiff.sparsity(base, ft, progress=False)).loc[HEAD]
    expected = Status.ONLY_BASE if tied_side == "base" else Status.ONLY_FT
    assert row["status"] == expected.value
    side = "only in base" if tied_side == "base" else "only in fine-tune"  # the side leads, in every command
    assert row["detail"] == f"{side}; tied to {EMBED} in {tied_side} (shared storage); {HINT}"
    assert _check(base, ft, "--same-keys").exit_code == 1


@pytest.mark.parametrize("how", ["rule", "expect-unchanged"])
def test_a_rule_scoped_to_a_tied_name_says_which_name_to_use(tmp_path: Path, how: str) -> None:
    sd = llama_like()
    base = save_tied_bin(sd, tmp_path / "base" / "pytorch_model.bin")
    ft = save_tied_bin(_changed(sd), tmp_path / "ft" / "pytorch_model.bin")
    scoped = {"rule": ["--rule", f"changed@{HEAD} == 0"], "expect-unchanged": ["--expect-unchanged", HEAD]}[how]
    res = _check(base, ft, *scoped)
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.stderr.strip().splitlines()[-1]
    assert f"matches only {HEAD}, which is tied to {EMBED}" in line and f"scope it to {EMBED}" in line
    assert _check(base, ft, "--rule", f"changed@{EMBED} == 7").exit_code == 0


def test_a_fine_tune_tied_like_the_base_has_no_row_beside_one_that_is_not(tmp_path: Path) -> None:
    """Three checkpoints: base and ft1 tied (shared storage), ft2 with a head of its own. The base/ft1 sections
    have no lm_head row (tied on both sides: compared as the embedding); base/ft2 has the tie change."""
    sd = llama_like()
    base = save_tied_bin(sd, tmp_path / "base" / "pytorch_model.bin")
    ft1 = save_tied_bin(_changed(sd), tmp_path / "ft1" / "pytorch_model.bin")
    ft2 = save_single({**_changed(sd), HEAD: sd[EMBED].clone()}, tmp_path / "ft2" / "model.safetensors")
    rep = ckptdiff.full_report(base, [ft1, ft2], k=2, progress=False)
    one, two = rep.runs
    assert HEAD not in _rows(rep.sparsity[one]).index
    assert _rows(rep.sparsity[two]).loc[HEAD, "status"] == Status.TIE_CHANGED.value
    assert _rows(rep.sparsity[one]).loc[EMBED, "changed"] == 7


def test_including_only_a_tied_name_says_which_tensor_to_include(tmp_path: Path) -> None:
    sd = llama_like()
    base = save_tied_bin(sd, tmp_path / "base" / "pytorch_model.bin")
    ft = save_tied_bin(_changed(sd), tmp_path / "ft" / "pytorch_model.bin")
    hint = f"--include '{HEAD}' matches only {HEAD}, tied to {EMBED} (one tensor, compared under that name): "
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "-q", "-f", "json", "-i", HEAD, "-i", UP0])
    assert res.exit_code == 0 and f"ckptdiff: warning: {hint}include {EMBED}" in res.stderr
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "-q", "-i", HEAD])
    assert res.exit_code == 2 and res.stderr.strip() == f"ckptdiff: error: {hint}include {EMBED}"
