"""Hostile inputs: every one is refused with exit 2 and one line naming the file, no traceback, nothing written.

Each case builds its input in tmp_path and runs the CLI (typer's CliRunner, as the other CLI tests do). A
case that used to hang (a named pipe) runs under an alarm, so a regression fails instead of blocking; the case
that used to kill the process (a file truncated while it is read: SIGBUS) runs in a subprocess.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import assert_refused
from safetensors.torch import save_file

W = torch.arange(16, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# builders: each writes one bad checkpoint into a folder and returns its path


def _header(folder: Path, text: str, data: int = 64, name: str = "bad.safetensors") -> Path:
    raw = text.encode()
    path = folder / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


def _entry(shape: str = "[16]", offsets: str = "[0,64]", dtype: str = '"F32"') -> str:
    return '{"w":{"dtype":' + dtype + ',"shape":' + shape + ',"data_offsets":' + offsets + "}}"


def _bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _pt(folder: Path, obj: object, name: str = "bad.pt") -> Path:
    path = folder / name
    torch.save(obj, path)
    return path


def _short_record(folder: Path) -> Path:
    """A .pt whose data record holds fewer bytes than its tensor needs (torch.load without mmap refuses it)."""
    good = _pt(folder, {"w": W}, "good-copy.pt")
    path = folder / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:56] if info.filename.endswith("data/0") else data)
    good.unlink()
    return path


def _truncated_pt(folder: Path) -> Path:
    path = _pt(folder, {"w": W})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this would run code",))


def _sparse(folder: Path) -> Path:
    return _pt(folder, {"w": torch.sparse_coo_tensor([[0, 3]], [1.0, 2.0], (16,), check_invariants=True)})


def _quantized(folder: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(W, 0.5, 0, torch.qint8)
    return _pt(folder, {"w": q})


def _fifo(folder: Path, name: str = "bad.safetensors") -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def _fifo_shard(folder: Path) -> Path:
    d = folder / "fifo-folder"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    return d


def _loop(folder: Path, name: str = "bad.safetensors") -> Path:
    path = folder / name
    path.symlink_to(path.name)
    return path


# (case id, builder, base kind, text the message must hold, whether it names tensor 'w')
Builder = Callable[[Path], Path]
CASES: list[tuple[str, Builder, str, str, bool]] = [
    ("float dim", lambda d: _header(d, _entry(shape="[16.0]")), "st", "shape [16.0]", True),
    ("bool dim", lambda d: _header(d, _entry(shape="[true]", dtype='"BOOL"'), 1), "st", "shape [true]", True),
    ("string offset", lambda d: _header(d, _entry(offsets='[0,"64"]')), "st", "data_offsets", True),
    ("float offset", lambda d: _header(d, _entry(offsets="[0,64.0]")), "st", "data_offsets", True),
    ("negative dims", lambda d: _header(d, _entry(shape="[-4,-4]")), "st", "shape [-4, -4]", True),
    ("2^64 dim", lambda d: _header(d, _entry(shape="[18446744073709551616,0]", offsets="[0,0]"), 0), "st",
     "shape", True),
    ("dim past PyTorch", lambda d: _header(d, _entry(shape="[9223372036854775808,0]", offsets="[0,0]"), 0), "st",
     "2^63", True),
    ("repeated tensor name",
     lambda d: _header(d, '{"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},'
                          '"w":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}}'), "st", "twice", True),
    ("__metadata__ list", lambda d: _header(d, '{"__metadata__":[1],' + _entry()[1:]), "st", "__metadata__", False),
    ("__metadata__ string", lambda d: _header(d, '{"__metadata__":"x",' + _entry()[1:]), "st", "__metadata__", False),
    ("__metadata__ number value", lambda d: _header(d, '{"__metadata__":{"k":1},' + _entry()[1:]), "st",
     "__metadata__", False),
    ("Infinity offset", lambda d: _header(d, _entry(offsets="[0,Infinity]")), "st", "Infinity", False),
    ("5000-digit offset", lambda d: _header(d, _entry(offsets="[0," + "9" * 5000 + "]")), "st", "out of range",
     False),
    ("1e400 dim", lambda d: _header(d, _entry(shape="[1e400]")), "st", "out of range", False),
    ("100,000 levels of nesting", lambda d: _header(d, '{"w":' + "[" * 100_000 + "]" * 100_000 + "}", 0), "st",
     "nested", False),
    ("bytes after the last tensor", lambda d: _header(d, _entry(), 65), "st", "after its last tensor", False),
    ("gap before a tensor", lambda d: _header(d, _entry(shape="[15]", offsets="[4,64]")), "st", "gap", True),
    ("record shorter than its tensor", _short_record, "pt", "holds 56", True),
    ("empty .pt", lambda d: _bytes(d, "bad.pt", b""), "pt", "is empty (0 bytes)", False),
    ("random .bin", lambda d: _bytes(d, "bad.bin", bytes(range(256)) * 8), "pt", "neither a zip archive", False),
    ("truncated .pt", _truncated_pt, "pt", "is truncated or corrupt", False),
    ("sparse tensor", _sparse, "pt", "sparse COO", True),
    ("quantized tensor", _quantized, "pt", "quantized", False),
    ("pickle that runs code", lambda d: _pt(d, {"w": W, "x": _Evil()}), "pt", "imports print", False),
    ("named pipe", _fifo, "st", "named pipe", False),
    ("named pipe .pt", lambda d: _fifo(d, "bad.pt"), "pt", "named pipe", False),
    ("named pipe as the folder's shard", _fifo_shard, "st", "named pipe", False),
    ("symlink loop", _loop, "st", "symbolic link loop", False),
]


@pytest.fixture
def bases(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "base"
    d.mkdir()
    save_file({"w": W}, str(d / "base.safetensors"))
    torch.save({"w": W}, d / "base.pt")
    return {"st": d / "base.safetensors", "pt": d / "base.pt"}


@pytest.mark.parametrize(("build", "kind", "expect", "names_tensor"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sparsity_refuses(
    tmp_path: Path, bases: dict[str, Path], build: Builder, kind: str, expect: str, names_tensor: bool
) -> None:
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    bad = build(bad_dir)
    args = ["sparsity", str(bases[kind]), str(bad), "--csv", str(tmp_path / "out.csv"),
            "--json", str(tmp_path / "out.json"), "-q"]
    line = assert_refused(args, tmp_path, [bad.name], expect)
    if names_tensor:
        assert "'w'" in line


@pytest.mark.parametrize(
    ("build", "expect"),
    [(_fifo, "named pipe"), (_fifo_shard, "named pipe"), (_loop, "symbolic link loop")],
    ids=["named pipe", "pipe shard", "symlink loop"],
)
def test_check_header_only_refuses(tmp_path: Path, bases: dict[str, Path], build: Builder, expect: str) -> None:
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    bad = build(bad_dir)
    args = ["check", str(bases["st"]), str(bad), "--header-only", "--same-keys", "--json", str(tmp_path / "out.json")]
    assert_refused(args, tmp_path, [bad.name], expect)


def test_consistency_refuses_symlink_loop(tmp_path: Path, bases: dict[str, Path]) -> None:
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    bad = _loop(bad_dir)
    args = ["consistency", str(bases["st"]), str(bases["st"]), str(bad), "--csv", str(tmp_path / "out.csv"), "-q"]
    assert_refused(args, tmp_path, [bad.name], "symbolic link loop")


def test_consistency_refuses_named_pipe(tmp_path: Path, bases: dict[str, Path]) -> None:
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    bad = _fifo(bad_dir)
    args = ["consistency", str(bases["st"]), str(bases["st"]), str(bad), "--csv", str(tmp_path / "out.csv"), "-q"]
    assert_refused(args, tmp_path, [bad.name], "named pipe")


# A .pt truncated after ckptdiff validated it and before it reads the data (a training job overwriting its
# checkpoint): memory-mapped reads die of SIGBUS, positioned reads report it. In a subprocess, so that a
# regression kills that process, not the test run.
_TRUNCATE_DURING_READ = """
import os, sys
from ckptdiff.io.formats import torch_file
from ckptdiff.cli import main

