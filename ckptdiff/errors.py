"""User-facing errors: one family, one line each, mapped to exit codes by the CLI."""

from __future__ import annotations


class CkptdiffError(Exception):
    """A failure the user can fix; the message says what was wrong and what to do."""

    exit_code: int = 2


class InputError(CkptdiffError):
    """Bad input: a path, a checkpoint, a flag value or a rule that cannot be used."""

    exit_code = 2
