"""``ckptdiff check``: a yes/no release gate with a reason. Exit 0 all rules pass, 1 a rule fails, 2 bad input."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ckptdiff.cli.options import (
    AlphaOpt,
    AsOpt,
    AtolOpt,
    BaseArg,
    DeviceOpt,
    ExcludeOpt,
    FtArg,
    IncludeOpt,
    JsonOpt,
    MergedDtypeOpt,
    NullOpt,
    PrincipalPrecisionOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
    SpectralPrecisionOpt,
    SvdOpt,
    compare_mode,
    outputs,
    stdout_may_close,
)

if TYPE_CHECKING:
    from ckptdiff.gate.check import GateResult

EPILOG = (
    "Example (the checkpoints shipped in the repository): [bold]ckptdiff check examples/checkpoints/base "
    "examples/checkpoints/rl_seed1 "
    "--rule 'sparsity >= 0.1' --rule 'changed@*norm* == 0' --same-structure[/bold]\n\n"
    "Example: [bold]ckptdiff check examples/checkpoints/base examples/checkpoints/rl_seed1 --config "
    "examples/ci/rules.toml --format md "
    ">> $GITHUB_STEP_SUMMARY[/bold]\n\n"
    "A rule is METRIC\\[@GLOB] OP VALUE; the glob matches full tensor names. Without --config, a "
    "\\[tool.ckptdiff] table in ./pyproject.toml is read when present. "
    "Exit codes: 0 every rule passes, 1 a rule fails, 2 bad input or usage."
)


class CheckFmt(str, Enum):
    """Stdout formats of ``check``."""

    table = "table"
    md = "md"
    json = "json"


RuleOpt = Annotated[
    list[str] | None,
    typer.Option("--rule", "-r", help="A rule 'METRIC[@GLOB] OP VALUE', e.g. 'sparsity >= 0.5' (repeatable)."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML rules file (rules = [...], same_keys = true, ...).")
]
ExpectUnchangedOpt = Annotated[
    list[str] | None,
    typer.Option("--expect-unchanged", help="Glob of tensors that must be bit-identical (repeatable)."),
]
AllowChangedOpt = Annotated[
    list[str] | None,
    typer.Option("--allow-changed", help="Glob of tensors allowed to change; all others must not (repeatable)."),
]
SameKeysOpt = Annotated[bool, typer.Option("--same-keys", help="Both checkpoints hold the same tensor names.")]
SameShapesOpt = Annotated[bool, typer.Option("--same-shapes", help="No tensor changed shape.")]
SameDtypesOpt = Annotated[bool, typer.Option("--same-dtypes", help="No tensor changed dtype.")]
SameParamsOpt = Annotated[
    bool, typer.Option("--same-param-count", help="Both checkpoints hold the same number of parameters.")
]
StructureOpt = Annotated[
    bool,
    typer.Option("--same-structure", help="Shorthand for --same-keys --same-shapes --same-dtypes --same-param-count."),
]
HeaderOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--header-only",
        help="Check structure from safetensors headers alone (a Hub id fetches only its headers); no tensor data.",
    ),
]
KOpt = Annotated[int, typer.Option("--k", min=1, help="Top-k singular directions for principal/spectral metrics.")]
CheckFormatOpt = Annotated[CheckFmt, typer.Option("--format", "-f", help="Stdout format: table, md or json.")]


def check(
    base: BaseArg,
    ft: FtArg,
    rule: RuleOpt = None,
    config: ConfigOpt = None,
    expect_unchanged: ExpectUnchangedOpt = None,
    allow_changed: AllowChangedOpt = None,
    same_keys: SameKeysOpt = False,
    same_shapes: SameShapesOpt = False,
    same_dtypes: SameDtypesOpt = False,
    same_param_count: SameParamsOpt = False,
    same_structure: StructureOpt = False,
    header_only: HeaderOnlyOpt = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    merged_dtype: MergedDtypeOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    as_: AsOpt = None,
    k: KOpt = 64,  # choices.DEFAULT_K (cli imports no torch at module level)
    alpha: AlphaOpt = 0.5,
    svd: SvdOpt = "auto",
    precision: PrincipalPrecisionOpt = "fp32",
    spectral_precision: SpectralPrecisionOpt = "fp64",
    null: NullOpt = "none",
    seed: SeedOpt = 0,
    json: JsonOpt = None,
    fmt: CheckFormatOpt = CheckFmt.table,
    quiet: QuietOpt = False,
) -> None:
    """Gate a fine-tune on rules: each metric or structural rule must hold, or the exit code is 1."""
    rules_files = [config if config is not None else Path("pyproject.toml")]  # inputs too: never overwritten
    with outputs([base, ft], {"--json": json}, side_files=rules_files) as outs:
        from ckptdiff.gate import CheckConfig, StructuralRules, parse_rule  # pandas: after the paths are checked
        from ckptdiff.gate.check import Shared, gather_config
        from ckptdiff.gate.check import check as run

        cli = CheckConfig(
            rules=tuple(parse_rule(text) for text in rule or []),
            structural=StructuralRules(
                same_keys=same_keys or same_structure,
                same_shapes=same_shapes or same_structure,
                same_dtypes=same_dtypes or same_structure,
                expect_unchanged=tuple(expect_unchanged or ()),
                allow_changed=tuple(allow_changed or ()),
            ),
        )
        gathered = gather_config(config, cli)
        shared = Shared(
            include=include or [],
            exclude=exclude or [],
            device=device,
            mode=compare_mode(rtol, atol, as_),
            k=k,
            progress=not quiet,
            merged_dtype=merged_dtype,
            alpha=alpha,
            svd=svd,
            principal_precision=precision,
            spectral_precision=spectral_precision,
            null=null,
            seed=seed,
        )
        report = run(
            base,
            ft,
            gathered.config,
            shared=shared,
            header_only=header_only,
            same_param_count=same_param_count or same_structure,
            origin=gathered.origin,
        )
        out = outs.get("--json")
        if out is not None:
            out.write(report.to_json())
        outs.commit()
    with stdout_may_close():
        if fmt is CheckFmt.json:
            typer.echo(report.to_json(), nl=False)
        elif fmt is CheckFmt.md:
            typer.echo(report.to_markdown(), nl=False)
        else:
            print_table(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def print_table(report: GateResult) -> None:
    """Rule | value | threshold | result with rich, the worst tensors indented under each failing rule."""
    from rich.table import Table
    from rich.text import Text

    from ckptdiff.gate import exact_number, format_value
    from ckptdiff.render.terminal import folded, stdout_console

    console = stdout_console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):  # pipes: tensor names on one line; a set
        console.width = max(console.width, 200)  # COLUMNS (a CI log's width) wins, and long cells fold to it
    results = report.outcome.results
    for key in ("base", "ft", "tied", "rules_from", "mode", "fp8_findings"):
        if key in report.header:
            for line in folded(f"{key}: ", report.header[key], console.width):
                console.print(Text(line, style="dim"))
    table = Table(title_justify="left")
    table.add_column("rule", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_column("threshold", justify="right", no_wrap=True)
    table.add_column("result", no_wrap=True)
    for r in results:
        verdict = Text("PASS", style="bold green") if r.passed else Text("FAIL", style="bold red")
        rule = Text(r.rule)
        if r.counts:  # a structural rule's value is a count: of what
            rule.append(f": {r.counts}", style="dim")
        table.add_row(rule, format_value(r.value), f"{r.op} {exact_number(r.threshold)}", verdict)
        if r.passed:
            continue
        for o in r.offenders:
            value = format_value(o.value) if o.value is not None else ""
            detail = f" ({o.detail})" if o.detail else ""
            table.add_row(Text(f"  {o.tensor}{detail}", style="dim"), value, "", "")
        if r.n_offenders > len(r.offenders):
            table.add_row(Text(f"  ... {r.n_offenders} offending tensors in all", style="dim"), "", "", "")
        if r.note:
            table.add_row(Text(f"  note: {r.note}", style="dim"), "", "", "")
    console.print(table)
    n_pass = sum(r.passed for r in results)
    overall = "[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]"
    console.print(f"ckptdiff check: {overall} ({n_pass}/{len(results)} rules pass)")
