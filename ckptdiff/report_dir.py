"""The output directory of ``ckptdiff report``: written whole or not at all.

Layout::

    DIR/index.html        self-contained page (figures inline, nothing fetched)
    DIR/report.md         Markdown for a model card or a pull request; figures as files:
    DIR/figures/*.svg
    DIR/tensors.csv       one row per tensor (and fine-tune): every per-tensor column of the analyses
    DIR/report.json       the whole report, machine-readable

Everything is written into a hidden temporary directory beside DIR, then renamed into place; a DIR that already
holds an earlier report is replaced in one step, so an interrupted or failed run leaves the old report (or
nothing) and never half of a new one. A DIR that exists and holds anything else is refused before the work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ckptdiff import fileio
from ckptdiff.errors import InputError
from ckptdiff.outputs import note_commit, signals_held, write_error, writes_files
from ckptdiff.report import records, to_markdown

if TYPE_CHECKING:
    from ckptdiff.analyses.full import FullReportResult
    from ckptdiff.figures import Figure

FILES = ("index.html", "report.md", "tensors.csv", "report.json")
_MARKER = "report.json"  # a directory holding this (and nothing unknown) is an earlier report: replaceable


def check_directory(directory: str | Path) -> Path:
    """Fail before any work if DIR cannot take a report: its parent is missing, or it holds other files."""
    target = Path(directory)
    fileio.refuse_too_long(target, f"cannot write report {target}")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write report {target}: folder {parent} does not exist; create it first")
    if target.exists() and not target.is_dir():
        raise InputError(f"cannot write report {target}: it is a file, not a directory; give a new directory name")
    if target.is_dir():
        entries = {p.name for p in target.iterdir()}
        if entries and not (_MARKER in entries and entries <= {*FILES, "figures"}):
            raise InputError(
                f"cannot write report into {target}: it exists and holds other files; give a new or empty directory"
            )
    try:  # can a directory be made there at all? Find out before the work (read-only, full, no permission)
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".probe", dir=parent))
    except OSError as e:
        raise write_error("--out", target, e) from None
    return target


def _section_figures(figures: Sequence[Figure], key: str, run: str) -> list[Figure]:
    """The figures of one section: those drawn from that analysis (and fine-tune)."""
    return [f for f in figures if (f.analysis, f.run) == (key, run)]


def to_markdown_dir(report: FullReportResult, figures: Sequence[Figure]) -> str:
    """report.md: the header, then each analysis's Markdown report with its figures (linked under figures/)."""
    lines = ["# ckptdiff report", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in report.header.items()]
    lines.append("")
    placed: set[str] = set()
    for (key, run), (heading, section) in zip(report.section_keys(), report.sections(), strict=True):
        body = to_markdown(section).splitlines()
        body = [line for line in body if not line.startswith("- **")]  # the header is given once, above
        body[0] = f"## {heading}"
        lines += body
        for fig in _section_figures(figures, key, run):
            if fig.name in placed:
                continue
            placed.add(fig.name)
            lines += ["", f"![{fig.title}](figures/{fig.name}.svg)", "", f"*{fig.caption}*"]
        lines.append("")
    rest = [f for f in figures if f.name not in placed]
    if rest:
        lines += ["## Other figures", ""]
        for fig in rest:
            lines += [f"![{fig.title}](figures/{fig.name}.svg)", "", f"*{fig.caption}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _json(report: FullReportResult) -> str:
    doc = report.to_dict()
    doc["tensors"] = records(report.tensors())
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_directory(report: FullReportResult, directory: str | Path) -> list[Path]:
    """Write the report's files into ``directory`` as one unit (see the module doc); the paths written."""
    from ckptdiff.figures import figures as make_figures
    from ckptdiff.html import to_html

    target = check_directory(directory)
    if not writes_files():  # under torchrun ranks only rank 0 writes; the others hold identical results
        return []
    figs = make_figures(report)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise write_error("--out", target, e) from None
    try:
        (tmp / "figures").mkdir()
        for fig in figs:
            (tmp / "figures" / f"{fig.name}.svg").write_text(fig.svg, encoding="utf-8")
        (tmp / "index.html").write_text(to_html(report, figs), encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown_dir(report, figs), encoding="utf-8")
        (tmp / "tensors.csv").write_text(report.tensors().to_csv(index=False), encoding="utf-8")
        (tmp / "report.json").write_text(_json(report), encoding="utf-8")
        mode = 0o777 & ~_umask()
        os.chmod(tmp, mode)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            with signals_held():  # the two renames go together: a signal waits until both are done
                try:
                    os.rename(target, old / "report")
                except OSError:
                    os.rmdir(old)  # still empty: nothing hidden is left beside the report
                    raise
                try:
                    os.rename(tmp, target)
                except OSError as e:
                    try:  # put the earlier report back where it was
                        os.rename(old / "report", target)
                        os.rmdir(old)
                    except OSError:
                        error = write_error("--out", target, e)
                        raise InputError(f"{error}; the earlier report is kept in {old / 'report'}") from None
                    raise
                note_commit()
                shutil.rmtree(old, ignore_errors=True)
        else:
            with signals_held():
                os.rename(tmp, target)
                note_commit()
    except OSError as e:  # a full disk or a vanished folder: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error("--out", target, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [target / name for name in FILES] + [target / "figures" / f"{f.name}.svg" for f in figs]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
