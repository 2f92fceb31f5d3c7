"""``index.html`` for ``ckptdiff report``: one self-contained page that opens offline.

Inline CSS, the figures' SVGs inline, no script, no font or image fetched from anywhere, no external URL. Every
piece of text that comes from the inputs (paths, labels, tensor names, header values) is escaped.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from ckptdiff.analyses.base import Report, Table
    from ckptdiff.analyses.full import FullReportResult
    from ckptdiff.render.figures import Figure

COLLAPSE_ROWS = 30  # longer tables start folded
_TEXT_COLUMNS = {"tensor", "stack", "module", "shape", "status", "detail", "run", "run_a", "run_b", "outcome"}
_NUMBER = re.compile(r"^(?:[-+−]?(?:\d[\d,]*)?\.?\d+(?:e[-+]?\d+)?%?|—|inf|-inf|nan)$")

CSS = """
:root { color-scheme: light; --fg: #1d2125; --muted: #5c6670; --line: #d9dee3; --soft: #f5f7f9; --accent: #1f4e79; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 70rem; margin: 0 auto; padding: 1.5rem 1.25rem 4rem; }
h1 { font-size: 1.7rem; margin: 0 0 .25rem; line-height: 1.2; }
h2 { font-size: 1.35rem; margin: 2.75rem 0 .75rem; padding-top: .75rem; border-top: 2px solid var(--line); }
h3 { font-size: 1rem; margin: 1.5rem 0 .4rem; }
p, li { max-width: 48rem; }
.lede { color: var(--muted); margin: 0 0 1.25rem; overflow-wrap: break-word; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: .88em; }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: .6rem 1rem;
  margin: 1rem 0 1.5rem; font-size: .95rem; }
nav.toc h2 { font-size: .8rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
  border: 0; margin: 0 0 .3rem; padding: 0; }
