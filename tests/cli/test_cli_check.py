"""`ckptdiff check` end to end through typer's CliRunner, on pairs whose differences are known by construction.

Exit codes: 0 every rule passes, 1 a rule fails, 2 bad input. The fine-tune below changes exactly 256 entries of
layer 0's up_proj, 64 of its down_proj and 16 of layer 1's q_proj, by one ULP each; nothing else changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from factory import bump_ulps, hub_metadata, llama_like, save_single
from safetensors.torch import save_file
from typer.testing import CliRunner

from ckptdiff import gate as R
from ckptdiff.analyses.spectral import spectral
from ckptdiff.cli import app
from ckptdiff.gate import load_config
from ckptdiff.gate.check import Shared, check
from ckptdiff.io.formats.safetensors import SafetensorsSource
from ckptdiff.io.views.ties import HINT
from ckptdiff.metrics.mask import CompareMode

runner = CliRunner()
UP0 = "model.layers.0.mlp.up_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
PLANTED = {UP0: 256, DOWN0: 64, Q1: 16}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"


def _changed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ft = {k: v.clone() for k, v in sd.items()}
    for name, count in PLANTED.items():
        ft[name] = bump_ulps(sd[name], torch.arange(count), 1)
    return ft


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = llama_like(layers=2)
    return save_single(base, tmp_path / "base.safetensors"), save_single(_changed(base), tmp_path / "ft.safetensors")


def total_numel() -> int:
    return sum(v.numel() for v in llama_like(layers=2).values())


def invoke(base: Path | str, ft: Path | str, *args: str) -> Any:
    return runner.invoke(app, ["check", str(base), str(ft), "-q", *args])


def as_json(result: Any) -> dict[str, Any]:
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------
# Metric rules


def test_sparsity_passes_and_fails(pair: tuple[Path, Path]) -> None:
    expected = 1 - sum(PLANTED.values()) / total_numel()
    ok = invoke(*pair, "--rule", f"sparsity >= {expected - 1e-9}", "-f", "json")
    assert ok.exit_code == 0, ok.output
    doc = as_json(ok)
    assert doc["passed"] and doc["analyses"] == ["sparsity"]
    assert doc["rules"][0]["value"] == pytest.approx(expected)
    bad = invoke(*pair, "--rule", f"sparsity >= {expected + 1e-6}")
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.stdout and UP0 in bad.stdout  # the worst offender is listed under the rule


def test_scoped_rules_and_offenders(pair: tuple[Path, Path]) -> None:
    mlp = 1 - (256 + 64) / (6 * 32 * 16)  # 6 mlp matrices of 32x16 entries
    res = invoke(
        *pair,
        "-r",
        f"sparsity@model.layers.*.mlp.* >= {mlp - 1e-9}",
        "-r",
        f"changed@{EMBED} == 0",
        "-r",
        "density@model.layers.1.* <= 0.01",
        "-f",
        "json",
    )
    assert res.exit_code == 0, res.output
    values = [r["value"] for r in as_json(res)["rules"]]
    assert values[0] == pytest.approx(mlp) and values[1] == 0
    assert values[2] == pytest.approx(16 / (4 * 256 + 3 * 512 + 2 * 16))
    fail = invoke(*pair, "-r", "changed@model.layers.0.* == 0", "-f", "json")
    assert fail.exit_code == 1
    rule = as_json(fail)["rules"][0]
    assert rule["value"] == 320
    assert [o["tensor"] for o in rule["offenders"]] == [UP0, DOWN0]  # worst first
    assert [o["value"] for o in rule["offenders"]] == [256, 64]


def test_rules_accept_tolerant_comparison(pair: tuple[Path, Path]) -> None:
    # one ULP of bf16 is far below 1e-1 relative: under --rtol nothing changed
    res = invoke(*pair, "-r", "changed == 0", "--rtol", "0.1")
    assert res.exit_code == 0, res.output
    assert invoke(*pair, "-r", "changed == 0").exit_code == 1


# ---------------------------------------------------------------------------------------------
# Structural rules


@pytest.fixture
def restructured(tmp_path: Path) -> tuple[Path, Path]:
    """ft lacks lm_head, has an extra tensor, a reshaped q_proj and an fp32 norm (values unchanged)."""
    base = llama_like(layers=2)
    ft = dict(base)
    del ft["lm_head.weight"]
    ft["model.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    ft["model.layers.0.self_attn.q_proj.weight"] = base["model.layers.0.self_attn.q_proj.weight"].reshape(32, 8)
    ft["model.norm.weight"] = base["model.norm.weight"].float()
    return save_single(base, tmp_path / "b.safetensors"), save_single(ft, tmp_path / "f.safetensors")


def test_structural_rules_pass_on_same_structure(pair: tuple[Path, Path]) -> None:
    res = invoke(*pair, "--same-structure", "--expect-unchanged", "model.embed_tokens.*", "-f", "json")
    assert res.exit_code == 0, res.output
    names = [r["rule"] for r in as_json(res)["rules"]]
    assert names == ["same_keys", "same_shapes", "same_dtypes", "unchanged@model.embed_tokens.*", "same_param_count"]


@pytest.mark.parametrize(
    ("flag", "rule", "offenders"),
    [
        ("--same-keys", "same_keys", ["lm_head.weight", "model.extra.weight"]),
        ("--same-shapes", "same_shapes", ["model.layers.0.self_attn.q_proj.weight"]),
        ("--same-dtypes", "same_dtypes", ["model.norm.weight"]),
        ("--same-param-count", "same_param_count", ["lm_head.weight", "model.extra.weight"]),
    ],
)
def test_structural_rules_fail(restructured: tuple[Path, Path], flag: str, rule: str, offenders: list[str]) -> None:
    res = invoke(*restructured, flag, "-f", "json")
    assert res.exit_code == 1, res.output
    (got,) = as_json(res)["rules"]
    assert got["rule"] == rule and not got["passed"]
    assert sorted(o["tensor"] for o in got["offenders"]) == offenders
    if rule == "same_param_count":
        assert got["value"] == 50 * 16 - 4


def test_expect_unchanged_and_allow_changed(pair: tuple[Path, Path]) -> None:
    assert invoke(*pair, "--expect-unchanged", "model.embed_tokens.*").exit_code == 0
    res = invoke(*pair, "--expect-unchanged", "model.layers.0.*", "-f", "json")
    assert res.exit_code == 1
    assert [o["tensor"] for o in as_json(res)["rules"][0]["offenders"]] == [UP0, DOWN0]
    allowed = ["--allow-changed", "model.layers.*.mlp.*", "--allow-changed", "*.q_proj.weight"]
    assert invoke(*pair, *allowed).exit_code == 0
    res = invoke(*pair, "--allow-changed", "model.layers.*.mlp.*", "-f", "json")
    assert res.exit_code == 1
    assert [o["tensor"] for o in as_json(res)["rules"][0]["offenders"]] == [Q1]


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-r", "sparsity >> 0.5"], "cannot parse rule"),
        (["-r", "sparsity >= abc"], "cannot parse rule"),
        (["-r", "bogus >= 1"], "unknown metric 'bogus'"),
        (["-r", "sparsity@model.nothing.* >= 0.5"], "matches no tensor"),
        (["--expect-unchanged", "nothing.*"], "matches no tensor"),
        (["--allow-changed", "nothing.*"], "matches no tensor"),
        (["--include", "nothing.*", "-r", "sparsity >= 0"], "match no tensor"),
        ([], "no rules to check"),
        (["-r", "sparsity >= 0", "--rtol", "1e-3", "--atol", "1e-5"], "alternatives"),
        (["-r", "sparsity >= 0", "--json", "/nonexistent-dir/out.json"], "does not exist"),
    ],
)
def test_bad_input_exits_2(pair: tuple[Path, Path], args: list[str], message: str) -> None:
    res = invoke(*pair, *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("ckptdiff: error:")


def test_bad_config_files_exit_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cases = {
        "syntax.toml": ("rules = [", "not valid TOML"),
        "key.toml": ('rulez = ["sparsity >= 0"]', "unknown key 'rulez'"),
        "rule.toml": ('rules = ["sparsity => 0"]', "cannot parse rule"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        res = invoke(*pair, "--config", str(tmp_path / name))
        assert res.exit_code == 2 and message in res.stderr, (name, res.output)
    res = invoke(*pair, "--config", str(tmp_path / "missing.toml"))
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    res = invoke(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-r", "sparsity >= 0")
    assert res.exit_code == 2 and "does not exist" in res.stderr


# ---------------------------------------------------------------------------------------------
# Configuration sources


def test_config_file_and_pyproject(pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "pyproject.toml").write_text('[tool.ckptdiff.check]\nrules = ["sparsity >= 0.999"]\n')
    res = invoke(*pair, "-f", "json")
    assert res.exit_code == 1  # sparsity is about 0.95
    assert "pyproject.toml" in as_json(res)["header"]["rules_from"]
    rules = tmp_path / "rules.toml"
    rules.write_text(f'rules = ["changed@{EMBED} == 0"]\nsame-keys = true\n')
    res = invoke(*pair, "--config", str(rules), "--expect-unchanged", "lm_head.*", "-f", "json")
    assert res.exit_code == 0, res.output  # --config replaces pyproject; command-line rules add to it
    doc = as_json(res)
    assert [r["rule"] for r in doc["rules"]] == [f"changed@{EMBED} == 0", "same_keys", "unchanged@lm_head.*"]
    assert doc["header"]["rules_from"] == f"{rules} + command line"


def test_example_rules_file_gates_the_pair(pair: tuple[Path, Path]) -> None:
    config = load_config(EXAMPLES / "rules.toml")
    assert config.rules and config.structural.same_keys
    res = invoke(*pair, "--config", str(EXAMPLES / "rules.toml"), "-f", "json")
    assert res.exit_code == 0, res.output
    assert len(as_json(res)["rules"]) == len(config.rules) + 5  # 3 same_* checks, 2 expect_unchanged globs
    assert "ckptdiff check" in (EXAMPLES / "ckptdiff-gate.yml").read_text()


# ---------------------------------------------------------------------------------------------
# Output formats


def test_markdown_known_case(pair: tuple[Path, Path]) -> None:
    base, ft = pair
    res = invoke(base, ft, "-r", f"changed@{EMBED} == 0", "-r", f"changed@{UP0} == 0", "-f", "md")
    assert res.exit_code == 1
    expected = f"""## ckptdiff check: FAIL (1/2 rules pass)

