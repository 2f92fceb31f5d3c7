"""``ckptdiff patch create|apply|verify|size``: the update as an artifact (docs/patches.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from ckptdiff.cli.guard import handle_errors
from ckptdiff.cli.options import (
    BaseArg,
    CsvOpt,
    Fmt,
    FormatOpt,
    FtArg,
    JsonOpt,
    QuietOpt,
    SummaryOpt,
    check_summary,
    emit,
    inputs_exist,
    outputs,
    stdout_may_close,
)

EPILOG = (
    "Example: [bold]ckptdiff patch size examples/checkpoints/base examples/checkpoints/rl_seed1[/bold] (what a patch "
    "would cost)\n\n"
    "[bold]ckptdiff patch create Qwen/Qwen3-4B Polaris/Polaris-4B-Preview -o step.patch.safetensors[/bold]"
    "\n\nA patch holds, for every tensor whose stored bytes changed, the changed entries (flat indices or a bitmask, "
    "and the fine-tune's values as stored) or the whole tensor, whichever is smallest; applying it to the base "
    "rebuilds the fine-tune bit for bit. Its layout: the Patches page of the docs."
)

PatchOut = Annotated[
    Path,
    typer.Option("--out", "-o", help="The patch file to write (.safetensors), or its folder with --max-shard-size."),
]
CheckpointOut = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Where the rebuilt checkpoint goes: a new or empty folder (sharded like the fine-tune, with its index), "
        "or one .safetensors file.",
    ),
]

app = typer.Typer(
    name="patch",
    help="Sparse patches that rebuild a fine-tune bit for bit: create, apply, verify, size.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


MaxShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        help="Write the patch as a folder of shards of at most this size each (e.g. 5GB, 500MiB, or bytes) with "
        "their index; --out is then a new or empty folder. Default: one file.",
    ),
]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS |= {"GIB": 2**30, "TIB": 2**40}


def shard_bytes(text: str | None) -> int | None:
    """--max-shard-size as bytes: a positive number with an optional unit (KB, MB, GB, TB, KiB, MiB, GiB, TiB)."""
    if text is None:
        return None
    from ckptdiff.errors import InputError

    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        value = -1.0
    if not 1 <= value < math.inf:
        raise InputError(f"--max-shard-size {text!r} is not a size; give e.g. 5GB, 500MiB or a number of bytes")
    return int(value)


def create(
    base: BaseArg,
    ft: FtArg,
    out: PatchOut,
    max_shard_size: MaxShardOpt = None,
    csv: CsvOpt = None,
    json: JsonOpt = None,
    fmt: FormatOpt = Fmt.table,
    summary: SummaryOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the patch that rebuilds FT from BASE bit for bit, in one streamed pass over the stored tensors."""
    from ckptdiff.io.outputs import Output, OutputFolder

    check_summary(fmt, summary)
    most = shard_bytes(max_shard_size)
    files = {"--csv": csv, "--json": json} | ({} if most else {"--out": out})
    with outputs([base, ft], files) as outs:
        from ckptdiff.analyses.patch import patch_create  # torch: after the paths are checked

        target: Output | OutputFolder | None = OutputFolder("--out", out, [base, ft]) if most else outs.get("--out")
        assert target is not None
        try:
            result = patch_create(base, ft, target, max_shard_bytes=most, progress=not quiet)
            if isinstance(target, OutputFolder):
                target.commit()
        except BaseException:
            if isinstance(target, OutputFolder):
                target.discard()
            raise
        emit(result.report(), fmt, outs, summary)


def size(
    base: BaseArg,
    ft: FtArg,
    csv: CsvOpt = None,
    json: JsonOpt = None,
    fmt: FormatOpt = Fmt.table,
    summary: SummaryOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The bytes a patch of FT against BASE would take, per tensor, per module type and overall; nothing written."""
    check_summary(fmt, summary)
    with outputs([base, ft], {"--csv": csv, "--json": json}) as outs:
        from ckptdiff.analyses.patch import patch_size  # torch: after the paths are checked

        result = patch_size(base, ft, progress=not quiet)
        emit(result.report(), fmt, outs, summary)


def apply(
    base: BaseArg,
    patches: Annotated[list[str], typer.Argument(metavar="PATCH...", help="Patch files, in the order they were made.")],
    out: CheckpointOut,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild the fine-tune from BASE and PATCH (or a chain PATCH1 PATCH2 ...), every tensor's sha256 checked."""
    inputs_exist([base, *patches])
    from ckptdiff.analyses.patch import patch_apply  # torch: after the paths are checked

    result = patch_apply(base, patches, out, progress=not quiet)
    with stdout_may_close():
        typer.echo(
            f"Wrote {result.path}: {result.tensors} tensors, {result.nbytes:,} bytes in {len(result.files)} "
            f"file(s); every tensor's sha256 equals the fine-tune's."
        )


def verify(
    args: Annotated[
        list[str],
        typer.Argument(metavar="BASE PATCH... FT", help="The base, the patch chain in order, and the fine-tune."),
    ],
    quiet: QuietOpt = False,
) -> None:
    """Exit 0 if applying PATCH to BASE gives FT bit for bit, 1 if not; nothing is written."""
    from ckptdiff.errors import InputError

    if len(args) < 3:
        raise InputError("patch verify needs BASE, at least one PATCH and FT; see 'ckptdiff patch verify --help'")
    base, patches, ft = args[0], args[1:-1], args[-1]
    inputs_exist(args)
    from ckptdiff.analyses.patch import patch_verify  # torch: after the paths are checked

    result = patch_verify(base, patches, ft, progress=not quiet)
    with stdout_may_close():
        if result.same:
            typer.echo(f"Same: applying the patch to {base} gives {ft} bit for bit ({result.tensors} tensors).")
        else:
            typer.echo(
                f"Differs: applying the patch to {base} does not give {ft}: tensor {result.first!r}: {result.why}."
            )
    if not result.same:
        raise typer.Exit(1)


for _name, _fn in (("create", create), ("apply", apply), ("verify", verify), ("size", size)):
    app.command(_name)(handle_errors(_fn))