nav.toc ol { margin: 0; padding-left: 1.4rem; columns: 2 18rem; column-gap: 2rem; }
nav.toc li { margin: .1rem 0; break-inside: avoid; }
a { color: var(--accent); }
ul.summary { padding-left: 1.2rem; margin: .5rem 0 1rem; }
ul.summary li { margin: .35rem 0; }
.warning { border-left: 4px solid #c0392b; background: #fdf2f0; padding: .5rem .8rem; margin: .8rem 0; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1.5rem; align-items: flex-start; }
figure { margin: 1.25rem 0 1.5rem; padding: 0; max-width: 100%; }
figure .svg { border: 1px solid var(--line); border-radius: 4px; background: #fff; padding: .25rem; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { font-size: .88rem; color: var(--muted); margin-top: .4rem; max-width: 48rem; }
figcaption strong { color: var(--fg); }
.table-wrap { overflow-x: auto; margin: .4rem 0 1rem; border: 1px solid var(--line); border-radius: 4px;
  width: fit-content; max-width: 100%; }
table { border-collapse: collapse; font-size: .84rem; font-variant-numeric: tabular-nums; }
th, td { padding: .28rem .6rem; text-align: left; vertical-align: top; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
thead th { background: var(--soft); font-weight: 600; position: sticky; top: 0; white-space: normal; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.text { white-space: normal; overflow-wrap: anywhere; min-width: 12rem; }
table.kv th { width: 12rem; color: var(--muted); font-weight: 500; white-space: nowrap; }
table.kv td { white-space: normal; overflow-wrap: anywhere; font-family: ui-monospace, "SFMono-Regular", Menlo,
  Consolas, "DejaVu Sans Mono", monospace; font-size: .82rem; }
.tables { display: flex; flex-wrap: wrap; gap: 0 2.25rem; align-items: flex-start; }
.tables > div { max-width: 100%; min-width: 0; }
.note { font-size: .82rem; color: var(--muted); margin: .2rem 0 .4rem; }
details { margin: .6rem 0; }
details > summary { cursor: pointer; color: var(--accent); font-weight: 500; }
details[open] > summary { margin-bottom: .4rem; }
section#verdict { margin: 1rem 0 1.5rem; }
section#verdict h2 { border: 0; margin-top: .5rem; padding-top: 0; }
p.verdict { font-size: 1.08rem; margin: .45rem 0; max-width: 56rem; }
table.side td { white-space: nowrap; }
table.side th[scope=row] { font-weight: 500; }
table.side .word { font-weight: 600; margin-left: .35rem; }
table.side .word.quiet { font-weight: 400; color: var(--muted); }
abbr[title] { text-decoration: underline dotted; cursor: help; }
dl.glossary dt { font-weight: 600; margin-top: .6rem; }
dl.glossary dd { margin: .1rem 0 0 1.2rem; max-width: 48rem; }
footer { margin-top: 3rem; font-size: .8rem; color: var(--muted); }
@media print { details { display: block; } h2 { break-after: avoid; } figure { break-inside: avoid; } }
"""


def to_html(report: FullReportResult, figures: Sequence[Figure]) -> str:
    """The whole report as one self-contained HTML page (figures inline, nothing fetched, all input escaped).

    The first screen says what happened (the verdict sentences) and puts the fine-tunes side by side (the
    comparison table, and the figures that draw every fine-tune together); each analysis follows in its own
    section; the settings and a glossary of the terms the page uses close it.
    """
    sections = report.sections()
    owners = report.section_keys()
    side = [f for f in figures if f.analysis == COMPARISON]
    placed: set[str] = {f.name for f in side}
    body: list[str] = []
    toc: list[tuple[str, str]] = [("verdict", "What happened, side by side")]
    for i, ((heading, rep), key) in enumerate(zip(sections, owners, strict=True), start=1):
        anchor = f"s{i}-{_slug(heading)}"
        toc.append((anchor, heading))
        mine = [f for f in figures if (f.analysis, f.run) == key]
        placed.update(f.name for f in mine)
        body.append(_section(anchor, heading, rep, mine, report.header))
    rest = [f for f in figures if f.name not in placed]
    if rest:
        toc.append(("other-figures", "Other figures"))
        figs = "".join(map(_figure, rest))
        body.append(
            f'<section id="other-figures">\n<h2>Other figures</h2>\n<div class="figures">\n{figs}</div>\n</section>\n'
        )
    toc += [("inputs", "Inputs and settings"), ("glossary", "Glossary")]
    title = _title(report)
    parts = [
        "<!DOCTYPE html>\n",
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        '<meta name="generator" content="ckptdiff">\n',
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        f'<header>\n<h1>ckptdiff report</h1>\n<p class="lede">{_e(_lede(report))}</p>\n</header>\n',
        _verdict(report, side),
        _toc(toc),
        *body,
        '<section id="inputs">\n<h2>Inputs and settings</h2>\n',
        _kv(report.header),
        "</section>\n",
        _glossary(),
        f"<footer>Written by ckptdiff {_e(report.header.get('ckptdiff', ''))}"
        f"{' on ' + _e(report.header['date']) if 'date' in report.header else ''}. "
        "Per-tensor rows are in tensors.csv and report.json next to this page.</footer>\n",
        "</main>\n</body>\n</html>\n",
    ]
    return "".join(parts)


COMPARISON = "comparison"  # the analysis name of the figures that draw every fine-tune together
QUIET_WORDS = ("no effect", "as chance", "as null", "as stored", "no null")


def _verdict(report: FullReportResult, figs: Sequence[Figure]) -> str:
    """The verdict sentences, the comparison table (row labels explained in tooltips, verdict words marked) and
    the figures that draw every fine-tune together."""
    from ckptdiff.analyses.compare import GLOSSARY, cell_text

    out = ['<section id="verdict">\n<h2>What happened</h2>\n']
    out += [f'<p class="verdict">{_e(s)}</p>\n' for s in report.verdict()]
    side = report.comparison()
    if side.rows:
        head = "".join(f'<th scope="col" title="{_e(run)}">{_e(run)}</th>' for run in side.runs)
        rows = []
        for label, cells in side.rows.items():
            term = side.terms.get(label, "")
            tip = GLOSSARY.get(term, "")
            name = f'<abbr title="{_e(tip)}">{_e(label)}</abbr>' if tip else _e(label)
            tds = []
            for run in side.runs:
                row = cells.get(run)
                text = cell_text(label, row)
                word = row.word if row is not None else ""
                number = text[: len(text) - len(word)].strip() if word else text
                quiet = word in QUIET_WORDS or word.startswith("no stable")
                mark = f'<span class="word{" quiet" if quiet else ""}">{_e(word)}</span>' if word else ""
                tds.append(f"<td>{_e(number)}{' ' + mark if mark else ''}</td>")
            rows.append(f'<tr><th scope="row">{name}</th>{"".join(tds)}</tr>\n')
        out.append(
            '<h3>Side by side</h3>\n<div class="table-wrap"><table class="side">\n'
            f'<thead><tr><th scope="col" title="figure">figure</th>{head}</tr></thead>\n'
            f'<tbody>\n{"".join(rows)}</tbody>\n'
            f'</table></div>\n<p class="note">{_e(side.note)} Terms: see the <a href="#glossary">glossary</a>.</p>\n'
        )
    if figs:
        out.append('<div class="figures">\n' + "".join(_figure(f) for f in figs) + "</div>\n")
    out.append("</section>\n")
    return "".join(out)


def _glossary() -> str:
    from ckptdiff.analyses.compare import GLOSSARY

    items = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>\n" for term, text in GLOSSARY.items())
    return f'<section id="glossary">\n<h2>Glossary</h2>\n<dl class="glossary">\n{items}</dl>\n</section>\n'
def to_html_page(
    title: str,
    lede: str,
    header: dict[str, str],
    sections: Sequence[tuple[str, Report, Sequence[Figure]]],
    files: str,
) -> str:
    """A page of the same layout for any command's report (``trajectory``): the header, then each section's summary,
    figures and tables; ``files`` names the data files beside the page, for the footer."""
    toc: list[tuple[str, str]] = [("inputs", "Inputs and settings")]
    body: list[str] = []
    for i, (heading, rep, figs) in enumerate(sections, start=1):
        anchor = f"s{i}-{_slug(heading)}"
        toc.append((anchor, heading))
        body.append(_section(anchor, heading, rep, figs, header))
    return "".join(
        [
            "<!DOCTYPE html>\n",
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n',
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
            '<meta name="generator" content="ckptdiff">\n',
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
            f'<header>\n<h1>{_e(title)}</h1>\n<p class="lede">{_e(lede)}</p>\n</header>\n',
            _toc(toc),
            '<section id="inputs">\n<h2>Inputs and settings</h2>\n',
            _kv(header),
            "</section>\n",
            *body,
            f"<footer>Written by ckptdiff {_e(header.get('ckptdiff', ''))}"
            f"{' on ' + _e(header['date']) if 'date' in header else ''}. {_e(files)}</footer>\n",
            "</main>\n</body>\n</html>\n",
        ]
    )


# ---------------------------------------------------------------------------------------------
# pieces


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "section"


def _title(report: FullReportResult) -> str:
    runs = ", ".join(report.runs)
    return f"ckptdiff report: {runs} vs base" if runs else "ckptdiff report"


def _lede(report: FullReportResult) -> str:
    base = report.header.get("base", "base")
    n = len(report.runs)
    runs = ", ".join(report.runs)
    what = ", ".join(report.analyses) or "no analysis"
    return f"{n} fine-tune{'s' if n != 1 else ''} ({runs}) against {base}; analyses: {what}."


def _toc(entries: Sequence[tuple[str, str]]) -> str:
    items = "".join(f'<li><a href="#{_e(anchor)}">{_e(text)}</a></li>\n' for anchor, text in entries)
    return f'<nav class="toc" aria-label="Contents">\n<h2>Contents</h2>\n<ol>\n{items}</ol>\n</nav>\n'


def _kv(pairs: dict[str, str]) -> str:
    rows = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(v)}</td></tr>\n' for k, v in pairs.items())
    return f'<div class="table-wrap"><table class="kv">\n<tbody>\n{rows}</tbody>\n</table></div>\n'


def _section(anchor: str, heading: str, rep: Report, figs: Sequence[Figure], top: dict[str, str]) -> str:
    from ckptdiff.analyses.base import Table

    out = [f'<section id="{_e(anchor)}">\n<h2>{_e(heading)}</h2>\n']
    warning = rep.header.get("warning")
    if warning:
        out.append(f'<p class="warning">{_e(warning)}</p>\n')
    if rep.summary:
        out.append('<ul class="summary">\n' + "".join(f"<li>{_e(s)}</li>\n" for s in rep.summary) + "</ul>\n")
    if figs:
        out.append('<div class="figures">\n' + "".join(_figure(f) for f in figs) + "</div>\n")
    blocks = [b for b in (_table_block(t) for t in rep.tables) if b]
    if blocks:
        out.append('<div class="tables">\n' + "".join(f"<div>\n{b}</div>\n" for b in blocks) + "</div>\n")
    if rep.structural is not None and not rep.structural.empty:
        n = len(rep.structural)
        inner = _table_block(Table("", rep.structural), bare=True)
        out.append(
            f"<details>\n<summary>Structural findings ({n} tensor{'s' if n != 1 else ''} not compared one to one, "
            f"or with a note)</summary>\n{inner}</details>\n"
        )
    else:
        out.append('<p class="note">Structural findings: none.</p>\n')
    own = {k: v for k, v in rep.header.items() if top.get(k) != v and k not in ("warning", "date", "analysis")}
    if own:
        out.append(f"<details>\n<summary>Settings of this analysis</summary>\n{_kv(own)}</details>\n")
    out.append("</section>\n")
    return "".join(out)


def _figure(fig: Figure) -> str:
    svg = _inline_svg(fig.svg)
    size = _WIDTH.search(svg)
    style = f' style="width: {float(size.group(1)) * 4 / 3 + 10:.0f}px"' if size else ""  # pt -> CSS px + padding
    if fig.scale is not None:  # the colour range, for a reader's tools: the same on every heatmap of one kind
        style += f' data-scale="{fig.scale[0]:.6g} {fig.scale[1]:.6g}"'
    return (
        f'<figure id="fig-{_e(fig.name)}"{style}>\n<div class="svg" role="img" aria-label="{_e(fig.title)}">\n'
        f"{svg}\n</div>\n<figcaption><strong>{_e(fig.title)}.</strong> {_e(fig.caption)}</figcaption>\n</figure>\n"
    )


_WIDTH = re.compile(r'<svg[^>]*?\swidth="([0-9.]+)pt"')
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>\s*")
_DOCTYPE = re.compile(r"<!DOCTYPE[^>]*>\s*", re.I)


def _inline_svg(svg: str) -> str:
    """An SVG document as an element to inline: without its XML declaration or DOCTYPE."""
    return _DOCTYPE.sub("", _XML_DECL.sub("", svg, count=1), count=1).strip()


def _table_block(table: Table, bare: bool = False) -> str:
    frame = table.frame
    if frame is None or frame.empty:
        return ""
    heads, rows = _cells(frame)
    numeric = [
        h not in _TEXT_COLUMNS and all(_NUMBER.match(r[j]) for r in rows) and any(r[j] != "—" for r in rows)
        for j, h in enumerate(heads)
    ]
    th = "".join(f'<th scope="col"{_cls(num)}{_head(h)}</th>' for h, num in zip(heads, numeric, strict=True))
    body = "".join(
        "<tr>"
        + "".join(f"<td{_cls(num, cell)}>{_e(cell)}</td>" for cell, num in zip(r, numeric, strict=True))
        + "</tr>\n"
        for r in rows
    )
    grid = f'<div class="table-wrap"><table>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{body}</tbody>\n</table></div>\n'
    if bare:
        return grid
    note = f'<p class="note">{_e(table.note)}</p>\n' if table.note else ""
    if len(rows) > COLLAPSE_ROWS:
        return f"<details>\n<summary>{_e(table.title)} ({len(rows)} rows)</summary>\n{note}{grid}</details>\n"
    return f"<h3>{_e(table.title)}</h3>\n{note}{grid}"


def _head(name: str) -> str:
    """A column header that may break after each underscore (``ratio_|principal_|magnitude``), its whole name in
    a tooltip: wide tables fit the page instead of scrolling."""
    return f' title="{_e(name)}">' + _e(name).replace("_", "_<wbr>")


def _cls(numeric: bool, cell: str = "") -> str:
    if numeric:
        return ' class="num"'
    return ' class="text"' if len(cell) > 60 else ""


def _cells(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Column names and cell text, numbers formatted as the Markdown and terminal tables format them."""
    from ckptdiff.render.text import _rows

    return _rows(frame)
