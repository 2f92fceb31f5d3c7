"""Tables laid out for a terminal of a given width (80 columns is also what a redirected stdout gets).

Nothing is ever cut with an ellipsis. A table shows its terminal view (a few well-chosen columns, under short
headers explained in its caption); every column and row stays in the CSV, JSON and Markdown outputs. When a table
is still wider than the terminal:

1. tensor names lose the dotted prefix and suffix every name in the table shares (``model.layers.``,
   ``.weight``), said in the caption, so the part where names differ is always shown;
2. text columns (names, labels, details) wrap, at ``.``, ``_``, ``-``, ``/`` or spaces where they can;
3. columns that still do not fit go to a continuation table that repeats the key columns (layer, module, run).

Numbers are never wrapped or shortened.
"""

from __future__ import annotations

import errno
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rich.cells import cell_len

from ckptdiff.render.text import MAX_FINDINGS, cell, findings

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ckptdiff.analyses.base import Report, Table

NAME_COLUMNS = ("tensor", "run", "run_a", "run_b")
_BREAKS = "._-/ ,"
MIN_TEXT = 12  # a text column is not wrapped narrower than this (or its header)


@dataclass
class Grid:
    """A table as text: headers, rows of cells, how many leading columns are keys, which columns are text."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    keys: int
    text: list[bool]
    caption: str = ""


def common_affixes(names: Sequence[str]) -> tuple[str, str]:
    """The dotted prefix and suffix every name shares, leaving each name at least one segment of its own."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return "", ""
    shortest = min(len(p) for p in parts)
    pre = 0
    while pre < shortest - 1 and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while suf < shortest - pre - 1 and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    prefix = ".".join(parts[0][:pre]) + "." if pre else ""
    suffix = "." + ".".join(parts[0][len(parts[0]) - suf :]) if suf else ""
    return prefix, suffix