victim = sys.argv[2]
original = torch_file.TorchFileSource.read

def read(self, name, *args, **kwargs):
    os.truncate(victim, 64)
    return original(self, name, *args, **kwargs)

torch_file.TorchFileSource.read = read
sys.argv = ["ckptdiff", "sparsity", *sys.argv[1:], "-q"]
main()
"""


def test_pt_truncated_while_read(tmp_path: Path) -> None:
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: its pages lie past the 64 bytes left after the cut
    base = _pt(tmp_path, {"w": big}, "base.pt")
    victim = _pt(tmp_path, {"w": big + 1}, "ft.pt")
    out = tmp_path / "out.csv"
    proc = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_DURING_READ, str(base), str(victim), "--csv", str(out)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error: ") and victim.name in lines[0], proc.stderr
    assert "ended early" in lines[0]
    assert not out.exists()


def test_short_record_message_matches_torch(tmp_path: Path) -> None:
    """torch.load without mmap refuses the short record too; with mmap it reads past it (the original bug)."""
    bad = _short_record(tmp_path)
    with pytest.raises(RuntimeError, match="size"):
        torch.load(bad, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Hub headers (check --header-only on a Hub id): huggingface_hub parses them, ckptdiff checks what it got


def _hub_header_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Callable[..., object]) -> str:
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake)
    args = ["check", "org/model", "org/model", "--header-only", "--same-keys", "--json", str(tmp_path / "out.json")]
    return assert_refused(args, tmp_path, ["org/model"], "corrupt")


@pytest.mark.parametrize("shape", [[2.0], [-1], [True], ["2"], [2**64]], ids=str)
def test_hub_header_with_bad_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: list[object]) -> None:
    from factory import hub_metadata

    meta = hub_metadata({"w": torch.zeros(2)}, shards=1)
    meta.files_metadata["model-00001-of-00001.safetensors"].tensors["w"].shape = shape
    line = _hub_header_only(tmp_path, monkeypatch, lambda repo_id, **kw: meta)
    assert "'w'" in line


def test_hub_header_that_huggingface_hub_cannot_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def malformed(repo_id: str, **kw: object) -> object:
        raise TypeError("'float' object cannot be interpreted as an integer")

    _hub_header_only(tmp_path, monkeypatch, malformed)
