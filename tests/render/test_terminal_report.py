"""What a person sees first: the terminal report at 80 columns, its length, wording, progress and JSON keys.

Each test pins one defect of the "first hour" issue: tables cut to ``mod… ten…`` at 80 columns, structural
findings that are expected skips, per-layer tables cut at 40 rows, verbosity flags, progress in CI logs, header
keys with spaces, spectral angles that are not measurements, and wording.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from factory import bump_ulps, llama_like, save_single
from rich.console import Console
from typer.testing import CliRunner

import ckptdiff.render.terminal as terminal_mod
import ckptdiff.render.text as report_mod
from ckptdiff.analyses.base import Report
from ckptdiff.analyses.consistency import consistency
from ckptdiff.analyses.principal import principal_overlap
from ckptdiff.analyses.sparsity import sparsity
from ckptdiff.analyses.spectral import spectral
from ckptdiff.cli import app

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "checkpoints"
LONG_LABELS = ["grpo-qwen3-4b-lr3e-6-seed1", "grpo-qwen3-4b-lr3e-6-seed2", "sft-qwen3-4b-lr1e-5-seed1"]
MISSING = "lm_head.weight"  # only in base: a structural finding
EXTRA = "model.layers.1.mlp.extra_proj.weight"  # only in the fine-tunes


# ---------------------------------------------------------------------------------------------
# checkpoints


def _changed(sd: dict[str, torch.Tensor], seed: int, share: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        idx = torch.randperm(v.numel(), generator=g)[: max(1, v.numel() // share)]
        out[k] = bump_ulps(v, idx, 1 + seed % 3) if v.dim() == 2 else v.clone()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """The factory's 2-layer llama in bf16, three fine-tunes; the fine-tunes lack lm_head and add a tensor."""
    root = tmp_path_factory.mktemp("tiny")
    base = llama_like(layers=2)
    base_path = save_single(base, root / "base" / "model.safetensors")
    fts = []
    for r in range(3):
        ft = _changed(base, r + 1)
        del ft[MISSING]
        ft[EXTRA] = torch.ones(16, 16, dtype=torch.bfloat16)
        fts.append(str(save_single(ft, root / LONG_LABELS[r] / "model.safetensors")))
    return str(base_path), fts


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """45 layers: more than the 40 rows the per-layer tables used to stop at."""
    root = tmp_path_factory.mktemp("deep")
    base = llama_like(layers=45, d=8, ff=8, vocab=10)
    fts = [str(save_single(_changed(base, r + 1), root / f"run{r}.safetensors")) for r in range(2)]
    return str(save_single(base, root / "base.safetensors")), fts


def _reports(base: str, fts: list[str], k: int, labels: list[str] | None = None) -> dict[str, Report]:
    return {
        "sparsity": sparsity(base, fts[0], progress=False).report(),
        "principal": principal_overlap(base, fts[0], k=k, progress=False).report(),
        "spectral": spectral(base, fts[0], k=k, null="random", progress=False).report(),
        "consistency": consistency(base, fts, labels=labels, progress=False).report(),
    }


@pytest.fixture(scope="module")
def tiny_reports(tiny: tuple[str, list[str]]) -> dict[str, Report]:
    return _reports(tiny[0], tiny[1], k=64, labels=LONG_LABELS)


@pytest.fixture(scope="module")
def example_reports() -> dict[str, Report]:
    fts = [str(EXAMPLES / n) for n in ("rl_seed1", "rl_seed2", "sft")]
    return _reports(str(EXAMPLES / "base"), fts, k=16)


# ---------------------------------------------------------------------------------------------
# reading rich tables back


def _render(report: Report, width: int = 80, fn: Callable[..., None] | None = None) -> str:
    """print_tables (or fn) on a recorded console of the given width, as a redirected stdout would get it."""
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None, force_terminal=False)
    old = terminal_mod.stdout_console
    terminal_mod.stdout_console = lambda: console  # type: ignore[assignment]
    try:
        (fn or terminal_mod.print_tables)(report)
    finally:
        terminal_mod.stdout_console = old  # type: ignore[assignment]
    return console.export_text()


def _cells(line: str, sep: str) -> list[str]:
    return [c.strip() for c in line.strip().strip(sep).split(sep)]


