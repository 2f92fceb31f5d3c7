"""``ckptdiff spectral``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptdiff.cli.options import (
    VERBOSITY,
    AsOpt,
    BaseArg,
    BudgetOpt,
    CsvOpt,
    DeviceOpt,
    ExcludeOpt,
    Fmt,
    FormatOpt,
    FtArg,
    IncludeOpt,
    JsonOpt,
    MergedDtypeOpt,
    NullDrawsOpt,
    NullOpt,
    QuietOpt,
    RollupsCsvOpt,
    SeedOpt,
    SummaryOpt,
    check_summary,
    compare_mode,
    emit,
    outputs,
)

EPILOG = (
    "Example (the checkpoints shipped in the repository): [bold]ckptdiff spectral examples/checkpoints/base "
    "examples/checkpoints/rl_seed1 "
    "--k 16 --null random --csv spectral.csv[/bold]\n\n"
    "Example (Hub ids): [bold]ckptdiff spectral Qwen/Qwen3-4B Polaris/Polaris-4B-Preview --k 64[/bold]\n\n"
    "Per 2-D matrix: NSS over the full spectrum, top-k singular value changes, principal angles between the top-k "
    "left and right subspaces, the base's spectral gap, and norms of the update. --null random adds the same "
    "metrics for an equal-norm Gaussian update, so a small drift can be told apart from a small update."
    "\n\n" + VERBOSITY
)


# Values are checked by the library, which answers a bad one with a one-line error (exit 2).
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        metavar="<fp64|fp32>",
        help="SVD dtype, fp32 or fp64; fp32 is too coarse for small RL-size updates.",
    ),
]
SpectralKOpt = Annotated[
    int | None,
    typer.Option(
        "--k",
        help="Top-k singular directions for the angles (capped at min(m, n)). Default: per matrix, the largest "
        "k <= 64 whose gap is stable (Wedin bound < 45 degrees).",
    ),
]
SpectralSvdOpt = Annotated[
    str,
    typer.Option(
        "--svd",
        help="auto: on large matrices, top-k vectors by randomized top-k + fp64 Rayleigh-Ritz, checked per matrix "
        "(exact SVD where the check fails; the header counts both); exact: a full SVD per matrix; randomized: the "
        "checked fast path at every size.",
    ),
]
IntruderKOpt = Annotated[
    int, typer.Option("--intruder-k", help="Intruder dimensions: how many top fine-tune left singular vectors to test.")
]
IntruderEpsOpt = Annotated[
    float,
    typer.Option("--intruder-eps", help="Intruder dimensions: a vector whose max |cos| with the base is below this."),
]
IntruderBaseKOpt = Annotated[
    int | None,
    typer.Option(
        "--intruder-base-k", help="Intruder dimensions: test against the base's top K left vectors (default: all)."
    ),
]
SpectraOpt = Annotated[
    Path | None,
    typer.Option("--save-spectra", help="Write σ of both sides per matrix (fp64 safetensors) to this file."),
]


def spectral(
    base: BaseArg,
    ft: FtArg,
    k: SpectralKOpt = None,
    precision: PrecisionOpt = "fp64",
    svd: SpectralSvdOpt = "auto",
    intruder_k: IntruderKOpt = 10,
    intruder_eps: IntruderEpsOpt = 0.5,
    intruder_base_k: IntruderBaseKOpt = None,
    null: NullOpt = "none",
    seed: SeedOpt = 0,
    null_draws: NullDrawsOpt = 1,
    as_: AsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    merged_dtype: MergedDtypeOpt = None,
    batch_budget: BudgetOpt = None,
    save_spectra: SpectraOpt = None,
    csv: CsvOpt = None,
    json: JsonOpt = None,
    rollups_csv: RollupsCsvOpt = None,
    fmt: FormatOpt = Fmt.table,
    summary: SummaryOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Spectral drift and principal-subspace rotation of every weight matrix, with equal-norm random controls."""
    check_summary(fmt, summary)
    files = {"--save-spectra": save_spectra, "--csv": csv, "--json": json, "--rollups-csv": rollups_csv}
    with outputs([base, ft], files) as outs:
        from ckptdiff.analyses.spectral import FP32_WARNING  # torch: after the paths are checked
        from ckptdiff.analyses.spectral import spectral as run

        mode = compare_mode(None, None, as_)
        if precision == "fp32":
            typer.echo(f"ckptdiff: warning: {FP32_WARNING}", err=True)
        result = run(
            base,
            ft,
            k=k,
            precision=precision,
            svd=svd,
            intruder_k=intruder_k,
            intruder_eps=intruder_eps,
            intruder_base_k=intruder_base_k,
            null=null,
            seed=seed,
            null_draws=null_draws,
            as_dtype=mode.as_dtype,
            include=include or [],
            exclude=exclude or [],
            device=device,
            merged_dtype=merged_dtype,
            batch_budget=batch_budget,
            save_spectra=outs.get("--save-spectra"),
            progress=not quiet,
        )
        emit(result.report(), fmt, outs, summary)
