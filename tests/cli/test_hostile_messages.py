"""What ckptdiff prints when it refuses: one line, nothing spoofable, nothing else.

The contract for messages: a refusal is exactly one ``ckptdiff: error:`` line on stderr, whatever the input's
name holds (a newline, a carriage return, an escape sequence, a Unicode line separator or direction override is
printed as an escape, so a file name cannot print a line of its own); torch's own notes about a pickle it is
asked to read do not reach the user; a bad option value or an unknown option is one line like any other bad
input, not a boxed usage screen.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hostile import invoke
from safetensors.torch import save_file

from ckptdiff.errors import printable

W = torch.arange(16, dtype=torch.float32)


def _one_line(args: list[str]) -> str:
    code, stderr, output, _ = invoke(args)
    lines = stderr.splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("evil", ["\n", "\r", "\x1b[2K\r", "\u2028", "\u202e", "\x85"])
def test_a_name_with_control_characters_prints_on_one_line(tmp_path: Path, evil: str) -> None:
    base = tmp_path / "base.safetensors"
    save_file({"w": W}, str(base))
    missing = tmp_path / f"x{evil}ckptdiff: error: spoofed line.safetensors"
    line = _one_line(["sparsity", str(base), str(missing)])
    assert evil not in line and "spoofed line" in line
    assert line.count("ckptdiff: error:") == 2  # the real prefix, and the spoofed text shown inside it


def test_printable_escapes_exactly_the_unprintable() -> None:
    assert printable("plain text, é, 中, tab\t, nl\n") == "plain text, é, 中, tab\\t, nl\\n"
    assert printable("\x1b[31m\u202e\u2028\x00") == "\\x1b[31m\\u202e\\u2028\\x00"


def test_a_file_name_with_a_newline_in_a_folder_prints_on_one_line(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a\\nckptdiff: error: b.safetensors"}}')
    base = tmp_path / "base.safetensors"
    save_file({"w": W}, str(base))
    line = _one_line(["sparsity", str(base), str(ft)])
    assert "\\n" in line


def _protocol_4(folder: Path) -> Path:
    torch.save({"w": W}, folder / "ft.pt", pickle_protocol=4)
    return folder / "ft.pt"


def test_torch_warnings_about_a_pickle_do_not_reach_the_user(tmp_path: Path) -> None:
    """torch's note on a pickle protocol it may not read (its sparse-CSR "beta" note is silenced the same way,
    but it fires once per process, so a test in this process cannot see it again)."""
    base = tmp_path / "base.pt"
    torch.save({"w": W}, base)
    ft = _protocol_4(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        line = _one_line(["sparsity", str(base), str(ft)])
    assert str(ft) in line
    assert not [w for w in seen if issubclass(w.category, UserWarning)], [str(w.message) for w in seen]


def test_a_newer_pickle_protocol_is_named_as_such(tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    torch.save({"w": W}, base)
    line = _one_line(["sparsity", str(base), str(_protocol_4(tmp_path))])
    assert "pickle protocol" in line and "default protocol" in line


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["check", "a", "b", "--k", "0"], ["'--k'", "ckptdiff check --help"]),
        (["principal-overlap", "a", "b", "--k", "text"], ["'--k'", "ckptdiff principal-overlap --help"]),
        (["sparsity", "a", "b", "--bogus"], ["--bogus", "ckptdiff sparsity --help"]),
        (["sparsity"], ["BASE", "ckptdiff sparsity --help"]),
        (["no-such-command"], ["no-such-command", "ckptdiff --help"]),
    ],
    ids=["out of range", "not a number", "unknown option", "missing argument", "unknown command"],
)
def test_usage_errors_are_one_line(args: list[str], names: list[str]) -> None:
    line = _one_line(args)
    for name in names:
        assert name in line, (name, line)


def test_no_arguments_still_prints_the_help() -> None:
    code, stderr, output, _ = invoke([])
    assert code == 2 and "Usage" in output and "sparsity" in output and "error" not in stderr
