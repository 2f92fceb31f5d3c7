"""``ckptdiff report``."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Annotated

import typer

from ckptdiff.cli.options import (
    AlphaOpt,
    AsOpt,
    AtolOpt,
    BaseArg,
    BudgetOpt,
    DeviceOpt,
    ExcludeOpt,
    FtsArg,
    IncludeOpt,
    LabelOpt,
    MergedDtypeOpt,
    NullDrawsOpt,
    NullOpt,
    PrincipalPrecisionOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
    SpectralPrecisionOpt,
    SvdOpt,
    compare_mode,
    stdout_may_close,
)

OutOpt = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="Directory to write (new, empty, or an earlier report's, which is replaced whole)."
    ),
]
AnalysesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--analyses",
        "-a",
        help="Subset of sparsity, principal (or principal-overlap), spectral, consistency, comma-separated or repeated "
        "(default: all that apply).",
    ),
]

EPILOG = (
    "Example (the checkpoints shipped in the repository): [bold]ckptdiff report examples/checkpoints/base "
    "examples/checkpoints/rl_seed1 "
    "examples/checkpoints/rl_seed2 -o report/ --k 16[/bold]\n\n"
    "Example (Hub ids): [bold]ckptdiff report Qwen/Qwen3-4B runs/grpo-seed1 -a sparsity,spectral -o report/[/bold]\n\n"
    "Runs sparsity, principal-overlap and spectral for every fine-tune (and consistency across them when there are "
    "two or more) in one pass over the checkpoints, and writes index.html (self-contained), report.md with "
    "figures/, tensors.csv (one row per tensor and fine-tune, the single commands' columns) and report.json."
)


ReportKOpt = Annotated[
    int | None,
    typer.Option(
        "--k",
        help="Top-k singular directions (capped at min(m, n)). Default: 64 for principal-overlap; spectral chooses "
        "k per matrix (the largest k <= 64 whose gap is stable).",
    ),
]


def report(
    base: BaseArg,
    fts: FtsArg,
    out: OutOpt,
    analyses: AnalysesOpt = None,
    label: LabelOpt = None,
    k: ReportKOpt = None,
    alpha: AlphaOpt = 0.5,
    svd: SvdOpt = "auto",
    precision: PrincipalPrecisionOpt = "fp32",
    spectral_precision: SpectralPrecisionOpt = "fp64",
    null: NullOpt = "none",
    seed: SeedOpt = 0,
    null_draws: NullDrawsOpt = 1,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    as_: AsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    merged_dtype: MergedDtypeOpt = None,
    batch_budget: BudgetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Everything at once: every analysis in one pass, written as an HTML page, Markdown, CSV and JSON."""
    from ckptdiff.cli.options import inputs_exist
    from ckptdiff.render.report_dir import check_directory, write_directory

    inputs_exist([base, *fts])
    check_directory(out, [base, *fts])
    from ckptdiff.analyses.full import full_report  # torch and pandas: after the paths are checked
    from ckptdiff.render.terminal import print_verdict

    mode = compare_mode(rtol, atol, as_)
    chosen = [a.strip() for given in analyses for a in given.split(",") if a.strip()] if analyses else None
    result = full_report(
        base,
        fts,
        labels=label or None,
        analyses=chosen,
        mode=mode,
        k=k,
        alpha=alpha,
        svd=svd,
        principal_precision=precision,
        spectral_precision=spectral_precision,
        null=null,
        seed=seed,
        null_draws=null_draws,
        include=include or [],
        exclude=exclude or [],
        device=device,
        merged_dtype=merged_dtype,
        batch_budget=batch_budget,
        progress=not quiet,
    )
    write_directory(result, out, [base, *fts])
    with stdout_may_close():
        width = shutil.get_terminal_size().columns  # COLUMNS when set, else the terminal's, else 80
        side = result.comparison()
        print_verdict(result.verdict(), side.table("\n") if side.rows else None)
        for heading, section in result.sections():
            typer.echo(f"{heading}:")
            for sentence in section.summary:  # wrapped between words, never mid-word
                typer.echo(textwrap.fill(sentence, width, initial_indent="  ", subsequent_indent="    "))
        typer.echo(textwrap.fill(f"Report written to {out}/ (index.html, report.md, tensors.csv, report.json)", width))
