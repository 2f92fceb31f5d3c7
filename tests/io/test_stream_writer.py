"""The streaming safetensors writer (io/formats/safetensors_writer.py) and OutputFolder (io/outputs.py): what they
write is what the safetensors library reads, and a folder is put in place whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptdiff.errors import InputError
from ckptdiff.io.formats.safetensors import read_safetensors_header
from ckptdiff.io.formats.safetensors_writer import Planned, StreamWriter
from ckptdiff.io.outputs import OutputFolder


def test_a_file_written_in_pieces_reads_back_with_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b.bias": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, dtype=torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "c.weight": torch.arange(5, dtype=torch.int16).to(torch.bfloat16),
    }
    names = {torch.float32: "F32", torch.bool: "BOOL", torch.bfloat16: "BF16", torch.int64: "I64"}
    plan = [Planned(n, names[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        writer = StreamWriter(f, plan, {"format": "pt", "note": "ünïcode"})
        for t in tensors.values():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for at in range(0, len(raw), 5):  # pieces cut anywhere
                writer.write(raw[at : at + 5])
        writer.close()
    raw = path.read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0
    with safe_open(str(path), "pt") as s:
        assert s.metadata() == {"format": "pt", "note": "ünïcode"}
        for n, t in tensors.items():
            got = s.get_tensor(n)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), n
    infos, _, meta = read_safetensors_header(path)  # ckptdiff's own strict parser agrees
    assert list(infos) == list(tensors) and meta["note"] == "ünïcode"


def test_the_writer_refuses_too_many_or_too_few_bytes(tmp_path: Path) -> None:
    with open(tmp_path / "y.safetensors", "wb") as f:
        writer = StreamWriter(f, [Planned("a", "F32", (2,))], None)
        with pytest.raises(ValueError, match="takes 8 more"):
            writer.write(b"\0" * 9)
        writer.write(b"\0" * 4)
        with pytest.raises(ValueError, match="before every tensor"):
            writer.close()


def test_an_output_folder_appears_whole_and_refuses_to_replace(tmp_path: Path) -> None:
    target = tmp_path / "out"
    folder = OutputFolder("--out", target)
    folder.open("a.bin").write(b"one")
    folder.open("b.bin").write(b"two")
    assert not target.exists()  # nothing in place before the commit
    folder.commit()
    assert sorted(os.listdir(target)) == ["a.bin", "b.bin"] and (target / "b.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left
    with pytest.raises(InputError, match="not empty"):
        OutputFolder("--out", target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        OutputFolder("--out", tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="symbolic link"):
        OutputFolder("--out", tmp_path / "link")
    with pytest.raises(InputError, match="does not exist"):
        OutputFolder("--out", tmp_path / "no" / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    again = OutputFolder("--out", empty)  # an empty folder is taken over
    again.open("c.bin").write(b"3")
    again.discard()
    assert list(empty.iterdir()) == [] and not list(tmp_path.glob(".empty*"))
    again = OutputFolder("--out", empty)
    again.open("c.bin").write(b"3")
    again.commit()
    assert (empty / "c.bin").read_bytes() == b"3"
