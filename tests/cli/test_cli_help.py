"""The help a new user reads first (issue 23 items 6, 7, 9)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("args", [["--help"], ["sparsity", "--help"]])
def test_help_into_a_closed_pipe_exits_0(args: list[str]) -> None:
    """`ckptdiff --help | head -1`: the reader is gone before the help is written; that is not a failure."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptdiff", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has started: every write of the help meets a closed pipe
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


HEAVY = ("torch", "pandas", "numba", "matplotlib")
_PROBE = """
import sys
from ckptdiff.cli.app import app
try:
    app(sys.argv[1:], prog_name="ckptdiff")
except SystemExit as e:
    print("exit", e.code)
print("heavy", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["sparsity", "{base}", "{typo}"],
        ["spectral", "{base}", "{ok}", "--json", "/proc/ckptdiff-x.json"],
        ["principal-overlap", "{typo}", "{ok}"],
        ["consistency", "{base}", "{ok}", "{typo}"],
        ["report", "{base}", "{typo}", "-o", "{tmp}/rep"],
        ["report", "{base}", "{ok}", "-o", "/proc/ckptdiff-rep"],
        ["check", "{base}", "{typo}", "--same-keys"],
        ["trajectory", "{base}", "{typo}"],
        ["patch", "create", "{base}", "{typo}", "-o", "{tmp}/p.safetensors"],
        ["patch", "size", "{typo}", "{ok}"],
        ["patch", "apply", "{typo}", "{ok}", "-o", "{tmp}/rebuilt"],
        ["patch", "verify", "{base}", "{typo}", "{ok}"],
    ],
)
def test_bad_paths_fail_before_anything_heavy_loads(args: list[str], tmp_path: Path) -> None:
    """A mistyped path or an unwritable destination is refused before torch, pandas, numba or matplotlib are
    imported, so it fails about as fast as --help (issue 23 item 9, issue 26 item 3); the path gets a did-you-mean."""
    (tmp_path / "rl_seed1").mkdir()
    (tmp_path / "rl_seed1" / "model.safetensors").write_bytes(b"")
    names = {"base": str(tmp_path / "rl_seed1"), "ok": str(tmp_path / "rl_seed1"), "typo": str(tmp_path / "rl_sed1")}
    argv = [a.format(tmp=tmp_path, **names) for a in args]
    probe = _PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=_env(), timeout=60)
    assert "exit 2" in done.stdout, (done.stdout, done.stderr)
    assert done.stdout.strip().endswith("heavy"), done.stdout  # none of them was imported
    assert done.stderr.startswith("ckptdiff: error:") and done.stderr.count("\n") == 1, done.stderr
    if "{typo}" in args:
        assert f"did you mean {tmp_path / 'rl_seed1'}?" in done.stderr


def test_import_ckptdiff_stays_lazy() -> None:
    probe = f"import sys, ckptdiff; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.stdout.strip() == "", done.stdout


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[str, str]:
    from factory import llama_like, save_single

    sd = llama_like(layers=1)
    ft = {k: v.clone() for k, v in sd.items()}
    ft["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    return str(save_single(sd, tmp_path / "b.safetensors")), str(save_single(ft, tmp_path / "f.safetensors"))


def _cli(*args: str) -> object:
    from typer.testing import CliRunner

    from ckptdiff.cli import app

    return CliRunner().invoke(app, list(args))


def test_a_bare_word_glob_gets_its_wildcards_suggested(tiny: tuple[str, str]) -> None:
    res = _cli("sparsity", *tiny, "-i", "mlp", "-q")
    assert res.exit_code == 2  # type: ignore[attr-defined]
    assert "did you mean '*mlp*'?" in res.stderr  # type: ignore[attr-defined]


def test_include_takes_comma_lists_as_analyses_does(tiny: tuple[str, str]) -> None:
    import ckptdiff

    listed = ckptdiff.sparsity(*tiny, include=["*mlp*,*q_proj*"], progress=False).to_frame()["tensor"].tolist()
    repeated = ckptdiff.sparsity(*tiny, include=["*mlp*", "*q_proj*"], progress=False).to_frame()["tensor"].tolist()
    assert listed == repeated and len(listed) == 4  # gate, up, down and q of the one layer
    excluded = ckptdiff.sparsity(*tiny, exclude=["*mlp*, *proj*"], progress=False).to_frame()["tensor"].tolist()
    assert not any("proj" in t for t in excluded) and "model.norm.weight" in excluded


def test_a_misspelt_metric_gets_the_nearest_names(tiny: tuple[str, str]) -> None:
    res = _cli("check", *tiny, "-r", "sparsty >= 0.1", "-q")
    assert res.exit_code == 2  # type: ignore[attr-defined]
    assert "unknown metric 'sparsty' in rule 'sparsty >= 0.1': did you mean sparsity" in res.stderr  # type: ignore[attr-defined]
    assert "ratio_principal" not in res.stderr  # type: ignore[attr-defined]  # not the whole list of metrics


@pytest.mark.parametrize("command", ["sparsity", "check", "report"])
def test_redirected_output_fits_columns_without_trailing_spaces(
    command: str, tiny: tuple[str, str], tmp_path: Path
) -> None:
    """A CI log is redirected stdout with COLUMNS set: every line fits it, no line ends in spaces (issue 23 item 5)."""
    from typer.testing import CliRunner

    from ckptdiff.cli import app

    long_glob = "model.layers.*.mlp.up_proj.weight"
    extra = {
        "sparsity": [],
        "check": ["-r", f"sparsity@{long_glob} >= 0.999999", "-r", f"changed@{long_glob} == 0", "--same-structure"],
        "report": ["-a", "sparsity", "-o", str(tmp_path / "rep")],
    }[command]
    res = CliRunner().invoke(app, [command, *tiny, "-q", *extra], env={"COLUMNS": "60"})
    assert res.exit_code in (0, 1), res.output
    lines = res.stdout.splitlines()
    assert len(lines) > 3
    assert max(len(line) for line in lines) <= 60, [line for line in lines if len(line) > 60]
    assert not [line for line in lines if line.endswith(" ")]
    touching = [line for line in lines if re.search(r"[│┃][^ ─━]|[^ ─━][│┃]", line)]
    assert not touching, touching  # every cell keeps its padding, the outer ones too


def test_every_command_has_an_example_on_the_shipped_checkpoints() -> None:
    """Each command's --help shows an example that runs offline, from a clone: its paths exist and its arguments
    parse (issue 23 item 7; running them all is the examples' own tests' job)."""
    import shlex

    import typer.main

    from ckptdiff.cli.app import COMMANDS, app

    group = typer.main.get_command(app)
    for name, _, epilog in COMMANDS:
        shipped = [m for m in re.findall(r"\[bold\](ckptdiff [^\[]*?)\[/bold\]", epilog) if "examples/" in m]
        assert shipped, f"{name}: no example on the shipped checkpoints"
        for example in shipped:
            args = shlex.split(example.split(">>")[0])[1:]
            assert args[0] == name
            for path in [a for a in args if a.startswith("examples/")]:
                assert (ROOT / path).exists(), (name, path)
            command = group.get_command(None, name)  # type: ignore[attr-defined, arg-type]
            command.make_context(name, args[1:])  # raises on an unknown flag or a bad value


def test_options_show_their_choices_and_defaults() -> None:
    from typer.testing import CliRunner

    from ckptdiff.cli import app

    text = CliRunner().invoke(app, ["principal-overlap", "--help"], env={"COLUMNS": "200"}).stdout
    for shown in ("<exact|randomized|auto>", "<fp32|fp64>", "<bf16|fp16|fp32>", "<auto|cpu|cuda|cuda:N>"):
        assert shown in text, shown
    options = [line for line in text.splitlines() if line.lstrip("│ ").startswith("--")]
    assert options and not [line for line in options if "<str>" in line]  # every string option shows its choices
    assert "Usage: ckptdiff principal-overlap [OPTIONS] BASE FT" in text
    usage = CliRunner().invoke(app, ["consistency", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[OPTIONS] BASE FT..." in usage and "{" not in usage
    check = CliRunner().invoke(app, ["check", "--help"], env={"COLUMNS": "200"}).stdout
    assert re.search(r"--k .*\[default: 64\]", check) and "<none|random>" in check


def test_the_host_name_is_opt_in(tiny: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports are pasted into model cards: no host name unless `ckptdiff --host` asks (issue 23 item 16)."""
    import json
    import platform

    monkeypatch.setenv("CKPTDIFF_HOST", "0")  # restored after the test: --host sets it for the process
    plain = json.loads(_cli("sparsity", *tiny, "-q", "-f", "json").stdout)["header"]  # type: ignore[attr-defined]
    assert "host" not in plain and "date" in plain
    asked = json.loads(_cli("--host", "sparsity", *tiny, "-q", "-f", "json").stdout)["header"]  # type: ignore[attr-defined]
    assert asked["host"] == platform.node()


def test_a_squeezed_grid_keeps_its_cell_padding(tiny: tuple[str, str]) -> None:
    """At every width the layer x module grid either fits with its padding or splits; cells never touch a border
    (issue 23 item 5)."""
    import io

    from rich.console import Console

    import ckptdiff
    from ckptdiff.render.terminal import rich_tables

    report = ckptdiff.sparsity(*tiny, progress=False).report()
    grid = next(t for t in report.tables if "layer x module" in t.title)
    for width in range(50, 100):
        out = io.StringIO()
        console = Console(file=out, width=width, color_system=None)
        for piece in rich_tables(grid, width):
            console.print(piece)
        lines = out.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width
        touching = [line for line in lines if re.search(r"[│┃][^ ─━]|[^ ─━][│┃]", line)]
        assert not touching, (width, touching)
