"""``ckptdiff report``."""

from __future__ import annotations

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
    NullOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
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
        help="Subset of sparsity, principal, spectral, consistency, comma-separated or repeated (default: all that "
        "apply).",
    ),
]
PrincipalPrecisionOpt = Annotated[
    str, typer.Option("--precision", help="principal-overlap SVD dtype: fp32 or fp64 (as in principal-overlap).")
]
SpectralPrecisionOpt = Annotated[
    str, typer.Option("--spectral-precision", help="spectral SVD dtype: fp64 (default) or fp32 (as in spectral).")
]

EPILOG = (
    "Example: [bold]ckptdiff report Qwen/Qwen3-4B runs/grpo-seed1 runs/grpo-seed2 -o report/[/bold]\n\n"
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
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    as_: AsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    batch_budget: BudgetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Everything at once: every analysis in one pass, written as an HTML page, Markdown, CSV and JSON."""
    from ckptdiff.analyses.full import full_report
    from ckptdiff.render.report_dir import check_directory, write_directory

    mode = compare_mode(rtol, atol, as_)
    check_directory(out, [base, *fts])
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
        include=include or [],
        exclude=exclude or [],
        device=device,
        batch_budget=batch_budget,
        progress=not quiet,
    )
    write_directory(result, out, [base, *fts])
    with stdout_may_close():
        for heading, section in result.sections():
            typer.echo(f"{heading}:")
            for sentence in section.summary:
                typer.echo(f"  {sentence}")
        typer.echo(f"Report written to {out}/ (index.html, report.md, tensors.csv, report.json)")
