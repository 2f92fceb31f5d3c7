"""The ``ckptdiff`` command line: a thin layer that parses, calls one library function, and renders.

:mod:`ckptdiff.cli.app` holds the application and its one table of commands; each command lives in its own module
and never imports the application back; :mod:`ckptdiff.cli.options` declares the shared options once;
:mod:`ckptdiff.cli.guard` turns failures into one line and an exit code. A closed stdout (``| head``) is not an
error: printing stops quietly and the exit status is the command's own.
"""

from __future__ import annotations

from ckptdiff.cli.app import app, main

__all__ = ["app", "main"]
