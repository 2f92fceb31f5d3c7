"""MkDocs hooks: let the docs' tables read the same on GitHub and in the built site, and show BENCHMARKS.md.

A page holding ``<!-- include: FILE -->`` (a path from the repository root) shows that file instead of the marker:
BENCHMARKS.md stays at the top of the repository, where the benchmarks write, and is still a page of the site.

GitHub's tables need a pipe inside a code span written as ``\\|`` (it would end the cell otherwise), while
Python-Markdown keeps code spans whole and would show the backslash. On table rows, this turns ``\\|`` inside
code spans back into ``|`` before the page is rendered.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CODE_SPAN = re.compile(r"`[^`\n]*`")
INCLUDE = re.compile(r"<!-- include: ([\w./-]+) -->")
ROOT = Path(__file__).resolve().parent.parent


def unescape_row(line: str) -> str:
    """One Markdown line with ``\\|`` unescaped inside its code spans when it is a table row."""
    if not line.lstrip().startswith("|"):
        return line
    return CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The page's Markdown with includes filled in and every table row unescaped (see the module docstring)."""
    markdown = INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text(encoding="utf-8"), markdown)
    return "\n".join(unescape_row(line) for line in markdown.split("\n"))