| rule | value | threshold | result |
|---|---|---|---|
| `changed@{EMBED} == 0` | 0 | == 0 | PASS |
| `changed@{UP0} == 0` | 256 | == 0 | FAIL |

**`changed@{UP0} == 0`** worst tensors:

- `{UP0}`: 256

Base `{base.resolve()}`, fine-tune `{ft.resolve()}`; analyses run: sparsity.
"""
    assert res.stdout == expected


def test_json_file_and_table(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    res = invoke(*pair, "-r", "sparsity >= 0.5", "-r", "changed == 0", "--json", str(out))
    assert res.exit_code == 1
    doc = json.loads(out.read_text())
    assert doc["exit_code"] == 1 and [r["passed"] for r in doc["rules"]] == [True, False]
    assert doc["rules"][1]["value"] == sum(PLANTED.values())
    for text in ("sparsity >= 0.5", "PASS", "changed == 0", "FAIL", "336", UP0, "1/2 rules pass"):
        assert text in res.stdout
    assert not list(tmp_path.glob(".check.json.*"))  # no temporary file left behind


def test_help_has_an_example() -> None:
    res = runner.invoke(app, ["check", "--help"])
    assert res.exit_code == 0
    assert "Example" in res.stdout and "Exit codes" in res.stdout


# ---------------------------------------------------------------------------------------------
# Only the analyses the rules need


@pytest.fixture
def no_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any SVD (exact or randomized, principal or spectral) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an SVD ran for a rule set that needs none")

    from ckptdiff.metrics import linalg
    from ckptdiff.metrics import spectral as spectral_metrics

    monkeypatch.setattr(linalg, "topk", refuse)
    monkeypatch.setattr(linalg, "svd", refuse)
    monkeypatch.setattr(spectral_metrics, "spectral_metrics_with_spectra", refuse)
    import ckptdiff.analyses.spectral as spectral_analysis

    monkeypatch.setattr(spectral_analysis, "spectral_metrics_with_spectra", refuse)


def test_sparsity_rules_never_run_principal_or_spectral(pair: tuple[Path, Path], no_svd: None) -> None:
    res = invoke(*pair, "-r", "sparsity >= 0.5", "-r", f"changed@{EMBED} == 0", "--same-keys", "-f", "json")
    assert res.exit_code == 0, res.output
    assert as_json(res)["analyses"] == ["sparsity"]


def test_principal_and_spectral_rules_get_the_shared_options(pair: tuple[Path, Path]) -> None:
    from ckptdiff.analyses.principal import principal_overlap

    args = ["-r", "ratio_principal <= 100", "-r", "nss@*.self_attn.* < 1e-5", "-r", "nss@*.mlp.* < 1"]
    res = invoke(*pair, *args, "--k", "8", "--include", "model.layers.*", "--device", "cpu", "-f", "json")
    doc = as_json(res)
    assert doc["analyses"] == ["principal", "spectral"]  # no sparsity pass either
    base, ft = (str(p) for p in pair)
    opts: dict[str, Any] = {"k": 8, "include": ["model.layers.*"], "device": "cpu", "progress": False}
    pr = principal_overlap(base, ft, **opts).overall()
    nss = spectral(base, ft, **opts).analysed().set_index("tensor")["nss"]
    attn = float(nss[[n for n in nss.index if ".self_attn." in n]].max())
    mlp = float(nss[[n for n in nss.index if ".mlp." in n]].max())
    assert [r["value"] for r in doc["rules"]] == pytest.approx([pr["ratio_principal"], attn, mlp], rel=1e-12)
    assert attn > 1e-5  # Q1 moved: the attention rule fails, so the gate fails
    assert [r["passed"] for r in doc["rules"]] == [True, False, True] and res.exit_code == 1
    assert doc["rules"][1]["offenders"][0]["tensor"] == Q1


# ---------------------------------------------------------------------------------------------
# Header-only


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("header-only mode read tensor data")

    monkeypatch.setattr(SafetensorsSource, "read", refuse)


def test_header_only_passes_without_reading(pair: tuple[Path, Path], no_reads: None) -> None:
    res = invoke(*pair, "--header-only", "--same-structure", "-f", "json")
    assert res.exit_code == 0, res.output
    doc = as_json(res)
    assert doc["analyses"] == [] and "header-only" in doc["header"]["mode"]
    assert all(r["passed"] for r in doc["rules"]) and len(doc["rules"]) == 4


def test_header_only_finds_wrong_dtype_and_missing_key(restructured: tuple[Path, Path], no_reads: None) -> None:
    res = invoke(*restructured, "--header-only", "--same-keys", "--same-dtypes", "-f", "json")
    assert res.exit_code == 1, res.output
    by_rule = {r["rule"]: r for r in as_json(res)["rules"]}
    assert [o["tensor"] for o in by_rule["same_keys"]["offenders"]] == ["lm_head.weight", "model.extra.weight"]
    hint = f"only in base; {HINT}"  # the fine-tune has an input embedding: a tied save would drop lm_head.weight
    assert [o["detail"] for o in by_rule["same_keys"]["offenders"]] == [hint, "only in fine-tune"]
    assert [o["tensor"] for o in by_rule["same_dtypes"]["offenders"]] == ["model.norm.weight"]
    assert by_rule["same_dtypes"]["offenders"][0]["detail"] == "bf16 vs fp32"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-r", "sparsity >= 0.5"], "supports structural rules only"),
        (["--expect-unchanged", "model.*"], "cannot tell whether values changed"),
        (["--allow-changed", "model.*"], "cannot tell whether values changed"),
    ],
)
def test_header_only_rejects_data_rules(pair: tuple[Path, Path], args: list[str], message: str) -> None:
    res = invoke(*pair, "--header-only", "--same-keys", *args)
    assert res.exit_code == 2 and message in res.stderr, res.output


def test_header_only_refuses_pickles(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "b.pt")
    res = invoke(tmp_path / "a.pt", tmp_path / "b.pt", "--header-only", "--same-keys")
    assert res.exit_code == 2 and "needs safetensors" in res.stderr


def test_header_only_hub_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    base = llama_like(layers=2)
    ft = {**base, "model.norm.weight": base["model.norm.weight"].float()}
    repos = {"org/base": hub_metadata(base), "org/ft": hub_metadata(ft, shards=3)}
    calls: list[tuple[str, str | None]] = []

    def fake(repo_id: str, *, revision: str | None = None, **kwargs: Any) -> Any:
        calls.append((repo_id, revision))
        return repos[repo_id]

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake)
    ok = invoke("org/base@v1", "org/ft", "--header-only", "--same-keys", "--same-shapes", "--same-param-count")
    assert ok.exit_code == 0, ok.output
    assert calls == [("org/base", "v1"), ("org/ft", None)]
    bad = invoke("org/base@v1", "org/ft", "--header-only", "--same-dtypes", "-f", "md")
    assert bad.exit_code == 1
    assert "`model.norm.weight`: bf16 vs fp32" in bad.stdout


# ---------------------------------------------------------------------------------------------
# With the real analyses, when they are installed


def test_real_principal_and_spectral_analyses(pair: tuple[Path, Path]) -> None:
    pytest.importorskip("ckptdiff.analyses.principal")
    pytest.importorskip("ckptdiff.analyses.spectral")
    rules = ["-r", "ratio_principal <= 100", "-r", "nss@*.mlp.* < 10", "-r", "angle_u_max_deg <= 90"]
    res = invoke(*pair, *rules, "--k", "4", "-f", "json")  # k < min(m, n): angles are measured, not 0 by definition
    assert res.exit_code == 0, res.output
    doc = as_json(res)
    assert doc["analyses"] == ["principal", "spectral"]
    assert all(r["value"] is not None for r in doc["rules"])


def _write_pair(tmp_path: Path, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> tuple[str, str]:
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    return str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors")


def test_gate_fails_when_a_matrix_holds_nan(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    a0, b0 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    b1 = b0 + 5 * torch.randn(32, 16, generator=g)
    b1[0, 0] = float("nan")
    base, ft = _write_pair(tmp_path, {"m.a": a0, "m.b": b0}, {"m.a": a0.clone(), "m.b": b1})
    cfg = R.CheckConfig(rules=(R.parse_rule("nss < 0.01"), R.parse_rule("energy_principal <= 1")))
    rep = check(base, ft, cfg, shared=Shared(device="cpu", progress=False, k=4))
    assert not rep.passed
    for r in rep.outcome.results:
        assert not r.passed and [o.tensor for o in r.offenders] == ["m.b"], r


def test_check_as_applies_to_spectral_rules(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(32, 16, generator=g)
    w1 = w0 + 1e-5 * torch.randn(32, 16, generator=g)
    base, ft = _write_pair(tmp_path, {"m.w": w0}, {"m.w": w1})
    expected = spectral(base, ft, k=4, as_dtype="bf16", progress=False, device="cpu").to_frame()["nss"].iloc[0]
    native = spectral(base, ft, k=4, progress=False, device="cpu").to_frame()["nss"].iloc[0]
    assert expected != pytest.approx(native)  # the rounding matters here, so the test can tell them apart
    cfg = R.CheckConfig(rules=(R.parse_rule("nss < 1"),))
    shared = Shared(device="cpu", progress=False, k=4, mode=CompareMode(as_dtype=torch.bfloat16))
    rep = check(base, ft, cfg, shared=shared)
    assert rep.outcome.results[0].value == pytest.approx(expected, rel=1e-9)


def test_structural_rows_say_what_their_value_counts(restructured: tuple[Path, Path], no_reads: None) -> None:
    """`same_keys 0 == 0` alone does not say what the 0 counts: table, Markdown and JSON say it (issue 23 item 4)."""
    counts = {
        "same_keys": "tensors on one side only",
        "same_dtypes": "tensors whose dtype changed",
        "same_param_count": "difference in parameter count",
    }
    flags = ("--header-only", "--same-keys", "--same-dtypes", "--same-param-count")
    doc = as_json(invoke(*restructured, *flags, "-f", "json"))
    assert {r["rule"]: r["counts"] for r in doc["rules"]} == counts
    md = invoke(*restructured, *flags, "-f", "md").output
    assert "| `same_keys` | 2 (tensors on one side only) |" in md
    table = invoke(*restructured, *flags).output
    assert all(f"{rule}: {what}" in table for rule, what in counts.items())


def test_check_takes_every_option_its_rules_depend_on(pair: tuple[Path, Path]) -> None:
    """--alpha, --svd, --precision, --spectral-precision, --null and --seed, with the commands' defaults, so a rule's
    value is the single command's under the same options (issue 23 item 11)."""
    from ckptdiff.analyses.principal import principal_overlap

    base, ft = (str(p) for p in pair)
    rules = ["--rule", f"ratio_principal@{UP0} <= 100", "--rule", f"nss@{UP0} <= 100"]
    opts = ["--k", "4", "--alpha", "0.25", "--svd", "exact", "--precision", "fp64", "--spectral-precision", "fp32"]
    doc = as_json(invoke(base, ft, *rules, *opts, "-f", "json"))
    values = {r["rule"].split("@")[0]: r["value"] for r in doc["rules"]}
    expect = principal_overlap(base, ft, k=4, alpha=0.25, svd="exact", precision="fp64", progress=False)
    assert values["ratio_principal"] == expect.to_frame().set_index("tensor").loc[UP0, "ratio_principal"]
    nss = spectral(base, ft, k=4, precision="fp32", progress=False).to_frame().set_index("tensor").loc[UP0, "nss"]
    # One decomposition per matrix and side serves both rules, at the more exact of the two precisions asked
    # (fp64 for principal-overlap here), so spectral's fp32 figure is met within fp32 SVD accuracy, not bit for bit.
    assert values["nss"] == pytest.approx(nss, rel=1e-4)
    assert (doc["header"]["alpha"], doc["header"]["svd"], doc["header"]["precision"]) == ("0.25", "exact", "fp64")
    assert doc["header"]["spectral_precision"] == "fp32"
    default = as_json(invoke(base, ft, *rules, "--k", "4", "-f", "json"))["header"]
    assert (default["alpha"], default["svd"], default["precision"], default["spectral_precision"]) == (
        "0.5",
        "auto",
        "fp32",
        "fp64",
    )
    refused = invoke(base, ft, *rules, "--alpha", "1.5")
    assert refused.exit_code == 2 and "--alpha must lie strictly between 0 and 1" in refused.stderr
