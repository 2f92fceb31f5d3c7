"""PyTorch files through positioned reads: every layout torch.save writes reads back bit-exactly, whole and in
chunks into a reused buffer; archives that cannot be read this way are refused with their own reason."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptdiff.errors import InputError
from ckptdiff.io.formats.torch_file import TorchFileSource
from ckptdiff.io.resolve import open_stored


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().reshape(-1)
    return flat if flat.dtype == torch.bool else flat.view(torch.uint8)


def _layouts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 8, generator=g)
    return {
        "transposed": big.t(),
        "strided slice": big[1:5:2, 2:7],
        "storage offset": big.reshape(-1)[5:20],
        "tied": big,
        "parameter": torch.nn.Parameter(torch.randn(3, 3, generator=g)),
        "bool": torch.rand(10, generator=g) > 0.5,
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "fp8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "u16": torch.arange(9).to(torch.uint16),
        "expanded": torch.randn(1, 4, generator=g).expand(3, 4),
    }


def test_every_layout_reads_back(tmp_path: Path) -> None:
    sd = _layouts()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
    src = open_stored(str(tmp_path / "m.pt"))
    assert isinstance(src, TorchFileSource)
    out = np.empty(64, dtype=np.uint8)
    try:
        for name, want in sd.items():
            got = src.read_full(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(_bits(got), _bits(want)), name
            flat = want.reshape(-1)
            for start in range(0, flat.numel(), 3):
                count = min(3, flat.numel() - start)
                part = src.read(name, start, count, out=out)
                assert torch.equal(_bits(part), _bits(flat[start : start + count])), (name, start)
    finally:
        src.close()


def test_empty_safetensors_tensor_reads(tmp_path: Path) -> None:
    save_file({"e": torch.empty(0, 4), "w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    src = open_stored(str(tmp_path / "m.safetensors"))
    assert src.read_full("e").shape == (0, 4)
    assert src.read("e", 0, 0, out=np.empty(8, dtype=np.uint8)).numel() == 0
    src.close()


def _torchscript_like(path: Path) -> None:
    """The records torch.jit.save writes that tell a TorchScript archive apart (torch.jit is deprecated)."""
    with zipfile.ZipFile(path, "w") as z:
        for record in ("data.pkl", "constants.pkl", "code/__torch__.py", "version"):
            z.writestr(f"model/{record}", b"\x80\x02}q\x00." if record.endswith(".pkl") else b"1")


def _rezip(src: Path, dst: Path, edit: dict[str, bytes], compress: str = "") -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit.get(info.filename.split("/", 1)[1], zin.read(info.filename))
            method = zipfile.ZIP_DEFLATED if compress and info.filename.endswith(compress) else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=method)
    return dst


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda p: torch.save({"w": torch.ones(4)}, p, _use_new_zipfile_serialization=False), r"legacy \(non-zip\)"),
        (lambda p: _torchscript_like(p), "TorchScript"),
        (lambda p: p.write_bytes(b"\x20\0\0\0\0\0\0\0{}" + b" " * 30), "looks like a safetensors file"),
        (lambda p: torch.save([torch.ones(2)], p), "not a state dict"),
        (lambda p: torch.save({"w": torch.ones(2, dtype=torch.complex64)}, p), "does not support"),
        (lambda p: torch.save({"w": torch.ones(2, device="meta")}, p), "no data in the file"),
    ],
    ids=["legacy", "torchscript", "safetensors renamed", "list", "complex", "meta tensor"],
)
def test_unreadable_archives(tmp_path: Path, make: object, expect: str) -> None:
    path = tmp_path / "m.pt"
    make(path)  # type: ignore[operator]
    with pytest.raises(InputError, match=expect):
        open_stored(str(path))


def test_repacked_archives(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(16.0)}, good)
    big_endian = _rezip(good, tmp_path / "big.pt", {"byteorder": b"big"})
    with pytest.raises(InputError, match="big-endian"):
        open_stored(str(big_endian))
    deflated = _rezip(good, tmp_path / "deflated.pt", {}, compress="data/0")
    with pytest.raises(InputError, match="compressed"):
        open_stored(str(deflated))
    missing = tmp_path / "missing.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(missing, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("data/0"):
                zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(InputError, match="data/0, which is missing"):
        open_stored(str(missing))
    src = open_stored(str(_rezip(good, tmp_path / "same.pt", {})))  # re-zipped by Python, still readable
    assert torch.equal(src.read_full("w"), torch.arange(16.0))
    src.close()
