"""The output directory of ``ckptdiff report``: written whole or not at all.

Layout::

    DIR/index.html        self-contained page (figures inline, nothing fetched)
    DIR/report.md         Markdown for a model card or a pull request; figures as files:
    DIR/figures/*.svg
    DIR/tensors.csv       one row per tensor (and fine-tune): every per-tensor column of the analyses
    DIR/report.json       the whole report, machine-readable
    DIR/steps.csv         ``trajectory`` only: one row per step and scope

    DIR/.ckptdiff-report  the manifest: every file above, as written by ckptdiff

Everything is written into a hidden temporary directory beside DIR, then renamed into place; a DIR that already
holds an earlier report is replaced in one step, so an interrupted or failed run leaves the old report (or
nothing) and never half of a new one.

Only what ckptdiff wrote is ever replaced. Before the work, a DIR that exists must be empty, or an earlier report
whose manifest lists every file in it: a file the manifest does not list (a user's ``figures/thesis.tex``), an
input of the run inside DIR, or a DIR that is a symbolic link (replacing it would change the report it points
to) is refused, and nothing is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io.outputs import input_files, temp_folder, write_error, writes_files
from ckptdiff.runtime.signals import note_commit, signals_held

if TYPE_CHECKING:
    from ckptdiff.analyses.full import FullReportResult
    from ckptdiff.analyses.trajectory import TrajectoryResult
    from ckptdiff.render.figures import Figure

FILES = ("index.html", "report.md", "tensors.csv", "report.json")
MANIFEST = ".ckptdiff-report"  # JSON: {"ckptdiff_report": 1, "files": [paths relative to DIR]}


def check_directory(directory: str | Path, inputs: Iterable[object] = ()) -> Path:
    """Fail before any work if DIR cannot take a report (see the module doc); ``inputs`` are the run's inputs."""
    target = Path(directory)
    fileio.refuse_too_long(target, f"cannot write report {target}")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write report {target}: folder {parent} does not exist; create it first")
    if target.is_symlink():
        raise InputError(
            f"cannot write report {target}: it is a symbolic link to {os.path.realpath(target)}, and replacing it "
            "would change what it points to; give the real directory path or a new directory name"
        )
    if target.exists() and not target.is_dir():
        raise InputError(f"cannot write report {target}: it is a file, not a directory; give a new directory name")
    if target.is_dir():
        _refuse_inputs_inside(target, inputs)
        _refuse_foreign_files(target)
    with signals_held():  # can a directory be made there at all? Find out before the work (read-only, full, ...)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".probe", dir=parent))
        except OSError as e:
            raise write_error("--out", target, e) from None
    return target


def _contents(target: Path) -> tuple[set[str], set[str]]:
    """Every file (and link) and every folder below ``target``, as paths relative to it."""
    files: set[str] = set()
    folders: set[str] = set()
    for root, dirs, names in os.walk(target):
        rel = Path(root).relative_to(target)
        linked = {d for d in dirs if (Path(root) / d).is_symlink()}  # os.walk does not enter them: they are entries
        folders.update(str(rel / d) for d in dirs if d not in linked)
        files.update(str(rel / n) for n in [*names, *linked])
    return files, folders


def _manifest(target: Path) -> set[str] | None:
    """The files an earlier report's manifest lists, or None if there is no readable manifest."""
    try:  # a side file like any other: a pipe or a huge file named like the manifest is no manifest
        doc = fileio.load_json(target / MANIFEST, f"manifest {target / MANIFEST}", fileio.MAX_CONFIG_BYTES, "")
        listed = doc["files"]
    except (InputError, KeyError, TypeError):
        return None
    if doc.get("ckptdiff_report") != 1 or not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        return None
    return set(listed)


def _refuse_foreign_files(target: Path) -> None:
    """A non-empty DIR must be an earlier report holding only the files its manifest lists."""
    files, folders = _contents(target)
    if not files and not folders:
        return
    listed = _manifest(target)
    if listed is None:
        raise InputError(
            f"cannot write report into {target}: it exists and is not a report ckptdiff wrote (no {MANIFEST} "
            "manifest); give a new or empty directory"
        )
    foreign = sorted(files - listed - {MANIFEST}) + sorted(folders - {"figures"})
    if foreign:
        raise InputError(
            f"cannot write report into {target}: it holds {foreign[0]!r}, which ckptdiff did not write there"
            f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; move it out or give a new directory"
        )


def _refuse_inputs_inside(target: Path, inputs: Iterable[object]) -> None:
    """No input of the run (a checkpoint, its shards, a rules file) may live inside the directory replaced."""
    real = Path(os.path.realpath(target))
    for spec in inputs:
        if not isinstance(spec, (str, Path)):
            continue
        for path in [Path(spec).expanduser(), *input_files(str(spec))]:
            if path.exists() and Path(os.path.realpath(path)).is_relative_to(real):
                raise InputError(
                    f"cannot write report into {target}: it holds {path}, an input of this run, which replacing "
                    "the directory would delete; give another directory"
                )


def _section_figures(figures: Sequence[Figure], key: str, run: str) -> list[Figure]:
    """The figures of one section: those drawn from that analysis (and fine-tune)."""
    return [f for f in figures if (f.analysis, f.run) == (key, run)]