def wrap(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` cells, broken after a separator where possible (never dropped)."""
    lines = []
    for para in text.split("\n"):
        while cell_len(para) > width:
            cut = 0
            for i in range(min(len(para), width), 0, -1):
                if cell_len(para[:i]) <= width and para[i - 1] in _BREAKS:
                    cut = i
                    break
            if cut == 0:
                cut = width
                while cell_len(para[:cut]) > width:
                    cut -= 1
            lines.append(para[:cut].rstrip(" ") if para[cut - 1 : cut] == " " else para[:cut])
            para = para[cut:]
        lines.append(para)
    return "\n".join(lines)


def _width(cells: Sequence[str]) -> int:
    return max((max(cell_len(x) for x in c.split("\n")) for c in cells), default=0)


def _total(widths: Sequence[int]) -> int:
    """Cells a box table of these column widths takes: one rule per column + 1, padding 1 each side of every
    cell but none at the table's outer edges (``pad_edge=False``)."""
    return sum(widths) + 3 * len(widths) - 1


def _natural(grid: Grid, cols: Sequence[int]) -> list[int]:
    return [max(cell_len(grid.headers[j]), _width([r[j] for r in grid.rows])) for j in cols]


def _minimum(grid: Grid, cols: Sequence[int]) -> list[int]:
    nat = _natural(grid, cols)
    floor = [min(w, max(cell_len(grid.headers[j]), MIN_TEXT)) for w, j in zip(nat, cols, strict=True)]
    return [f if grid.text[j] else w for f, w, j in zip(floor, nat, cols, strict=True)]


def _shorten_names(grid: Grid) -> Grid:
    """Drop the dotted prefix and suffix all tensor names share; the caption says which."""
    j = grid.headers.index("tensor") if "tensor" in grid.headers else -1
    if j < 0:
        return grid
    prefix, suffix = common_affixes([r[j] for r in grid.rows])
    if not prefix and not suffix:
        return grid
    rows = [[*r[:j], r[j][len(prefix) : len(r[j]) - len(suffix)], *r[j + 1 :]] for r in grid.rows]
    said = [f'prefix "{prefix}"' if prefix else "", f'suffix "{suffix}"' if suffix else ""]
    note = "Tensor names are shown without the common " + " and ".join(s for s in said if s) + "."
    caption = f"{grid.caption} {note}".strip()
    return Grid(grid.title, grid.headers, rows, grid.keys, grid.text, caption)


def _groups(grid: Grid, width: int) -> list[list[int]]:
    """Column indices per printed table: the keys, then as many further columns as fit (at their minimum)."""
    keys = list(range(grid.keys))
    rest = list(range(grid.keys, len(grid.headers)))
    groups: list[list[int]] = []
    current: list[int] = []
    for j in rest:
        if current and _total(_minimum(grid, [*keys, *current, j])) > width:
            groups.append(current)
            current = []
        current.append(j)
    if current or not groups:
        groups.append(current)
    if len(groups) > 1:  # the same number of tables, columns spread evenly, when that fits too
        size = -(-len(rest) // len(groups))
        even = [rest[i : i + size] for i in range(0, len(rest), size)]
        if len(even) == len(groups) and all(_total(_minimum(grid, [*keys, *g])) <= width for g in even):
            groups = even
    return [[*keys, *g] for g in groups]


def _fit(grid: Grid, cols: list[int], width: int) -> list[int]:
    """Widths for ``cols``: natural, then the widest text columns narrowed (not below their minimum) to fit."""
    widths = _natural(grid, cols)
    floor = _minimum(grid, cols)
    while _total(widths) > width:  # one cell at a time off the widest: wrapped columns end up about even
        over = [i for i, j in enumerate(cols) if grid.text[j] and widths[i] > floor[i]]
        if not over:
            break
        widths[max(over, key=lambda i: widths[i])] -= 1
    return widths


def layout(grid: Grid, width: int) -> list[tuple[Grid, list[int]]]:
    """The tables to print for ``grid`` at ``width`` cells, each with its column widths; cells wrapped to fit."""
    if _total(_natural(grid, range(len(grid.headers)))) > width:
        grid = _shorten_names(grid)
    groups = _groups(grid, width)
    out = []
    for n, cols in enumerate(groups, start=1):
        widths = _fit(grid, cols, width)
        rows = [[wrap(r[j], w) for j, w in zip(cols, widths, strict=True)] for r in grid.rows]
        title = grid.title if len(groups) == 1 else f"{grid.title} ({n}/{len(groups)})"
        part = Grid(title, [grid.headers[j] for j in cols], rows, grid.keys, [grid.text[j] for j in cols])
        part.caption = grid.caption if n == len(groups) else ""
        out.append((part, widths))
    return out


def rich_tables(table: Table, width: int, max_rows: int | None = None) -> list[RenderableType]:
    """``table``'s terminal view as rich renderables no wider than ``width``: each part's title, its table
    and (under the last part) the caption, titles and captions wrapped at the full width."""
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    grid = to_grid(table)
    inner = width - 2  # the outer cells keep their padding: a squeezed table splits or shortens names instead
    if table.compact is not None and len(layout(grid, inner)) > 1:
        grid = to_grid(replace(table, frame=table.compact, view=None))
    more = 0
    if max_rows is not None and len(grid.rows) > max_rows:
        more = len(grid.rows) - max_rows
        grid.rows = grid.rows[:max_rows]
        grid.caption = f"{grid.caption} ({more} more rows in --json and --csv.)".strip()
    out: list[RenderableType] = []
    for part, widths in layout(grid, inner):
        lines = any("\n" in c for r in part.rows for c in r)
        rt = RichTable(show_lines=lines)
        for h, w, text in zip(part.headers, widths, part.text, strict=True):
            rt.add_column(Text(h), width=w, no_wrap=True, justify="left" if text else "right", overflow="crop")
        for r in part.rows:  # cells as Text: a tensor name or a detail may hold brackets rich would read as markup
            rt.add_row(*(Text(c) for c in r))
        pieces: list[RenderableType] = [Text(part.title, style="italic"), rt]
        if part.caption:  # wrapped between words here: rich's own wrap leaves a space at each line's end
            pieces.append(Text(textwrap.fill(part.caption, width, break_on_hyphens=False), style="dim"))
        out.append(Group(*pieces))
    return out


def to_grid(table: Table) -> Grid:
    """The terminal view of a report table: its key columns, the view's columns under their short headers."""

    frame = table.frame
    named = frame.index.name is not None or any(n is not None for n in frame.index.names)
    flat = frame.reset_index() if named else frame
    keys = frame.index.nlevels if named else 0
    if not named:
        while keys < len(flat.columns) and str(flat.columns[keys]) in NAME_COLUMNS:
            keys += 1
    columns = [str(c) for c in flat.columns]
    shown = list(range(len(columns)))
    headers = list(columns)
    if table.view is not None:
        shown = list(range(keys)) + [columns.index(c) for c in table.view if c in columns[keys:]]
        headers = [table.view.get(c, c) for c in columns]
    rows = [[cell(v.item() if hasattr(v, "item") else v) for v in row] for row in flat.itertuples(index=False)]
    text = [flat[c].dtype.kind == "O" or str(flat[c].dtype) in ("string", "str") for c in flat.columns]
    caption = " ".join(s for s in (table.note, table.legend) if s)
    return Grid(
        table.title,
        [headers[j] for j in shown],
        [[r[j] for j in shown] for r in rows],
        keys,
        [text[j] and not _numeric([r[j] for r in rows]) for j in shown],
        caption,
    )


def _numeric(cells: Sequence[str]) -> bool:
    """Cells that all read as numbers (or the missing-value dash): never wrapped."""

    def number(c: str) -> bool:
        try:
            float(c.replace(",", ""))
            return True
        except ValueError:
            return c in ("—", "", "yes", "no")

    return all(number(c) for c in cells)


def print_summary(report: Report, console: Console | None = None) -> None:
    """The header and the summary sentences (``--summary``), with rich on stdout."""
    from rich.text import Text

    console = console or stdout_console()
    console.print(Text(report.title, style="italic"))
    keys = max((len(k) for k in report.header), default=0)
    for k, v in report.header.items():  # no table: its padding left trailing spaces on every line
        for n, piece in enumerate(folded(f" {k.ljust(keys)}  ", v, console.width)):
            console.print(Text(piece[: keys + 3], style="dim" if n == 0 else "") + Text(piece[keys + 3 :]))
    for s in report.summary:  # wrapped between words here: rich's own wrap leaves a space at each line's end
        console.print(Text(textwrap.fill(s, console.width, break_on_hyphens=False), style="bold"), overflow="fold")


def print_tables(report: Report, console: Console | None = None) -> None:
    """Render the report with rich on stdout: header, summary, every table's terminal view, structural findings.

    Tables fit the console's width without cutting a cell (see :mod:`ckptdiff.render.terminal`).
    """
    console = console or stdout_console()
    print_summary(report, console)
    legends: set[str] = set()
    for table in [*report.tables, findings(report)]:
        if table.frame.empty or not table.terminal:
            continue
        if table.legend in legends:  # said once, under the first table with these headers
            table = replace(table, legend="")
        legends.add(table.legend)
        limit = MAX_FINDINGS if table.title == "Structural findings" else None
        for rt in rich_tables(table, console.width, limit):
            console.print(rt)


def print_verdict(sentences: Sequence[str], table: Table | None, console: Console | None = None) -> None:
    """What happened first (``report``'s verdict sentences), then the fine-tunes side by side (the comparison
    table, fitted to the console's width like every table)."""
    from rich.text import Text

    console = console or stdout_console()
    for s in sentences:  # wrapped between words: rich's own wrap leaves a space at each line's end
        console.print(Text(textwrap.fill(s, console.width, break_on_hyphens=False)), overflow="fold")
    if table is not None and not table.frame.empty:
        console.print()
        for rt in rich_tables(table, console.width):
            console.print(rt)
    console.print()


def folded(lead: str, value: str, width: int) -> list[str]:
    """``lead + value`` in lines of at most ``width`` characters, the value cut anywhere (a path has no spaces to
    wrap at) and continued under itself: nothing is lost, and no line ends in a space."""
    room = width - len(lead)
    if room < 20:  # a lead that leaves no room: the value on lines of its own
        return [lead.rstrip(), *(value[i : i + width] for i in range(0, len(value), width))]
    pieces = [value[i : i + room] for i in range(0, len(value), room)] or [""]
    return [(lead if n == 0 else " " * len(lead)) + p for n, p in enumerate(pieces)]


def stdout_console() -> Console:
    """A rich console on stdout that raises BrokenPipeError when the reader has gone (``| head``).

    rich's default exits with status 1 instead; the CLI treats a closed stdout as the reader's choice and keeps
    the command's own exit status.
    """
    from rich.console import Console

    class _StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, "stdout was closed")

    return _StdoutConsole()
