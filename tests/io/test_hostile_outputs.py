"""Hostile output destinations: an output never replaces or deletes a file the run did not write.

The contract for every destination (``--csv``, ``--json``, ``--save-masks``, ``report -o``): a file the run
reads or could read (weights, index, ``config.json``, tokenizer and adapter files, anything in an input
folder) is refused before any work, with exit 2 and one line naming it; ``report -o`` replaces only a report
ckptdiff wrote (its manifest lists every file), never a folder holding a user's file or an input, never through
a symbolic link; and a signal at any moment leaves no temporary file behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from hostile import assert_refused, invoke
from safetensors.torch import save_file

from ckptdiff.io import outputs
from ckptdiff.render import report_dir

W = torch.arange(16, dtype=torch.float32)


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """A base folder (weights, config.json, index, tokenizer) and a fine-tune file."""
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": W}, str(base / "model.safetensors"))
    for name, text in (("config.json", '{"model_type": "llama"}'), ("tokenizer.json", "{}"), ("notes.txt", "mine")):
        (base / name).write_text(text)
    ft = tmp_path / "ft" / "model.safetensors"
    ft.parent.mkdir()
    save_file({"w": W + 1}, str(ft))
    (ft.parent / "generation_config.json").write_text("{}")
    (ft.parent / "adapter_config.json").write_text("{}")
    return base, ft


@pytest.mark.parametrize(
    "victim",
    [
        "base/config.json",
        "base/tokenizer.json",
        "base/notes.txt",
        "ft/generation_config.json",
        "ft/adapter_config.json",
    ],
)
def test_an_output_onto_a_file_beside_the_weights_is_refused(tmp_path: Path, victim: str) -> None:
    base, ft = _pair(tmp_path)
    target = tmp_path / victim
    before = target.read_bytes()
    args = ["sparsity", str(base), str(ft), "--csv", str(target), "--json", str(tmp_path / "out.json")]
    assert_refused(args, tmp_path, [str(target)], "input of this run")
    assert target.read_bytes() == before


def test_an_output_onto_the_index_is_refused(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    index = base / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "model.safetensors"}}')
    before = index.read_bytes()
    assert_refused(["sparsity", str(base), str(ft), "--csv", str(index)], tmp_path, [str(index)], "input of this run")
    assert index.read_bytes() == before


def test_a_new_file_in_an_input_folder_is_allowed(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    code, _, output, _ = invoke(["sparsity", str(base), str(ft), "--csv", str(base / "new.csv"), "-q"])
    assert code == 0, output
    assert (base / "new.csv").read_text().startswith("tensor,")


# ---------------------------------------------------------------------------------------------
# report -o


def _report(args: list[str]) -> tuple[int, str]:
    code, stderr, output, _ = invoke(["report", *args, "-q", "--k", "4", "--analyses", "sparsity"])
    return code, stderr or output


def test_report_over_an_earlier_report_keeps_a_users_file_and_refuses(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    rep = tmp_path / "rep"
    assert _report([str(base), str(ft), "-o", str(rep)])[0] == 0
    thesis = rep / "figures" / "my-thesis.tex"
    thesis.write_text("\\section{Results}")
    before = {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    code, message = _report([str(base), str(ft), "-o", str(rep)])
    assert code == 2 and "figures/my-thesis.tex" in message and len(message.strip().splitlines()) == 1, message
    assert {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()} == before


def test_report_over_a_folder_holding_an_input_is_refused(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    rep = tmp_path / "rep"
    assert _report([str(base), str(ft), "-o", str(rep)])[0] == 0
    inside = rep / "figures" / "base.safetensors"
    save_file({"w": W}, str(inside))
    code, message = _report([str(inside), str(ft), "-o", str(rep)])
    assert code == 2 and "input of this run" in message and str(inside) in message, message
    assert inside.exists()


def test_report_through_a_symlink_to_an_earlier_report_is_refused(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    earlier = tmp_path / "earlier"
    assert _report([str(base), str(ft), "-o", str(earlier)])[0] == 0
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    link = tmp_path / "rep"
    link.symlink_to(earlier, target_is_directory=True)
    code, message = _report([str(base), str(ft), "-o", str(link)])
    assert code == 2 and "symbolic link" in message, message
    assert link.is_symlink() and {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before


def test_report_replaces_its_own_earlier_report_and_lists_what_it_wrote(tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    rep = tmp_path / "rep"
    assert _report([str(base), str(ft), "-o", str(rep)])[0] == 0
    stale = rep / "figures" / "stale.svg"
    manifest = rep / report_dir.MANIFEST
    text = manifest.read_text().replace('"files": [', '"files": [\n  "figures/stale.svg",')
    manifest.write_text(text)  # an earlier report that wrote a figure this one does not
    stale.write_text("<svg/>")
    assert _report([str(base), str(ft), "-o", str(rep)])[0] == 0
    assert not stale.exists()
    listed = set(report_dir._manifest(rep) or ())
    on_disk = {str(p.relative_to(rep)) for p in rep.rglob("*") if p.is_file()} - {report_dir.MANIFEST}
    assert listed == on_disk and "index.html" in listed


# ---------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("nth", [1, 2], ids=["while checking the destination", "while opening it for writing"])
def test_a_signal_as_a_temporary_file_is_made_leaves_none_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    """SIGTERM lands right after the temporary file exists and before ckptdiff has noted it: the file goes."""
    base, ft = _pair(tmp_path)
    real = outputs._create_temp
    calls = [0]

    def create_then_signal(target: Path) -> tuple[int, Path]:
        made = real(target)
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return made

    monkeypatch.setattr(outputs, "_create_temp", create_then_signal)
    code, _, output, _ = invoke(["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "-q"])
    assert code == 143, output
    assert calls[0] == nth
    assert not list(tmp_path.glob(".out.csv.*")) and not (tmp_path / "out.csv").exists()


def test_report_over_a_folder_whose_manifest_is_a_pipe_is_refused_at_once(tmp_path: Path) -> None:
    """The manifest is read like any side file: a named pipe in its place is no manifest, not a hang."""
    base, ft = _pair(tmp_path)
    rep = tmp_path / "rep"
    rep.mkdir()
    os.mkfifo(rep / report_dir.MANIFEST)
    code, message = _report([str(base), str(ft), "-o", str(rep)])
    assert code == 2 and "not a report ckptdiff wrote" in message, message
    assert (rep / report_dir.MANIFEST).is_fifo()
