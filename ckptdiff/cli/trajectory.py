"""``ckptdiff trajectory``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptdiff.cli.options import (
    VERBOSITY,
    AlphaOpt,
    AsOpt,
    AtolOpt,
    CsvOpt,
    DeviceOpt,
    ExcludeOpt,
    Fmt,
    FormatOpt,
    IncludeOpt,
    JsonOpt,
    KOpt,
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

CheckpointsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="CKPT...",
        help="A run's checkpoints in order (files, folders, Hub ids org/name@rev), or a folder of step-numbered "
        "checkpoints (checkpoint-N, global_step_N/actor/huggingface, ...), or a quoted glob.",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Also write a report directory (index.html, report.md, figures/, steps.csv, tensors.csv, report.json): "
        "new, empty, or an earlier report's, which is replaced whole.",
    ),
]
WithOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--with",
        help="Also measure, per step from the first checkpoint: principal (overlap ratio vs random and "
        "magnitude-matched baselines), spectral (NSS); comma-separated or repeated. Reads matrices whole.",
    ),
]
StepsCsvOpt = Annotated[
    Path | None, typer.Option("--steps-csv", help="Write the per-step rows (overall, then per module type) as CSV.")
]

EPILOG = (
    "Example: [bold]ckptdiff trajectory examples/checkpoints/rl_seed1/steps[/bold] (the shipped run's saved steps, "
    "in step order)\n\n"
    "[bold]ckptdiff trajectory runs/grpo/ -o trajectory/[/bold] (every checkpoint-N inside, in step order)"
    "\n\n"
    "For each step k: update sparsity from checkpoint k-1 to k (step over step) and from the first checkpoint to k "
    "(cumulative), their bf16 view for fp32 weights, the ULP histogram, and the bytes of a sparse patch from k-1 "
    "to k; each checkpoint is read once.\n\n" + VERBOSITY
)


def trajectory(
    checkpoints: CheckpointsArg,
    out: OutOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    as_: AsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    with_: WithOpt = None,
    k: KOpt = 64,
    alpha: AlphaOpt = 0.5,
    svd: SvdOpt = "auto",
    device: DeviceOpt = "auto",
    csv: CsvOpt = None,
    steps_csv: StepsCsvOpt = None,
    json: JsonOpt = None,
    rollups_csv: RollupsCsvOpt = None,
    fmt: FormatOpt = Fmt.table,
    summary: SummaryOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """A training run over time: which weights changed at each step, and since the first checkpoint?"""
    from ckptdiff.io.layout import run_checkpoints
    from ckptdiff.render.report_dir import check_directory, write_trajectory

    check_summary(fmt, summary)
    chosen = [w.strip() for given in with_ for w in given.split(",") if w.strip()] if with_ else []
    unknown = [w for w in chosen if w not in ("principal", "spectral")]
    if unknown:
        from ckptdiff.errors import InputError

        raise InputError(f"--with: unknown analysis {unknown[0]!r}; choose from principal, spectral")
    expanded = run_checkpoints(checkpoints)
    if len(expanded) < 2:
        from ckptdiff.errors import InputError

        raise InputError(
            f"trajectory needs at least 2 checkpoints of a run, got {len(expanded)} ({checkpoints[0]}); pass them "
            "in order, or a folder of step-numbered checkpoints"
        )
    specs = [p for p, _ in expanded]
    if out is not None:
        check_directory(out, specs)
    files = {"--csv": csv, "--steps-csv": steps_csv, "--json": json, "--rollups-csv": rollups_csv}
    with outputs(specs, files) as outs:
        from ckptdiff.analyses.trajectory import trajectory as run  # torch: after the paths are checked

        mode = compare_mode(rtol, atol, as_)

        result = run(
            specs,
            steps=[s for _, s in expanded],
            mode=mode,
            include=include or [],
            exclude=exclude or [],
            with_=chosen,
            k=k,
            alpha=alpha,
            svd=svd,
            device=device,
            progress=not quiet,
        )
        target = outs.get("--steps-csv")
        if target is not None:
            target.write(result.steps_frame().to_csv(index=False))
        if out is not None:
            write_trajectory(result, out, specs)
        emit(result.report(), fmt, outs, summary)
        if out is not None and fmt is Fmt.table:
            typer.echo(f"Report written to {out}/ (index.html, report.md, steps.csv, tensors.csv, report.json)")
