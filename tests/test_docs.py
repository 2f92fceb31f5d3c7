"""The documentation says what the code does: column tables, the check metric table, the README's front door.

Each per-tensor column table of docs/outputs.md sits under a ``<!-- columns: COMMAND -->`` marker; its first
cell names the columns (in backticks, several to a cell when comma-separated). The tests run each library
function on a tiny pair built here and compare the frame's columns with the table, names and order: a column the
code adds without the docs, or the docs keep after the code dropped it, fails. The metric table of docs/check.md
is the code's declarations (``ckptdiff.analyses.scopes.GATES``) row for row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import ckptdiff

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 12_000
FRESH_MACHINE = (
    "pip install torch==2.13.0 -e . && ckptdiff sparsity examples/checkpoints/base examples/checkpoints/rl_seed1",
    "pip install torch==2.13.0 -e '.[test]' && python -m pytest",
)
NULL_ONLY = "only with `--null random`"  # how outputs.md marks the spectral columns a null adds
IDENTIFIER = re.compile(r"[a-z][a-z0-9_]*")
CODE_SPAN = re.compile(r"`([^`\n]*)`")


# ---------------------------------------------------------------------------------------------
# Reading the Markdown


def split_row(line: str) -> list[str]:
    """The cells of one table row: ``|`` separates them, except escaped (``\\|``) or inside a code span."""
    cells, cell, in_code, i = [], "", False, 0
    body = line.strip().removeprefix("|").removesuffix("|")
    while i < len(body):
        ch = body[i]
        if ch == "\\" and body[i + 1 : i + 2] == "|":
            cell, i = cell + "|", i + 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    return [*cells, cell.strip()]


def table_after(text: str, marker: str) -> list[list[str]]:
    """The body rows of the Markdown table that follows ``<!-- marker -->`` (header and rule dropped)."""
    tag = f"<!-- {marker} -->"
    assert text.count(tag) == 1, f"expected exactly one {tag!r} marker"
    lines = text.split(tag, 1)[1].lstrip("\n").split("\n")
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(split_row(line))
    assert len(rows) > 2, f"no table after {tag!r}"
    return rows[2:]


def names_in(cell: str) -> list[str]:
    """Column names in a cell: each code span, split at commas (```a, b`` or ``a``, ``b``)."""
    return [name.strip() for span in CODE_SPAN.findall(cell) for name in span.split(",") if name.strip()]


def documented(marker: str, *, drop_null: bool = False) -> list[str]:
    """The columns a docs/outputs.md table lists, in order (without the null's, when asked)."""
    rows = table_after((DOCS / "outputs.md").read_text(encoding="utf-8"), f"columns: {marker}")
    return [name for row in rows if not (drop_null and NULL_ONLY in row[1]) for name in names_in(row[0])]


# ---------------------------------------------------------------------------------------------
# The code's columns, from a tiny pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A base and two fine-tunes with a matrix in a block, a norm and an embedding: every kind of row."""
    folder = tmp_path_factory.mktemp("docs_pair")
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(24, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
    }
    paths = []
    for name, scale in (("base", 0.0), ("ft1", 0.05), ("ft2", 0.08)):
        sd = {k: (v + scale * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        path = folder / f"{name}.safetensors"
        save_file(sd, str(path))
        paths.append(str(path))
    return paths[0], paths[1], paths[2]


RUNS: dict[str, Callable[[str, str, str], pd.DataFrame]] = {
    "sparsity": lambda b, f, _: ckptdiff.sparsity(b, f, progress=False).to_frame(),
    "principal-overlap": lambda b, f, _: ckptdiff.principal_overlap(b, f, k=2, progress=False).to_frame(),
    "spectral": lambda b, f, _: ckptdiff.spectral(b, f, k=2, null="random", progress=False).to_frame(),
    "consistency": lambda b, f1, f2: ckptdiff.consistency(b, [f1, f2], progress=False).to_frame(),
    "patch": lambda b, f, _: ckptdiff.patch_size(b, f, progress=False).to_frame(),
}


@pytest.mark.parametrize("command", list(RUNS))
def test_column_table_is_what_the_command_writes(command: str, pair: tuple[str, str, str]) -> None:
    got = list(RUNS[command](*pair).columns)
    want = documented(command)
    missing, stale = [c for c in got if c not in want], [c for c in want if c not in got]
    assert not missing, f"docs/outputs.md, {command} table: add rows for {missing}"
    assert not stale, f"docs/outputs.md, {command} table: {stale} are not columns of the CSV any more"
    assert want == got, f"docs/outputs.md, {command} table: list the columns in the CSV's order, {got}"


def test_trajectory_column_tables_are_what_it_writes(pair: tuple[str, str, str]) -> None:
    result = ckptdiff.trajectory(list(pair), progress=False)
    assert list(result.to_frame().columns) == documented("trajectory"), "docs/outputs.md, trajectory table"
    rows = table_after((DOCS / "outputs.md").read_text(encoding="utf-8"), "columns: trajectory-steps")
    plain = [n for row in rows if "only with `--with" not in row[1] for n in names_in(row[0])]
    assert list(result.steps_frame().columns) == plain, "docs/outputs.md, steps.csv table"
    both = ckptdiff.trajectory(list(pair), with_=["principal", "spectral"], k=2, progress=False)
    assert list(both.steps_frame().columns) == documented("trajectory-steps"), "mark --with columns 'only with `--with'"


def test_spectral_without_null_drops_only_the_null_columns(pair: tuple[str, str, str]) -> None:
    base, ft, _ = pair
    got = list(ckptdiff.spectral(base, ft, k=2, progress=False).to_frame().columns)
    assert got == documented("spectral", drop_null=True), f"mark the columns --null random adds '{NULL_ONLY}'"


def test_report_tensors_csv_holds_only_documented_columns(pair: tuple[str, str, str]) -> None:
    """tensors.csv: the three tables' columns, a leading ``run``, and clashing names prefixed by their analysis."""
    base, ft1, ft2 = pair
    frame = ckptdiff.full_report(base, [ft1, ft2], k=2, null="random", progress=False).tensors()
    tables = {"sparsity": "sparsity", "principal": "principal-overlap", "spectral": "spectral"}
    known = {"run"} | {c for marker in tables.values() for c in documented(marker)}
    known |= {f"{prefix}_{c}" for prefix, marker in tables.items() for c in documented(marker)}
    unknown = [c for c in frame.columns if c not in known]
    assert not unknown, f"tensors.csv columns no table of docs/outputs.md lists: {unknown}"
    assert frame.columns[0] == "run"


# ---------------------------------------------------------------------------------------------
# docs/check.md: the metric table is the declarations


def gate_rows() -> list[list[str]]:
    """The rows docs/check.md's metric table must have, from the code's declarations."""
    from ckptdiff.analyses.scopes import GATES

    return [[f"`{name}`", metric.analysis, metric.aggregation] for name, metric in GATES.items()]


def test_check_metric_table_is_the_declarations() -> None:
    got = table_after((DOCS / "check.md").read_text(encoding="utf-8"), "metrics: check")
    want = gate_rows()
    table = "\n".join("| " + " | ".join(row) + " |" for row in want)
    assert got == want, f"docs/check.md's metric table is stale; its rows should read:\n{table}"


# ---------------------------------------------------------------------------------------------
# docs/metrics.md: every column it names exists


def metrics_md_mentions() -> list[tuple[str, str]]:
    """(command, column) for every column metrics.md names in a "CSV columns" list or table column."""
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    found: list[tuple[str, str]] = []
    for paragraph in text.split("\n\n"):
        for part in paragraph.split("**CSV columns** (")[1:]:
            command, rest = part.split(")", 1)
            found += [(command.strip("`"), n) for span in CODE_SPAN.findall(rest) for n in span.split(", ")]
    for section in re.split(r"\n## ", text):
        named = re.search(r"Command: `ckptdiff ([a-z-]+)", section)
        for block in section.split("\n\n"):
            lines = [line for line in block.split("\n") if line.startswith("|")]
            if named is None or len(lines) < 3 or not split_row(lines[0])[-1].startswith("CSV column"):
                continue
            found += [(named.group(1), n) for line in lines[2:] for n in names_in(split_row(line)[-1])]
    return [(c, n) for c, n in found if IDENTIFIER.fullmatch(n)]


def test_metrics_md_names_only_real_columns(pair: tuple[str, str, str]) -> None:
    mentions = metrics_md_mentions()
    assert {c for c, _ in mentions} == set(RUNS), "metrics.md should name CSV columns of every command"
    columns = {command: set(run(*pair).columns) for command, run in RUNS.items()}
    wrong = sorted({(c, n) for c, n in mentions if n not in columns[c]})
    assert not wrong, f"docs/metrics.md names columns the commands do not write: {wrong}"


# ---------------------------------------------------------------------------------------------
# The README: a short front door that opens with the two commands and links to files that exist


def test_readme_is_short() -> None:
    size = len(README.read_text(encoding="utf-8"))
    assert size < README_LIMIT, f"README.md has {size:,} characters; move detail to docs/ (limit {README_LIMIT:,})"


def test_readme_opens_with_the_two_fresh_machine_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), flags=re.S)
    assert tuple(blocks[:2]) == FRESH_MACHINE


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a Markdown page's headings (lowercased, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    assert targets, "the README links to no file"
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    anchored = [t.split("#", 1) for t in targets if "#" in t]
    broken = [f"{path}#{anchor}" for path, anchor in anchored if anchor not in github_anchors(ROOT / path)]
    assert not broken, f"README.md links to headings that do not exist: {broken}"


# ---------------------------------------------------------------------------------------------
# docs/inputs.md: the naming rule tables are naming.py's


@pytest.mark.parametrize("marker", ["stacks", "modules"])
def test_naming_rule_tables_are_naming_py(marker: str) -> None:
    from ckptdiff.naming import MODULE_RULES, STACK_RULES

    rules = STACK_RULES if marker == "stacks" else MODULE_RULES
    got = table_after((DOCS / "inputs.md").read_text(encoding="utf-8"), f"rules: {marker}")
    want = [[f"`{r.label}`", ", ".join(f"`{p}`" for p in r.parts), r.where, r.seen_in] for r in rules]
    assert got == want, f"docs/inputs.md 'rules: {marker}' table: print ckptdiff.naming's rows, in order"
