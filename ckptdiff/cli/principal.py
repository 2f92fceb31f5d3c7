"""``ckptdiff principal-overlap``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptdiff.cli.options import (
    VERBOSITY,
    AlphaOpt,
    AsOpt,
    AtolOpt,
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
    KOpt,
    MergedDtypeOpt,
    QuietOpt,
    RollupsCsvOpt,
    RtolOpt,
    SummaryOpt,
    SvdOpt,
    check_summary,
    compare_mode,
    emit,
    outputs,
)

PrecisionOpt = Annotated[
    str, typer.Option("--precision", metavar="<fp32|fp64>", help="SVD computation dtype: fp32 or fp64 (never bf16).")
]
SaveMasksOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-masks",
        help="Write <tensor>.principal/.low/.update masks to this safetensors file, bit-packed uint8 along rows "
        "(numpy.packbits(axis=-1, bitorder='big')); metadata 'shapes' gives each (m, n).",
    ),
]

EPILOG = (
    "Example (the checkpoints shipped in the repository): [bold]ckptdiff principal-overlap examples/checkpoints/base "
    "examples/checkpoints/rl_seed1 --k 16 --csv principal.csv[/bold]\n\n"
    "Example (Hub ids): [bold]ckptdiff principal-overlap Qwen/Qwen3-4B Polaris/Polaris-4B-Preview --svd "
    "exact[/bold]\n\n"
    "Overlap of the update mask with the principal weights (top α of |rank-k W0|) and the low-magnitude weights "
    "(bottom α of |W0|), against the random baseline α and the magnitude-matched baseline (Metrics §2, §2b in the "
    "docs)."
    "\n\n" + VERBOSITY
)


def principal_overlap(
    base: BaseArg,
    ft: FtArg,
    k: KOpt = 64,
    alpha: AlphaOpt = 0.5,
    svd: SvdOpt = "auto",
    precision: PrecisionOpt = "fp32",
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    as_: AsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    merged_dtype: MergedDtypeOpt = None,
    batch_budget: BudgetOpt = None,
    save_masks: SaveMasksOpt = None,
    csv: CsvOpt = None,
    json: JsonOpt = None,
    rollups_csv: RollupsCsvOpt = None,
    fmt: FormatOpt = Fmt.table,
    summary: SummaryOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Principal-weight overlap: does the update avoid the base's principal weights, beyond what its size explains?"""
    check_summary(fmt, summary)
    files = {"--save-masks": save_masks, "--csv": csv, "--json": json, "--rollups-csv": rollups_csv}
    with outputs([base, ft], files) as outs:
        from ckptdiff.analyses.principal import principal_overlap as run  # torch: after the paths are checked

        mode = compare_mode(rtol, atol, as_)
        result = run(
            base,
            ft,
            k=k,
            alpha=alpha,
            svd=svd,
            precision=precision,
            mode=mode,
            include=include or [],
            exclude=exclude or [],
            device=device,
            merged_dtype=merged_dtype,
            batch_budget=batch_budget,
            save_masks=outs.get("--save-masks"),
            progress=not quiet,
        )
        emit(result.report(), fmt, outs, summary)
