"""``ckptdiff sparsity``."""

from __future__ import annotations

from ckptdiff.cli.options import (
    VERBOSITY,
    AsOpt,
    AtolOpt,
    BaseArg,
    CsvOpt,
    DeviceOpt,
    ExcludeOpt,
    Fmt,
    FormatOpt,
    FtArg,
    IncludeOpt,
    JsonOpt,
    MergedDtypeOpt,
    QuietOpt,
    RollupsCsvOpt,
    RtolOpt,
    SummaryOpt,
    check_summary,
    compare_mode,
    emit,
    outputs,
)

EPILOG = (
    "Example (the checkpoints shipped in the repository): [bold]ckptdiff sparsity examples/checkpoints/base "
    "examples/checkpoints/rl_seed1 "
    "--csv sparsity.csv[/bold]\n\n"
    "Example (Hub ids): [bold]ckptdiff sparsity Qwen/Qwen3-4B Polaris/Polaris-4B-Preview --rtol 1e-3[/bold]\n\n"
    "Sparsity is the fraction of entries whose stored value did not change, weighted by parameter count."
    "\n\n" + VERBOSITY
)


def sparsity(
    base: BaseArg,
    ft: FtArg,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    as_: AsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    merged_dtype: MergedDtypeOpt = None,
    csv: CsvOpt = None,
    json: JsonOpt = None,
    rollups_csv: RollupsCsvOpt = None,
    fmt: FormatOpt = Fmt.table,
    summary: SummaryOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Update sparsity: which entries did the fine-tune change? Bitwise by default, bf16-aware."""
    check_summary(fmt, summary)
    with outputs([base, ft], {"--csv": csv, "--json": json, "--rollups-csv": rollups_csv}) as outs:
        from ckptdiff.analyses.sparsity import sparsity as run  # torch and pandas: after the paths are checked

        mode = compare_mode(rtol, atol, as_)
        result = run(
            base,
            ft,
            mode=mode,
            include=include or [],
            exclude=exclude or [],
            device=device,
            progress=not quiet,
            merged_dtype=merged_dtype,
        )
        emit(result.report(), fmt, outs, summary)
