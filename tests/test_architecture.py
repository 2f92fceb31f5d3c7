"""docs/architecture.md, followed once: a toy analysis added exactly as its "Adding an analysis" steps say.

The toy counts, per tensor, the entries that differ at all between base and fine-tune. It is (1) a plug-in with a
library function (here in this file; in the package, one module in ``analyses/``), (2) a CLI function, (3) one
line in the command table (``cli.app.make_app``), (4) one line in ``report``'s table (``analyses.full.REPORTED``).
The pair differs in exactly 7 entries of one tensor, so every number below is known by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from ckptdiff.analyses import full
from ckptdiff.analyses.base import Report, Table
from ckptdiff.cli.app import COMMANDS, make_app
from ckptdiff.cli.options import BaseArg, FtArg
from ckptdiff.engine.alignment import Aligned
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_pair
from ckptdiff.io.resolve import SourceLike
from ckptdiff.render.report_dir import write_directory

CHANGED = 7


# Step 1: the plug-in, its result and its library function ---------------------------------------------------------


@dataclass(frozen=True)
class ToyResult:
    header: dict[str, str]
    rows: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.rows.copy()

    def report(self) -> Report:
        total = int(self.rows["differs"].sum())
        return Report("Toy", self.header, [f"{total} entries differ."], [Table("Per tensor", self.rows)], self.rows)


class ToyAnalysis(Analysis):
    name = "toy"
    state_fields = ("counts",)

    def __init__(self, sides: tuple[int, ...] = (0, 1)) -> None:
        super().__init__(sides)
        self.counts: dict[str, int] = {}

    def form(self, item: Aligned) -> Form | None:
        return Form.CHUNKS if item.comparable else None

    def on_chunk(self, item: Aligned, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        base, ft = tensors
        self.counts[item.name] = self.counts.get(item.name, 0) + int((base != ft).sum())

    def finish(self, run: Run) -> ToyResult:
        rows = pd.DataFrame({"tensor": list(self.counts), "differs": list(self.counts.values())})
        return ToyResult(run.header("toy", self.sides), rows)


def toy(base: SourceLike, ft: SourceLike, **options: Any) -> ToyResult:
    result: ToyResult = run_pair(base, ft, ToyAnalysis(), **options)
    return result


# Step 2: the CLI function -----------------------------------------------------------------------------------------


def toy_command(base: BaseArg, ft: FtArg) -> None:
    """Count the entries that differ."""
    typer.echo(f"differs: {int(toy(base, ft, progress=False).rows['differs'].sum())}")


# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    moved = w.clone()
    moved.view(-1)[:CHANGED] += 1
    b, f = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_file({"a.weight": w, "b.weight": w.clone() * 2}, str(b))
    save_file({"a.weight": moved, "b.weight": w.clone() * 2}, str(f))
    return str(b), str(f)


def test_the_library_function_runs_the_plug_in(pair: tuple[str, str]) -> None:
    rows = toy(*pair, progress=False).to_frame().set_index("tensor")["differs"]
    assert rows.to_dict() == {"a.weight": CHANGED, "b.weight": 0}


def test_step_3_one_line_in_the_command_table(pair: tuple[str, str]) -> None:
    app = make_app((*COMMANDS, ("toy", toy_command, "Example: ckptdiff toy base ft")))
    res = CliRunner().invoke(app, ["toy", *pair])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"differs: {CHANGED}"
    bad = CliRunner().invoke(app, ["toy", pair[0], str(Path(pair[0]).parent / "missing.safetensors")])
    assert bad.exit_code == 2 and "ckptdiff: error:" in bad.stderr  # the guard came with the table line


def test_step_4_one_line_in_reports_table(
    pair: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy_line = full.Reported("toy", "Toy count", True, lambda settings, sides: ToyAnalysis(sides))
    monkeypatch.setattr(full, "REPORTED", (*full.REPORTED, toy_line))
    result = full.full_report(pair[0], [pair[1]], analyses=["sparsity", "toy"], progress=False)
    assert result.analyses == ("sparsity", "toy")
    assert [heading for heading, _ in result.sections()] == ["Sparsity", "Toy count"]
    toy_rows = result.results["toy"]["ft"].to_frame().set_index("tensor")["differs"]
    assert toy_rows.to_dict() == {"a.weight": CHANGED, "b.weight": 0}
    assert int(result.sparsity["ft"].overall()["changed"]) == CHANGED  # the built-in analysis beside it
    write_directory(result, tmp_path / "rep")
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["analyses"] == ["sparsity", "toy"] and doc["toy"]["ft"]["summary"] == [f"{CHANGED} entries differ."]
    assert "Toy count" in (tmp_path / "rep" / "index.html").read_text()