def parse_tables(text: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """(headers, rows) of every boxed table; a row's cells join its lines (wrapped cells are split at line ends)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("┏"):
            i += 1
            continue
        i += 1
        head: list[list[str]] = []
        while lines[i].lstrip().startswith("┃"):
            head.append(_cells(lines[i], "┃"))
            i += 1
        headers = ["".join(parts) for parts in zip(*head, strict=True)]
        i += 1  # ┡
        body = []
        while not lines[i].lstrip().startswith("└"):
            body.append(lines[i])
            i += 1
        ruled = any(line.lstrip().startswith("├") for line in body)  # rows with wrapped cells are ruled off
        rows: list[list[list[str]]] = [[]]
        for line in body:
            if line.lstrip().startswith("├"):
                rows.append([])
            elif ruled:
                rows[-1].append(_cells(line, "│"))
            else:
                rows.append([_cells(line, "│")])
        yield headers, [["".join(parts) for parts in zip(*row, strict=True)] for row in rows if row]


def _affixes(text: str) -> tuple[set[str], set[str]]:
    flat = " ".join(text.split())
    return {"", *re.findall(r'prefix "([^"]*)"', flat)}, {"", *re.findall(r'suffix "([^"]*)"', flat)}


def _recovered(cell: str, prefixes: set[str], suffixes: set[str], names: set[str]) -> bool:
    return any(p + cell + s in names for p, s in itertools.product(prefixes, suffixes))


NAME_COLUMNS = ("tensor", "run", "run_a", "run_b")


def _names_shown(report: Report) -> set[str]:
    """Every tensor name and run label the terminal tables should show (terminal views, structural findings)."""
    out: set[str] = set()
    frames = [t.frame.reset_index() if t.frame.index.name else t.frame for t in report.tables]
    for frame in [*frames, report.structural]:
        for col in NAME_COLUMNS:
            if col in frame.columns:
                out.update(str(v) for v in frame[col])
    return out


def _check_readable(text: str, report: Report, labels: set[str]) -> None:
    assert "…" not in text, "a cell was cut"
    assert all(len(line) <= 80 for line in text.splitlines())
    prefixes, suffixes = _affixes(text)
    names = {str(n) for n in report.tensors["tensor"]} | labels
    seen: set[str] = set()
    for headers, rows in parse_tables(text):
        for j, h in enumerate(headers):
            if h in labels:
                seen.add(h)
            if h not in NAME_COLUMNS:
                continue
            for row in rows:
                assert _recovered(row[j], prefixes, suffixes, names), (h, row[j])
                seen.update(n for n in names if _recovered(row[j], prefixes, suffixes, {n}))
    missing = _names_shown(report) - seen
    assert not missing, f"names not printed recoverably: {sorted(missing)[:5]}"


@pytest.mark.parametrize("command", ["sparsity", "principal", "spectral", "consistency"])
def test_tiny_tables_are_readable_at_80_columns(tiny_reports: dict[str, Report], command: str) -> None:
    rep = tiny_reports[command]
    _check_readable(_render(rep), rep, set(LONG_LABELS))


@pytest.mark.parametrize("command", ["sparsity", "principal", "spectral", "consistency"])
def test_example_tables_are_readable_at_80_columns(example_reports: dict[str, Report], command: str) -> None:
    rep = example_reports[command]
    _check_readable(_render(rep), rep, {"rl_seed1", "rl_seed2", "sft"})


def test_cli_default_width_is_readable(tiny: tuple[str, list[str]]) -> None:
    """A redirected stdout is 80 columns wide; nothing is cut there either."""
    base, fts = tiny
    res = runner.invoke(app, ["consistency", base, *fts, "-q"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout


# ---------------------------------------------------------------------------------------------
# item 2: structural findings are what is surprising


@pytest.fixture(scope="module")
def fp32_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """fp32 base, bf16 fine-tune of every tensor; the fine-tune also lacks lm_head (a real finding)."""
    root = tmp_path_factory.mktemp("fp32")
    base = {k: v.float() for k, v in llama_like(layers=2).items()}
    ft = {k: v.to(torch.bfloat16) for k, v in _changed(base, 1).items() if k != MISSING}
    return str(save_single(base, root / "b.safetensors")), str(save_single(ft, root / "f.safetensors"))


@pytest.mark.parametrize("command", ["sparsity", "principal", "spectral"])
def test_structural_findings_are_only_the_surprises(fp32_pair: tuple[str, str], command: str) -> None:
    base, ft = fp32_pair
    run = {"sparsity": sparsity, "principal": principal_overlap, "spectral": spectral}[command]
    rep = run(base, ft, progress=False).report()  # type: ignore[operator]
    assert list(rep.structural["tensor"]) == [MISSING]
    text = " ".join(rep.summary)
    assert text.count("fp32 vs bf16") == 1, text
    if command != "sparsity":
        assert re.search(r"\b5 tensors\b[^.]*not matrices", text), text  # 4 layer norms + the final norm


def test_consistency_structural_findings(tiny_reports: dict[str, Report]) -> None:
    rep = tiny_reports["consistency"]
    assert set(rep.structural["tensor"]) == {MISSING, EXTRA}


# ---------------------------------------------------------------------------------------------
# item 3: every layer, and the rollups as CSV


@pytest.mark.parametrize("command", ["sparsity", "principal", "spectral", "consistency"])
def test_every_layer_is_shown(deep: tuple[str, list[str]], command: str) -> None:
    base, fts = deep
    rep = _reports(base, fts, k=4)[command]
    text = _render(rep)
    layer_rows = set()
    for headers, rows in parse_tables(text):
        if headers and headers[0] == "layer":
            layer_rows |= {int(r[0]) for r in rows if r[0].isdigit()}
    assert layer_rows == set(range(45))
    md = report_mod.to_markdown(rep)
    assert "| 44 |" in md


def test_rollups_csv(deep: tuple[str, list[str]], tmp_path: Path) -> None:
    base, fts = deep
    out, rows = tmp_path / "rollups.csv", tmp_path / "rows.csv"
    res = runner.invoke(app, ["principal-overlap", base, fts[0], "--k", "4", "--rollups-csv", str(out), "--csv",
                              str(rows), "-q", "--summary"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert df.columns[0] == "table"
    per_layer = df[df["table"] == "Per layer"]
    assert sorted(per_layer["layer"].astype(int)) == list(range(45))
    assert {"overlap_principal", "ratio_principal_magnitude", "energy_principal"} <= set(df.columns)
    assert rows.exists()


def test_rollups_csv_is_checked_before_the_work(deep: tuple[str, list[str]], tmp_path: Path) -> None:
    base, fts = deep
    csv = tmp_path / "rows.csv"
    res = runner.invoke(app, ["sparsity", base, fts[0], "--rollups-csv", base, "--csv", str(csv), "-q"])
    assert res.exit_code == 2 and "cannot write --rollups-csv" in res.output and "is an input" in res.output
    assert not csv.exists()
    same = tmp_path / "same.csv"
    res = runner.invoke(app, ["sparsity", base, fts[0], "--rollups-csv", str(same), "--csv", str(same), "-q"])
    assert res.exit_code == 2 and "same file" in res.output and not same.exists()


# ---------------------------------------------------------------------------------------------
# item 4: verbosity


def test_summary_prints_header_and_sentences_only(tiny: tuple[str, list[str]]) -> None:
    base, fts = tiny
    full = runner.invoke(app, ["sparsity", base, fts[0], "-q"])
    short = runner.invoke(app, ["sparsity", base, fts[0], "-q", "--summary"])
    assert full.exit_code == short.exit_code == 0, short.output
    assert "Update sparsity" in short.stdout and "comparison" in short.stdout
    assert "Per module type" in full.stdout and "Per module type" not in short.stdout
    assert "┏" not in short.stdout
    md = runner.invoke(app, ["sparsity", base, fts[0], "-q", "--summary", "-f", "md"])
    assert md.exit_code == 0 and "###" not in md.stdout and "Update sparsity" in md.stdout
    doc = json.loads(runner.invoke(app, ["sparsity", base, fts[0], "-q", "--summary", "-f", "json"]).stdout)
    assert set(doc) == {"title", "header", "summary"}
    csv = runner.invoke(app, ["sparsity", base, fts[0], "-q", "--summary", "-f", "csv"])
    assert csv.exit_code == 2 and "--summary has no CSV form" in csv.output


@pytest.mark.parametrize("command", ["sparsity", "principal-overlap", "spectral", "consistency", "report", "check"])
def test_help_shows_no_bool_metavar_and_explains_verbosity(command: str) -> None:
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0
    assert "<bool>" not in res.stdout
    flat = " ".join(res.stdout.split())
    assert "--quiet" in flat
    if command not in ("report", "check"):
        assert "--summary" in flat and "header and the summary" in flat
        assert "progress" in flat and "tables" in flat


def test_root_help_shows_no_bool_metavar() -> None:
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert "<bool>" not in res.stdout


# ---------------------------------------------------------------------------------------------
# item 5: progress


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal() -> None:
    import time

    from ckptdiff.runtime.progress import byte_progress

    stream = io.StringIO()
    with byte_progress(4 * 1024**2, "comparing", stream=stream, interval=0.05) as advance:
        advance(1024**2)
        time.sleep(0.2)
        advance(3 * 1024**2)
        time.sleep(0.1)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("ckptdiff: comparing") for line in lines)
    assert any("1.0 MiB of 4.0 MiB" in line and "/s" in line for line in lines)
    assert "4.0 MiB of 4.0 MiB" in lines[-1]
    quiet = io.StringIO()
    with byte_progress(10, "x", enabled=False, stream=quiet, interval=0.0) as advance:
        advance(10)
    assert quiet.getvalue() == ""


def test_matrix_bytes_are_reported_as_their_batch_is_processed(
    tiny: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bar follows the SVDs: a matrix's bytes count once its batch is done, not when it is read."""
    import contextlib

    import ckptdiff.engine.pipeline as P
    from ckptdiff.analyses.spectral import SpectralAnalysis

    events: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def record(total: int, label: str, enabled: bool = True, **_: Any) -> Iterator[Callable[[int], None]]:
        events.append(("total", total))
        yield lambda n: events.append(("bytes", n))

    on_batch = SpectralAnalysis.on_batch

    def batch(self: SpectralAnalysis, items: Any, stacks: Any) -> None:
        events.append(("batch", len(items)))
        on_batch(self, items, stacks)

    monkeypatch.setattr(P, "byte_progress", record)
    monkeypatch.setattr(SpectralAnalysis, "on_batch", batch)
    spectral(tiny[0], tiny[1][0], k=4, progress=True)
    total = events[0][1]
    done = 0
    for kind, n in events[1:]:
        if kind == "bytes":
            done += n
        elif kind == "batch":
            assert done < total, "every byte was reported before the last batch ran"
    assert done == total


# ---------------------------------------------------------------------------------------------
# item 6: JSON header keys


KEY = re.compile(r"^[a-z0-9_]+$")


def test_header_keys_are_snake_case_and_record_filters(tiny: tuple[str, list[str]], tmp_path: Path) -> None:
    base, fts = tiny
    filt = ["-i", "model.*", "-x", "*.extra_proj.*"]
    runs = {
        "sparsity": ["sparsity", base, fts[0]],
        "principal": ["principal-overlap", base, fts[0], "--k", "4"],
        "spectral": ["spectral", base, fts[0], "--k", "4"],
        "consistency": ["consistency", base, *fts],
        "check": ["check", base, fts[0], "-r", "sparsity >= 0"],
    }
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        res = runner.invoke(app, [*args, *filt, "--json", str(out), "-q"])
        assert res.exit_code == 0, (name, res.output)
        head = json.loads(out.read_text())["header"]
        assert all(KEY.match(k) for k in head), (name, list(head))
        assert head["include"] == "model.*" and head["exclude"] == "*.extra_proj.*", name
    head = json.loads((tmp_path / "consistency.json").read_text())["header"]
    assert head["ft_grpo_qwen3_4b_lr3e_6_seed1"].endswith("model.safetensors")


def test_check_header_names_the_rules_source(tiny: tuple[str, list[str]], tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('rules = ["sparsity >= 0"]\n')
    res = runner.invoke(app, ["check", *tiny[0:1], tiny[1][0], "--config", str(rules), "-f", "json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["header"]["rules_from"] == str(rules)


def test_report_directory_header_keys(tiny: tuple[str, list[str]], tmp_path: Path) -> None:
    base, fts = tiny
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", base, *fts[:2], "-o", str(out), "--k", "4", "-a", "sparsity,consistency",
                              "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "report.json").read_text())
    assert all(KEY.match(k) for k in doc["header"]), list(doc["header"])


# ---------------------------------------------------------------------------------------------
# item 7: spectral angles that are not measurements


def test_trivial_k_angles_are_flagged_and_not_ranked(tiny: tuple[str, list[str]]) -> None:
    r = spectral(tiny[0], tiny[1][0], k=64, progress=False)  # every matrix is at most 50x16: k capped at 16
    df = r.analysed()
    assert set(df["angles"]) == {"trivial_k"}
    assert r.most_rotated().empty
    text = " ".join(r.report().summary)
    assert "rotate most" not in text
    assert "k = min(m, n)" in text


def _degenerate_pair(tmp_path: Path) -> tuple[str, str, str, str]:
    """One matrix with σ_k ≈ σ_{k+1} (its top-k subspace swaps under a tiny update), one with a wide gap."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 24, 16, 4
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s_flat = torch.tensor([10, 9, 8, 5.00001, 5.0, *torch.linspace(4, 1, n - 5).tolist()], dtype=torch.float64)
    s_wide = torch.tensor([10, 9, 8, 7, *torch.linspace(2, 1, n - 4).tolist()], dtype=torch.float64)
    flat0, wide0 = (u * s_flat) @ v.T, (u * s_wide) @ v.T
    bump = 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    flat, wide = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    b = save_single({flat: flat0, wide: wide0}, tmp_path / "b.safetensors")
    f = save_single({flat: flat0 + bump, wide: wide0 + bump}, tmp_path / "f.safetensors")
    assert k == 4
    return str(b), str(f), flat, wide


def test_unstable_gap_is_flagged_and_check_says_why(tmp_path: Path) -> None:
    base, ft, flat, wide = _degenerate_pair(tmp_path)
    r = spectral(base, ft, k=4, progress=False)
    df = r.to_frame().set_index("tensor")
    assert df.loc[flat, "angles"] == "unstable_gap" and df.loc[wide, "angles"] == "ok"
    assert df.loc[flat, "wedin_bound_deg"] >= 45 > df.loc[wide, "wedin_bound_deg"]
    assert list(r.most_rotated()["tensor"]) == [wide]
    assert r.overall()["angle_u_deg_max"] == pytest.approx(df.loc[wide, "angle_u_max_deg"])
    res = runner.invoke(app, ["check", base, ft, "--k", "4", "-r", "angle_u_max_deg < 30", "-f", "json", "-q"])
    doc = json.loads(res.stdout)
    (rule,) = doc["rules"]
    assert res.exit_code == 0 and rule["value"] == pytest.approx(df.loc[wide, "angle_u_max_deg"], rel=1e-9)
    assert "unstable" in rule["note"] and "1 of 2" in rule["note"]
    only = runner.invoke(app, ["check", base, ft, "--k", "4", "-r", f"angle_u_max_deg@{flat} < 30", "-f", "json"])
    (rule,) = json.loads(only.stdout)["rules"]
    assert only.exit_code == 1 and rule["value"] is None and "unstable" in rule["note"]


def test_null_footnote_only_with_the_null(tiny_reports: dict[str, Report], tiny: tuple[str, list[str]]) -> None:
    without = spectral(tiny[0], tiny[1][0], k=4, progress=False).report()
    assert "*_r" not in _render(without) and "*_r" not in report_mod.to_markdown(without)
    assert "_r" in _render(tiny_reports["spectral"])


# ---------------------------------------------------------------------------------------------
# item 8: wording


def test_two_runs_read_as_one_pair_and_both_runs(tiny: tuple[str, list[str]]) -> None:
    text = " ".join(consistency(tiny[0], tiny[1][:2], progress=False).report().summary)
    assert "1 pair," in text and "1 pairs" not in text
    assert "both runs" in text and "all 2 runs" not in text


def test_null_sentence_reads(example_reports: dict[str, Report]) -> None:
    text = " ".join(example_reports["spectral"].summary)
    assert "is not smaller and rotation smaller" not in text
    assert re.search(r"tensor\(s\)|matrix\(es\)", text) is None


def test_markdown_summary_sentences_are_paragraphs(tiny_reports: dict[str, Report]) -> None:
    rep = tiny_reports["consistency"]
    md = report_mod.to_markdown(rep)
    for s in rep.summary:
        assert f"\n\n> {s}\n" in md or f"\n\n{s}\n" in md or f"\n>\n> {s}\n" in md, s


def test_spectral_json_tables_keep_full_column_names(tiny_reports: dict[str, Report]) -> None:
    doc = json.loads(report_mod.to_json(tiny_reports["spectral"]))
    per_layer = doc["tables"]["Per layer"]
    assert "angle_u_deg_max" in per_layer[0] and "ang_u_max" not in per_layer[0]
    assert not math.isnan(float(per_layer[0]["nss_max"]))
