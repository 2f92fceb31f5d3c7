"""``ckptdiff consistency``."""

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
    FtsArg,
    IncludeOpt,
    JsonOpt,
    LabelOpt,
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
    "Example (the checkpoints shipped in the repository): [bold]ckptdiff consistency examples/checkpoints/base "
    "examples/checkpoints/rl_seed1 "
    "examples/checkpoints/rl_seed2 examples/checkpoints/sft -l rl1 -l rl2 -l sft --csv pairs.csv[/bold]\n\n"
    "Jaccard of every pair of update masks, against the random baseline pq/(p+q-pq) and the magnitude-matched "
    "baseline (Metrics §2b in the docs); the CSV has one row per tensor and pair of runs."
    "\n\n" + VERBOSITY
)


def consistency(
    base: BaseArg,
    fts: FtsArg,
    label: LabelOpt = None,
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
    """Consistency across runs: do several fine-tunes of one base change the same entries?"""
    check_summary(fmt, summary)
    with outputs([base, *fts], {"--csv": csv, "--json": json, "--rollups-csv": rollups_csv}) as outs:
        from ckptdiff.analyses.compare import across_runs
        from ckptdiff.analyses.consistency import consistency as run  # torch: after the paths are checked

        mode = compare_mode(rtol, atol, as_)
        result = run(
            base,
            fts,
            labels=label or None,
            mode=mode,
            include=include or [],
            exclude=exclude or [],
            device=device,
            merged_dtype=merged_dtype,
            progress=not quiet,
        )
        rep = result.report()
        side = across_runs(result)
        if side.rows:  # the fine-tunes side by side first, as report opens
            rep.tables.insert(0, side.table("\n" if fmt == Fmt.table else " "))
        emit(rep, fmt, outs, summary)
