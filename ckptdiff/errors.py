"""User-facing errors: one family, one line each, mapped to exit codes by the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CkptdiffError(Exception):
    """A failure the user can fix; the message says what was wrong and what to do."""

    exit_code: int = 2


class InputError(CkptdiffError):
    """Bad input: a path, a checkpoint, a flag value or a rule that cannot be used."""

    exit_code = 2


def printable(text: str) -> str:
    """``text`` safe to print as one line: control and format characters (newline, carriage return, escape,
    Unicode line separators and direction overrides) written as escapes, so a file name cannot start a line of its
    own or disguise one (``spoofed\\nckptdiff: error: ...`` prints as that, on one line)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(c: str) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if c in named:
        return named[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# Flags whose library keyword is not the flag's own name with dashes as underscores.
_KEYWORDS = {"--as": "as_dtype", "--label": "labels", "--rule": "rules"}
_COMMAND_LINE = [False]  # True while a CLI command runs (cli.guard.handle_errors)


def option(flag: str) -> str:
    """How a message names an option: the flag (``--alpha``) on the command line, the keyword argument (``alpha``)
    in a library call, so ``principal_overlap(alpha=2)`` is told about ``alpha``, not a flag it never typed."""
    if _COMMAND_LINE[0]:
        return flag
    return _KEYWORDS.get(flag, flag.lstrip("-").replace("-", "_"))


@contextmanager
def command_line() -> Iterator[None]:
    """Within this block, :func:`option` names flags (the CLI runs each command in it)."""
    before = _COMMAND_LINE[0]
    _COMMAND_LINE[0] = True
    try:
        yield
    finally:
        _COMMAND_LINE[0] = before
