"""MkDocs hook: let the docs' tables read the same on GitHub and in the built site.

GitHub's tables need a pipe inside a code span written as ``\\|`` (it would end the cell otherwise), while
Python-Markdown keeps code spans whole and would show the backslash. On table rows, this turns ``\\|`` inside
code spans back into ``|`` before the page is rendered.
"""

from __future__ import annotations

import re
from typing import Any

CODE_SPAN = re.compile(r"`[^`\n]*`")


def unescape_row(line: str) -> str:
    """One Markdown line with ``\\|`` unescaped inside its code spans when it is a table row."""
    if not line.lstrip().startswith("|"):
        return line
    return CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The page's Markdown with every table row unescaped (see the module docstring)."""
    return "\n".join(unescape_row(line) for line in markdown.split("\n"))