def to_markdown_dir(report: FullReportResult, figures: Sequence[Figure]) -> str:
    """report.md: what happened (the verdict) and the fine-tunes side by side, then each analysis's Markdown report
    with its figures (linked under figures/), then the settings and a glossary of the terms used."""
    from ckptdiff.analyses.compare import GLOSSARY
    from ckptdiff.render.text import _rows

    lines = ["# ckptdiff report", "", "## What happened", ""]
    for sentence in report.verdict():
        lines += [sentence, ""]
    side = report.comparison()
    if side.rows:
        table = side.table()
        cols, rows = _rows(table.frame)
        lines += [f"### {table.title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", table.note + " Terms: see the glossary at the end.", ""]
    placed: set[str] = set()
    for fig in figures:
        if fig.analysis == "comparison":
            placed.add(fig.name)
            lines += [f"![{fig.title}](figures/{fig.name}.svg)", "", f"*{fig.caption}*", ""]
    for (key, run), (heading, section) in zip(report.section_keys(), report.sections(), strict=True):
        from ckptdiff.render.text import to_markdown  # pandas: not needed to check the directory

        body = to_markdown(section).splitlines()
        body = [line for line in body if not line.startswith("- **")]  # the header is given once, below
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
    lines += ["## Inputs and settings", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in report.header.items()]
    lines += ["", "## Glossary", ""]
    lines += [f"- **{term}**: {text}" for term, text in GLOSSARY.items()]
    return "\n".join(lines).rstrip("\n") + "\n"


def _json(report: FullReportResult) -> str:
    doc = report.to_dict()
    from ckptdiff.analyses.base import records  # pandas: not needed to check the directory

    doc["tensors"] = records(report.tensors())
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_directory(report: FullReportResult, directory: str | Path, inputs: Iterable[object] = ()) -> list[Path]:
    """Write the report's files into ``directory`` as one unit (see the module doc); the paths written.

    ``inputs`` (the run's checkpoint paths) are checked not to lie inside ``directory``.
    """
    from ckptdiff.render.figures import figures as make_figures
    from ckptdiff.render.html import to_html

    target = check_directory(directory, inputs)
    if not writes_files():  # under torchrun ranks only rank 0 writes; the others hold identical results
        return []
    figs = make_figures(report)
    files = {
        "index.html": to_html(report, figs),
        "report.md": to_markdown_dir(report, figs),
        "tensors.csv": report.tensors().to_csv(index=False),
        "report.json": _json(report),
    }
    return write_files(target, files, figs)


def write_trajectory(result: TrajectoryResult, directory: str | Path, inputs: Iterable[object] = ()) -> list[Path]:
    """``ckptdiff trajectory -o DIR``: the same layout as ``report`` (index.html, report.md, figures/, tensors.csv
    in long form with a step column, report.json), plus steps.csv; written as one unit."""
    from ckptdiff.analyses.base import records, to_json_dict
    from ckptdiff.render.figures import trajectory_figures
    from ckptdiff.render.html import to_html_page
    from ckptdiff.render.text import to_markdown

    target = check_directory(directory, inputs)
    if not writes_files():
        return []
    figs = trajectory_figures(result)
    rep = result.report()
    first, last = result.steps[0], result.steps[-1]
    lede = f"{len(result.checkpoints)} checkpoints of one run, steps {first} to {last}."
    html = to_html_page(
        "ckptdiff trajectory",
        lede,
        rep.header,
        [("Update sparsity over the run", rep, figs)],
        "Per-step rows are in steps.csv, per-tensor rows in tensors.csv, next to this page.",
    )
    md = to_markdown(rep).splitlines()
    md[0] = "# ckptdiff trajectory"
    for fig in figs:
        md += ["", f"![{fig.title}](figures/{fig.name}.svg)", "", f"*{fig.caption}*"]
    doc = to_json_dict(rep)
    doc["steps"] = records(result.steps_frame())
    files = {
        "index.html": html,
        "report.md": "\n".join(md).rstrip("\n") + "\n",
        "tensors.csv": rep.tensors.to_csv(index=False),
        "steps.csv": result.steps_frame().to_csv(index=False),
        "report.json": json.dumps(doc, indent=2, allow_nan=False) + "\n",
    }
    return write_files(target, files, figs)


def write_files(target: Path, files: dict[str, str], figs: Sequence[Figure] = ()) -> list[Path]:
    """Write ``files`` (name -> text) and ``figs`` (under figures/) with the manifest into ``target`` (already
    checked by :func:`check_directory`) as one unit: into a temporary folder beside it, then renamed into place."""
    parent = target.parent if str(target.parent) else Path(".")
    with signals_held():  # a signal between making the folder and the try below would leave it behind
        try:
            tmp = temp_folder(parent / target.name)
        except OSError as e:
            raise write_error("--out", target, e) from None
    written = [*files, *(f"figures/{f.name}.svg" for f in figs)]
    try:
        (tmp / "figures").mkdir()
        for fig in figs:
            (tmp / "figures" / f"{fig.name}.svg").write_text(fig.svg, encoding="utf-8")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        manifest = {"ckptdiff_report": 1, "files": written}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        mode = 0o777 & ~_umask()
        os.chmod(tmp, mode)
        if target.exists():
            with signals_held():  # the two renames go together: a signal waits until both are done
                old = temp_folder(parent / target.name, "old")
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
    return [target / name for name in written]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
