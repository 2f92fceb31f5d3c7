"""Writing safetensors files as a stream: the header first (every tensor's dtype, shape and offsets are known up
front), then each tensor's bytes in header order, so a file larger than memory is written one tensor at a time.

The layout is the format's own: an 8-byte little-endian length N, N bytes of UTF-8 JSON (padded with spaces so
that the data section starts on an 8-byte boundary, as the ``safetensors`` library pads it), then the tensors'
bytes back to back with no gap, in the order given. What is written is read back by ``safetensors.safe_open`` and
by :mod:`ckptdiff.io.formats.safetensors_header` alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from ckptdiff.io.formats.safetensors_header import DTYPE_BITS, MAX_HEADER_BYTES


@dataclass(frozen=True)
class Planned:
    """One tensor of a file to be written: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_BITS[self.dtype] // 8


def header_bytes(tensors: Sequence[Planned], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header of a file holding ``tensors`` in this order (data section after)."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        if t.name == "__metadata__" or t.name in doc:
            raise ValueError(f"safetensors writer: tensor name {t.name!r} is reserved or repeated")
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors writer: the header would take {len(raw):,} bytes, past the format's limit")
    return len(raw).to_bytes(8, "little") + raw


class StreamWriter:
    """Writes one safetensors file to ``f``: the header at once, then :meth:`write` each tensor's bytes in order."""

    def __init__(self, f: IO[bytes], tensors: Sequence[Planned], metadata: dict[str, str] | None = None):
        self.f = f
        self.tensors = list(tensors)
        self.next = 0
        self.left = 0  # bytes still owed to the tensor being written
        f.write(header_bytes(self.tensors, metadata))
        self._advance()

    def _advance(self) -> None:
        while self.left == 0 and self.next < len(self.tensors):
            self.left = self.tensors[self.next].nbytes
            self.next += 1

    def write(self, data: bytes | memoryview) -> None:
        """The next bytes of the current tensor (a tensor may come in pieces; empty tensors are skipped)."""
        n = len(data)
        if n > self.left:
            name = self.tensors[self.next - 1].name if self.next else "?"
            raise ValueError(f"safetensors writer: {n} bytes given for {name!r}, which takes {self.left} more")
        self.f.write(data)
        self.left -= n
        self._advance()

    def close(self) -> None:
        """Check that every tensor got all its bytes."""
        if self.left or self.next < len(self.tensors):
            raise ValueError("safetensors writer: the file was closed before every tensor was written")
