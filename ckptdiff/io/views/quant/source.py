"""The quantized views: :class:`QuantSource` (quantized weights read as fp32), :class:`StoredSource`
(``--as-stored``: every part as stored, noted), :func:`wrap` (which of the two, if any), and :class:`Stats` (codes
and scale groups changed, for the sparsity CSV). Nothing here knows a format: ``recognise`` does.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views import config as model_config
from ckptdiff.io.views import fp8
from ckptdiff.io.views.config import ModelConfig
from ckptdiff.io.views.quant.base import Codec, Found, QuantInfo, Refusal, quant_config, refuse
from ckptdiff.io.views.quant.recognise import recognise, stored_part, suspect, unsupported_names

F32 = dtypes.BY_NAME["F32"]
PIECE = 1 << 22  # logical entries dequantized at a time (at least one row)
_PURPOSE = "its quantization_config to dequantize the quantized weights"
_KEPT = 4  # stored tensors kept whole per source (GPTQ/AWQ are unpacked whole)

_AS_STORED: ContextVar[bool] = ContextVar("ckptdiff_as_stored", default=False)


@contextmanager
def as_stored(on: bool = True) -> Iterator[None]:
    """Within this block, checkpoints opened are compared as stored: nothing dequantized (``--as-stored``)."""
    token = _AS_STORED.set(on)
    try:
        yield
    finally:
        _AS_STORED.reset(token)


def stored_wanted() -> bool:
    """Whether the comparison is of stored tensors, on purpose (``--as-stored``)."""
    return _AS_STORED.get()


def _order(src: Source) -> dict[str, int]:
    return {n: k for k, n in enumerate(src.infos)}


# ---------------------------------------------------------------------------------------------
# the source


class QuantSource(Source):
    """A source whose quantized weights read as fp32 in their logical shape (see the module doc)."""

    def __init__(self, inner: Source, found: Found, why: str):
        first: dict[str, str] = {}  # the first stored part of each quantized weight -> its logical name
        order = _order(inner)
        for name, codec in found.codecs.items():
            first.setdefault(min((p.name for _, p in codec.parts), key=order.__getitem__), name)
        infos: dict[str, TensorInfo] = {}
        for name, info in inner.infos.items():
            logical = first.get(name)
            if logical is not None:
                codec = found.codecs[logical]
                infos[logical] = QuantInfo(logical, F32, codec.shape, info.file, codec=codec, origin=logical)
            if name not in found.hidden and name not in found.codecs:
                infos[name] = info
        what = ", ".join(f"{n} {fmt}" for fmt, n in sorted(found.formats.items()))
        super().__init__(
            inner.spec,
            f"{inner.resolved} [quantized: {what} weights dequantized to fp32 ({why})]",
            infos,
            dict(inner.tied),
        )
        self.inner = inner
        self._lock = threading.Lock()
        self._whole: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memo: dict[str, Any] = {}  # a codec's unpacked form of the tensor read last (see remember)

    def remember(self, key: str, value: Any) -> None:
        """Keep ``value`` for ``key`` (a codec's unpacked tensor), dropping what was kept before: the chunks of one
        tensor are read in turn, so one is enough, and memory stays that of one tensor."""
        with self._lock:
            self.memo = {key: value}

    def whole(self, info: TensorInfo) -> torch.Tensor:
        """A stored tensor whole, in its stored shape; the last few kept."""
        with self._lock:
            hit = self._whole.get(info.name)
            if hit is not None:
                self._whole.move_to_end(info.name)
                return hit
        value = self.inner.read_full(info.name)
        with self._lock:
            self._whole[info.name] = value
            while len(self._whole) > _KEPT:
                self._whole.popitem(last=False)
        return value

    def codec(self, name: str) -> Codec | None:
        info = self.infos.get(name)
        return info.codec if isinstance(info, QuantInfo) else None

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        codec = self.codec(name)
        if codec is None:
            return self.inner.read(name, start, count, out)
        total = math.prod(codec.shape)
        n = total - start if count is None else count
        if n <= 0:
            return torch.empty(0, dtype=torch.float32)
        need = 4 * n
        buf = out[:need] if out is not None and out.nbytes >= need else np.empty(need, dtype=np.uint8)
        values = torch.from_numpy(buf).view(torch.float32)
        for pos, vals in self.pieces(codec, start, n):
            values[pos : pos + vals.numel()] = vals
        return values

    def pieces(self, codec: Codec, start: int, n: int, codes: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """(position, values or codes) of logical entries [start, start + n), a bounded slab of rows at a time."""
        per = max(codec.row_len, 1)
        step = max(1, PIECE // per)
        end = start + n
        r = start // per
        while r * per < end:
            r1 = min(-(-end // per), r + step)
            got = codec.codes(self, r, r1) if codes else codec.values(self, r, r1)
            lo, hi = max(start, r * per) - r * per, min(end, r1 * per) - r * per
            yield max(start, r * per) - start, got[lo:hi]
            r = r1

    def close(self) -> None:
        with self._lock:
            self._whole.clear()
            self.memo = {}
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()

    def remote_config(self) -> tuple[str, bytes] | None:
        return self.inner.remote_config()


class StoredSource(Source):
    """``--as-stored``: every tensor as stored; the parts of quantized weights carry a note saying so."""

    def __init__(self, inner: Source, marked: Mapping[str, str], what: str):
        infos: dict[str, TensorInfo] = {}
        for name, info in inner.infos.items():
            note = marked.get(name)
            infos[name] = QuantInfo(name, info.dtype, info.shape, info.file, note=note, origin=name) if note else info
        super().__init__(inner.spec, f"{inner.resolved} [as stored: {what}]", infos, dict(inner.tied))
        self.inner = inner

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        return self.inner.read(name, start, count, out)

    def close(self) -> None:
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()

    def remote_config(self) -> tuple[str, bytes] | None:
        return self.inner.remote_config()


def _stored(src: Source) -> Source:
    """``src`` with every part of a quantized weight noted as compared raw (``--as-stored``)."""
    try:
        config = model_config.load(src, _PURPOSE)
    except InputError:
        config = None
    marked: dict[str, str] = {}
    try:
        found = recognise(src, config)
        for name, codec in found.codecs.items():
            for _, part in codec.parts:
                marked[part.name] = f"as stored (--as-stored): part of {codec.fmt} weight {name}, raw storage compared"
        for name in found.hidden - set(marked):
            marked[name] = "as stored (--as-stored): quantization metadata, raw storage compared"
    except Refusal:
        pass
    infos = src.infos
    for name in infos:
        if stored_part(name, infos):
            marked.setdefault(name, "as stored (--as-stored): quantized storage compared raw")
    for name, info in src.infos.items():
        if name.endswith(fp8.SCALE_SUFFIX) or (fp8.is_fp8(info) and name not in marked):
            marked.setdefault(name, "as stored (--as-stored): fp8 storage compared without its scale")
    if not marked:
        return src
    return StoredSource(src, marked, f"{len(marked)} quantized tensors compared as raw storage, on purpose")


def wrap(src: Source) -> Source:
    """``src`` with its quantized weights read as fp32 values (a :class:`QuantSource`), or ``src`` itself when none
    is recognised; :class:`Refusal` (exit 2, hint ``--as-stored``) for a layout not dequantized or a contradiction.
    Under :func:`as_stored`, ``src`` with its quantized parts noted instead."""
    if isinstance(src, (QuantSource, StoredSource)):
        return src
    if stored_wanted():
        return _stored(src)
    odd, layout = unsupported_names(src)
    if odd:
        raise refuse(src, f"tensor {odd!r} belongs to the {layout} layout, which ckptdiff does not dequantize")
    looks = any(suspect(n) for n in src.infos)
    config = model_config.load(src, _PURPOSE) if looks else _config_if_any(src)
    if not looks and not quant_config(config):
        return src
    found = recognise(src, config)
    if not found.codecs:
        return src
    q = quant_config(config)
    why = f"config.json quant_method {q['quant_method']}" if q.get("quant_method") else "recognised from the tensors"
    return QuantSource(src, found, why)


def _config_if_any(src: Source) -> ModelConfig | None:
    """The local config of a checkpoint with no quantized-looking tensor (to catch a config that says it is
    quantized); None when it is absent, unreadable (nothing here needs it then) or remote (not fetched for this)."""
    d = model_config.folder(src)
    if d is None or not (d / model_config.NAME).is_file():
        return None
    try:
        return model_config.load(src, _PURPOSE)
    except InputError:
        return None


def find(src: Source) -> QuantSource | None:
    """The :class:`QuantSource` inside ``src`` (itself or a wrapper's ``inner``), if any."""
    seen = 0
    while seen < 8:
        if isinstance(src, QuantSource):
            return src
        inner = getattr(src, "inner", None)
        if not isinstance(inner, Source):
            return None
        src, seen = inner, seen + 1
    return None


# ---------------------------------------------------------------------------------------------
# codes and scales changed, for the sparsity CSV


def _slice(info: QuantInfo) -> tuple[int, int]:
    """(first logical row, rows) of a tensor in its quantized weight: an expert slice is one row of the stack."""
    assert info.codec is not None
    if info.name != info.origin and info.name.endswith("]") and "[" in info.name:
        e = int(info.name[info.name.rindex("[") + 1 : -1])
        return e, 1
    return 0, info.codec.shape[0]


class Stats:
    """``codes_changed`` and ``scale_blocks_changed`` of one base/fine-tune pair, for quantized weights (here)
    and block-scaled FP8 weights (:class:`ckptdiff.io.views.fp8.CodeStats`), into one pair of dicts."""

    def __init__(self, base: Source, ft: Source):
        self.fp8 = fp8.CodeStats.for_pair(base, ft)
        self.qa, self.qb = find(base), find(ft)
        self.codes: dict[str, int] = {}
        self.blocks: dict[str, int] = {}
        if self.fp8 is not None:
            self.fp8.codes, self.fp8.blocks = self.codes, self.blocks

    @classmethod
    def for_pair(cls, base: Source, ft: Source) -> Stats | None:
        """Stats for a pair, or None when neither kind of scaled weight is on both sides."""
        made = cls(base, ft)
        if made.fp8 is None and (made.qa is None or made.qb is None):
            return None
        return made

    def _pair(self, item: fp8.Paired) -> tuple[QuantInfo, QuantInfo] | None:
        a, b = item.infos[0], item.infos[-1]
        if not (isinstance(a, QuantInfo) and isinstance(b, QuantInfo) and a.codec and b.codec):
            return None
        if self.qa is None or self.qb is None or type(a.codec) is not type(b.codec) or a.codec.shape != b.codec.shape:
            return None
        return a, b

    def add(self, item: fp8.Paired, start: int, count: int) -> None:
        """Count the changes of ``item`` once, with its first chunk."""
        pair = self._pair(item)
        if pair is None:
            if self.fp8 is not None:
                self.fp8.add(item, start, count)
            return
        if start != 0:
            return
        a, b = pair
        assert a.codec is not None and b.codec is not None and self.qa is not None and self.qb is not None
        r0, rows = _slice(a)
        per = max(a.codec.row_len, 1)
        changed = 0
        for (_, c0), (_, c1) in zip(
            self.qa.pieces(a.codec, r0 * per, rows * per, codes=True),
            self.qb.pieces(b.codec, r0 * per, rows * per, codes=True),
            strict=True,
        ):
            changed += int((c0 != c1).sum())
        self.codes[item.name] = changed
        g0, g1 = a.codec.groups(self.qa, r0, r0 + rows), b.codec.groups(self.qb, r0, r0 + rows)
        if g0.shape == g1.shape:
            self.blocks[item.name] = int((g0 != g1).any(dim=1).sum())

    def columns(self, item: fp8.Paired) -> dict[str, float]:
        nan = float("nan")
        if self._pair(item) is None:
            return self.fp8.columns(item) if self.fp8 is not None else dict.fromkeys(fp8.FP8_COLUMNS, nan)
        if not item.comparable:
            return dict.fromkeys(fp8.FP8_COLUMNS, nan)
        return {
            "codes_changed": self.codes.get(item.name, 0),
            "scale_blocks_changed": self.blocks.get(item.name, nan),
        }

    def close(self) -> None:
        if self.fp8 is not None:
            self.fp8.close()
