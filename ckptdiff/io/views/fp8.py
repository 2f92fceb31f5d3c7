"""Block-scaled FP8 checkpoints (the DeepSeek-V3 layout): each FP8 weight and its scale read as one fp32 tensor.

A weight ``P.weight`` stored as ``F8_E4M3`` or ``F8_E5M2`` beside ``P.weight_scale_inv`` (float, shape
``(⌈m/b₀⌉, ⌈n/b₁⌉)``) is one logical ``m × n`` tensor whose value is

    W[i, j] = float32(Wq[i, j]) · S[i // b₀, j // b₁]

computed in fp32 (the scale is converted to fp32 first, exactly for fp32/bf16/fp16 scales). The block size
``(b₀, b₁)`` comes from the checkpoint's ``config.json`` (``quantization_config.weight_block_size``; found as
:mod:`ckptdiff.io.views.config` says), is ``[128, 128]`` when that config says ``quant_method: fp8`` and omits it, and
is assumed ``[128, 128]`` when there is no config; every scale's shape is checked against it. Edge blocks are
partial, and a block longer than the weight is one block along that dimension: any integer from 1 to
:data:`MAX_BLOCK` is legal, and memory follows the stored data, never the block size. The weight and its scale may
sit in different shards.

:func:`wrap` puts an :class:`Fp8Source` around a source that holds such scales. It presents every such weight as
an fp32 tensor (:class:`Fp8Info`, ``dtype`` F32, the stored weight and scale kept in ``codes`` / ``scale``) and
hides the scales, which are not parameters: they are out of ``numel`` and every rollup. Its ``read`` dequantizes
only the range asked for, in bounded pieces, into the caller's buffer, so every analysis sees dequantized values
unchanged: an entry is changed iff its dequantized fp32 value changed (§1 rules: +0 equals −0, NaN changed;
``--as``/``--rtol``/``--atol`` apply to the dequantized values).

What cannot be dequantized stays visible as stored, with a note that every report lists as a structural finding:
a scale without its weight (or whose weight is not FP8, not a matrix, or does not fit the block size) is compared
as a plain tensor, and its weight read as raw, unscaled FP8 values. An FP8 tensor without a scale in a checkpoint
that has block-scaled weights gets a note too. A weight dequantized on one side and raw FP8 on another is not
compared at all (:func:`mismatch`, status ``scale_mismatch``): its codes without their scale are not its values,
so every count would be an artefact of the missing scale. A bad ``config.json`` (not JSON, a malformed block
size) is an :class:`~ckptdiff.errors.InputError`: it would make every weight unreadable.

:class:`CodeStats` gives the sparsity CSV's ``codes_changed`` (stored FP8 codes that changed, by the §1 bitwise
rule on the FP8 encoding) and ``scale_blocks_changed`` (blocks whose scale changed) from the raw codes and scales
the source kept while dequantizing, so no byte is read twice.

FP8 weights with a compressed-tensors (or ModelOpt, fbgemm) ``weight_scale`` per tensor, channel, group or block
are dequantized by :mod:`ckptdiff.io.views.quant` before this view sees them (:func:`ckptdiff.io.resolve.logical`
applies that view first). Applied alone, to a source that still holds them, this view reads such weights as raw
values with a note, never silently.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views import config as model_config
from ckptdiff.io.views.config import ModelConfig


class Paired(Protocol):
    """What :class:`CodeStats` reads of an aligned tensor (``ckptdiff.engine.alignment.Aligned`` is one; this
    layer does not import the engine above it)."""

    @property
    def name(self) -> str: ...
    @property
    def infos(self) -> Sequence[TensorInfo | None]: ...
    @property
    def comparable(self) -> bool: ...

SCALE_SUFFIX = "_scale_inv"  # P.weight_scale_inv scales P.weight
CT_SCALE_SUFFIX = "_scale"  # compressed-tensors: P.weight_scale (not dequantized, see the module doc)
FP8_NAMES = frozenset({"F8_E4M3", "F8_E5M2"})
DEFAULT_BLOCK = (128, 128)
F32 = dtypes.BY_NAME["F32"]
MAX_BLOCK = (1 << 63) - 1  # the longest dimension a tensor can have: any block up to it is one block or more
PIECE = 1 << 20  # entries dequantized at a time: temporaries stay a few MB for any tensor
_SCALES_KEPT = 64  # scale tensors cached per source (the largest DeepSeek-V3 scale is 56 x 144 fp32)
_CODES_KEPT = 8  # raw code reads kept for CodeStats: more than the reader's prefetch can be ahead
_CODES_BYTES = 1 << 30
_PURPOSE = "its quantization_config.weight_block_size to dequantize the fp8 weights"


@dataclass(frozen=True)
class Layout:
    """The block size of a checkpoint's scales and where it came from."""

    block: tuple[int, int]
    origin: str  # for report headers: "config.json", "default for quant_method fp8", "assumed: no config.json"


@dataclass(frozen=True)
class Fp8Info(TensorInfo):
    """A tensor as the analyses see it, with its FP8 storage: a dequantized weight, or a stored tensor with a note.

    For a block-scaled weight, ``dtype`` is F32 (the logical value), ``codes`` the stored FP8 weight, ``scale`` its
    scale tensor and ``block`` (b₀, b₁). Otherwise ``codes`` is None and ``note`` says why the tensor is compared
    as stored.
    """

    codes: TensorInfo | None = None
    scale: TensorInfo | None = None
    block: tuple[int, int] | None = None
    note: str = ""

    @property
    def scaled(self) -> bool:
        """Whether this is a block-scaled FP8 weight read dequantized."""
        return self.codes is not None and self.scale is not None and self.block is not None


def is_fp8(info: TensorInfo | None) -> bool:
    """Whether a stored tensor is FP8 (e4m3 or e5m2)."""
    return info is not None and info.dtype.name in FP8_NAMES


def label(info: TensorInfo) -> str:
    """The dtype as reports write it: ``f8_e4m3/128x128`` for a block-scaled weight, else the short name."""
    if isinstance(info, Fp8Info) and info.scaled:
        assert info.codes is not None and info.block is not None
        return f"{info.codes.dtype.short}/{info.block[0]}x{info.block[1]}"
    storage = getattr(info, "storage", "")  # a dequantized quantized weight (ckptdiff.io.views.quant): its format
    return storage if isinstance(storage, str) and storage else info.dtype.short


def mismatch(infos: Sequence[TensorInfo | None], labels: Sequence[str]) -> str:
    """Why one weight cannot be compared across its sides ('' when it can): dequantized with its scale on some,
    raw FP8 on others (its scale missing or unusable there, see the notes). A raw code is the weight's value only
    times a scale that side does not have, so any count of changes would compare codes with values."""
    scaled = [k for k, i in enumerate(infos) if isinstance(i, Fp8Info) and i.scaled]
    raw = [k for k, i in enumerate(infos) if is_fp8(i)]
    if not scaled or not raw:
        return ""
    a, b = infos[scaled[0]], infos[raw[0]]
    assert a is not None and b is not None
    where = ", ".join(labels[k] for k in scaled)
    bare = ", ".join(labels[k] for k in raw)
    return (
        f"fp8 scale on one side only: {label(a)} dequantized in {where}, raw {label(b)} without a usable scale in "
        f"{bare}; not compared (codes without their scale are not the weight's values)"
    )


def notes(infos: Iterable[TensorInfo | None]) -> str:
    """The FP8 (and quantized-storage) notes of one aligned tensor's sides, each once, joined with '; ' ('' when
    none)."""
    found = [note for i in infos if isinstance(note := getattr(i, "note", ""), str) and note]
    return "; ".join(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------
# the block size


def load_layout(config: ModelConfig | None) -> Layout:
    """The block size from a checkpoint's ``config.json`` (see the module doc); InputError for a malformed one."""
    if config is None:
        return Layout(DEFAULT_BLOCK, "assumed: no config.json beside the weights")
    quant = config.data.get("quantization_config")
    if not isinstance(quant, dict):
        return Layout(DEFAULT_BLOCK, "assumed: config.json has no quantization_config")
    size = quant.get("weight_block_size")
    if size is None:
        method = quant.get("quant_method")
        why = "default for quant_method fp8" if method == "fp8" else f"assumed: quant_method {method!r}"
        return Layout(DEFAULT_BLOCK, why + ", no weight_block_size")
    ok = isinstance(size, list) and len(size) == 2 and all(type(b) is int and 0 < b <= MAX_BLOCK for b in size)
    if not ok:
        raise InputError(
            f"{config.where}: quantization_config.weight_block_size must be two positive integers like [128, 128] "
            f"(at most 2^63 - 1; a block longer than a weight is one block), got {_shown(size)}; fix the config"
        )
    return Layout((size[0], size[1]), "config.json")


def _shown(value: object, most: int = 60) -> str:
    """``value`` as JSON for a one-line message, cut after ``most`` characters."""
    text = json.dumps(value)
    return text if len(text) <= most else text[:most] + "..."


def scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, int]:
    """(⌈m/b₀⌉, ⌈n/b₁⌉): the scale shape a block size gives an m × n weight."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


# ---------------------------------------------------------------------------------------------
# pairing weights with their scales, from headers alone


def _problem(weight: TensorInfo | None, scale: TensorInfo, block: tuple[int, int]) -> str:
    """Why ``scale`` cannot dequantize ``weight`` ('' when it can)."""
    if weight is None:
        return "its weight is absent"
    if not is_fp8(weight):
        return f"its weight is {weight.dtype.short}, not fp8"
    if len(weight.shape) != 2:
        return f"its weight is {len(weight.shape)}-D, not a matrix"
    if not scale.dtype.is_float:
        return f"the scale is {scale.dtype.short}, not a float"
    want = scale_shape(weight.shape, block)
    if tuple(scale.shape) != want:
        m, n = weight.shape
        return (
            f"scale shape {list(scale.shape)} does not fit {block[0]}x{block[1]} blocks of the {m}x{n} weight "
            f"(expected {list(want)})"
        )
    return ""


def plan(infos: Mapping[str, TensorInfo], layout: Layout) -> dict[str, TensorInfo]:
    """The tensors as the analyses see them: block-scaled weights as fp32, their scales hidden, problems noted."""
    block = layout.block
    scaled: dict[str, Fp8Info] = {}
    hidden: set[str] = set()
    noted: dict[str, str] = {}
    for name, scale in infos.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        wname = name[: -len(SCALE_SUFFIX)]
        weight = infos.get(wname)
        why = _problem(weight, scale, block)
        if why:
            noted[name] = f"fp8 scale not applied ({why}): compared as a plain tensor"
            if weight is not None:
                noted[wname] = f"fp8 weight not dequantized ({name.rsplit('.', 1)[-1]}: {why}): read as stored"
            continue
        assert weight is not None
        scaled[wname] = Fp8Info(wname, F32, weight.shape, weight.file, codes=weight, scale=scale, block=block)
        hidden.add(name)
    out: dict[str, TensorInfo] = {}
    for name, info in infos.items():
        if name in hidden:
            continue
        if name in scaled:
            out[name] = scaled[name]
        elif name in noted:
            out[name] = Fp8Info(name, info.dtype, info.shape, info.file, note=noted[name])
        elif is_fp8(info) and scaled and name + CT_SCALE_SUFFIX not in infos:
            why = f"fp8 tensor without a {name.rsplit('.', 1)[-1]}{SCALE_SUFFIX}: read as raw fp8 values"
            out[name] = Fp8Info(name, info.dtype, info.shape, info.file, note=why)
        else:
            out[name] = info
    return out


# ---------------------------------------------------------------------------------------------
# dequantizing a flat range


def _mul_columns(seg: torch.Tensor, row: torch.Tensor, col: int) -> None:
    """Multiply the flat row-major piece ``seg``, starting at column ``col``, by the per-column factors ``row``."""
    n = row.numel()
    head = min(seg.numel(), n - col) if col else 0
    if head:
        seg[:head].mul_(row[col : col + head])
    rest = seg[head:]
    full = rest.numel() // n
    if full:
        rest[: full * n].view(full, n).mul_(row)
    tail = rest.numel() - full * n
    if tail:
        rest[full * n :].mul_(row[:tail])


def dequantize_into(
    out: torch.Tensor, codes: torch.Tensor, start: int, n_cols: int, scale: torch.Tensor, block: tuple[int, int]
) -> None:
    """out[k] = float32(codes[k]) · S[i // b₀, j // b₁] for the flat entries start + k = i·n + j of an m × n weight.

    Works through ``PIECE`` entries at a time, never across a block row. Each piece is converted before it is
    written, so ``codes`` may lie in the last quarter of ``out``'s own bytes (the reader's in-place layout).
    Memory follows the stored columns, never the block size: column j takes its block's scale, ``S[·, j // b₁]``.
    """
    b0, b1 = block
    count = codes.numel()
    pos = 0
    col_block = torch.arange(n_cols, device=scale.device) // b1  # (n,) the block column of each column
    row_of: tuple[int, torch.Tensor] | None = None
    while pos < count:
        g = start + pos
        br = (g // n_cols) // b0
        end = min(start + count, (br + 1) * b0 * n_cols, g + PIECE)
        if row_of is None or row_of[0] != br:  # the scale of every column of this block row, (n,) fp32
            row_of = (br, scale[br][col_block])
        seg = codes[pos : pos + end - g].to(torch.float32)
        _mul_columns(seg, row_of[1], g % n_cols)
        out[pos : pos + end - g] = seg
        pos += end - g


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The whole (m, n) fp32 value of an FP8 weight and its (⌈m/b₀⌉, ⌈n/b₁⌉) scale."""
    m, n = codes.shape
    out = torch.empty(m * n, dtype=torch.float32)
    dequantize_into(out, codes.reshape(-1), 0, n, scale.to(torch.float32), block)
    return out.reshape(m, n)


# ---------------------------------------------------------------------------------------------
# the source


class Fp8Source(Source):
    """A source whose block-scaled FP8 weights read as fp32 (see the module doc); everything else passes through."""

    def __init__(self, inner: Source, layout: Layout, infos: dict[str, TensorInfo]):
        super().__init__(inner.spec, f"{inner.resolved} [fp8: {describe(infos, layout)}]", infos, dict(inner.tied))
        self.inner = inner
        self.layout = layout
        self._lock = threading.Lock()
        self._scales: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._codes: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self._retain = 0

    def scaled(self, name: str) -> Fp8Info | None:
        """The FP8 view of ``name`` when it is a block-scaled weight, else None."""
        info = self.infos.get(name)
        return info if isinstance(info, Fp8Info) and info.scaled else None

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        info = self.scaled(name)
        if info is None:
            return self.inner.read(name, start, count, out)
        assert info.block is not None
        n = info.numel - start if count is None else count
        if n == 0:
            return torch.empty(0, dtype=torch.float32)
        need = 4 * n
        buf = out[:need] if out is not None and out.nbytes >= need else np.empty(need, dtype=np.uint8)
        codes = self.inner.read(name, start, n, out=buf[3 * n :])  # the codes land in the last quarter
        if self._retain:
            self._keep(name, start, n, codes)
        values = torch.from_numpy(buf).view(torch.float32)
        dequantize_into(values, codes, start, info.shape[1], self.scale(name), info.block)
        return values

    def scale(self, name: str) -> torch.Tensor:
        """The fp32 scale of block-scaled weight ``name``, (⌈m/b₀⌉, ⌈n/b₁⌉); kept for the next reads."""
        with self._lock:
            hit = self._scales.get(name)
            if hit is not None:
                self._scales.move_to_end(name)
                return hit
        info = self.scaled(name)
        assert info is not None and info.scale is not None
        value = self.inner.read_full(info.scale.name).to(torch.float32)
        with self._lock:
            self._scales[name] = value
            while len(self._scales) > _SCALES_KEPT:
                self._scales.popitem(last=False)
        return value

    def retain(self, on: bool) -> None:
        """Keep (or stop keeping) a copy of the codes of the last reads, for :meth:`raw_codes`."""
        with self._lock:
            self._retain += 1 if on else -1
            if self._retain <= 0:
                self._retain = 0
                self._codes.clear()

    def _keep(self, name: str, start: int, n: int, codes: torch.Tensor) -> None:
        copy = codes.view(torch.uint8).clone()
        with self._lock:
            self._codes[(name, start, n)] = copy
            total = sum(c.numel() for c in self._codes.values())
            while len(self._codes) > _CODES_KEPT or (total > _CODES_BYTES and len(self._codes) > 3):
                _, dropped = self._codes.popitem(last=False)
                total -= dropped.numel()

    def raw_codes(self, name: str, start: int, count: int) -> torch.Tensor:
        """The stored FP8 codes of entries [start, start + count) of ``name`` as uint8: kept, or read again."""
        with self._lock:
            hit = self._codes.get((name, start, count))
        if hit is not None:
            return hit
        return self.inner.read(name, start, count).view(torch.uint8)

    def close(self) -> None:
        with self._lock:
            self._scales.clear()
            self._codes.clear()
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()


def describe(infos: Mapping[str, TensorInfo], layout: Layout) -> str:
    """One line for report headers: how many weights are dequantized, the block size and its origin, findings."""
    scaled = sum(isinstance(i, Fp8Info) and i.scaled for i in infos.values())
    b0, b1 = layout.block
    parts = [f"{scaled} block-scaled weights dequantized to fp32, {b0}x{b1} blocks ({layout.origin})"] if scaled else []
    findings = sum(isinstance(i, Fp8Info) and bool(i.note) for i in infos.values())
    if findings:
        parts.append(f"{findings} fp8 finding(s), see the structural findings")
    ct = sum(is_fp8(i) and name + CT_SCALE_SUFFIX in infos for name, i in infos.items())
    if ct:
        parts.append(f"{ct} fp8 weights with a compressed-tensors weight_scale, not applied: raw fp8 values compared")
    return "; ".join(parts)


def wrap(src: Source) -> Source:
    """``src`` with its block-scaled FP8 weights read as fp32 (an :class:`Fp8Source`), or ``src`` itself when it
    holds neither a ``*_scale_inv`` tensor nor an FP8 weight with a compressed-tensors ``*_scale``."""
    if isinstance(src, Fp8Source):
        return src
    names = src.infos
    ours = any(name.endswith(SCALE_SUFFIX) for name in names)
    theirs = any(is_fp8(i) and name + CT_SCALE_SUFFIX in names for name, i in names.items())
    if not ours:
        return Fp8Source(src, Layout(DEFAULT_BLOCK, "unused"), dict(names)) if theirs else src
    layout = load_layout(model_config.load(src, _PURPOSE))
    return Fp8Source(src, layout, plan(src.infos, layout))


def find(src: Source) -> Fp8Source | None:
    """The :class:`Fp8Source` inside ``src`` (itself or a wrapper's ``inner``), if any."""
    seen = 0
    while seen < 8:
        if isinstance(src, Fp8Source):
            return src
        inner = getattr(src, "inner", None)
        if not isinstance(inner, Source):
            return None
        src, seen = inner, seen + 1
    return None


# ---------------------------------------------------------------------------------------------
# raw code and scale changes, for the sparsity CSV

FP8_COLUMNS = ("codes_changed", "scale_blocks_changed")


def _changed(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> int:
    """Entries changed by the §1 bitwise rule (+0 equals −0, NaN changed), on two same-dtype bit patterns."""
    from ckptdiff.metrics.mask import bitwise_changed

    return int(bitwise_changed(a.view(dtype), b.view(dtype)).sum())


class CodeStats:
    """``codes_changed`` and ``scale_blocks_changed`` of the block-scaled FP8 tensors of one base/fine-tune pair.

    A tensor gets them when both sides are block-scaled FP8 with the same code dtype (scale blocks: and the same
    block size). The codes come from what the sources kept while dequantizing the same range (no second read);
    the scales from their cache.
    """

    def __init__(self, base: Fp8Source, ft: Fp8Source):
        self.base, self.ft = base, ft
        self.codes: dict[str, int] = {}
        self.blocks: dict[str, int] = {}
        self.open = True
        for s in (base, ft):
            s.retain(True)

    @classmethod
    def for_pair(cls, base: Source, ft: Source) -> CodeStats | None:
        """Stats for a pair of sources, or None unless both hold block-scaled FP8 weights."""
        a, b = find(base), find(ft)
        return cls(a, b) if a is not None and b is not None else None

    @staticmethod
    def _pair(item: Paired) -> tuple[Fp8Info, Fp8Info] | None:
        a, b = item.infos[0], item.infos[-1]
        if not (isinstance(a, Fp8Info) and isinstance(b, Fp8Info) and a.scaled and b.scaled):
            return None
        assert a.codes is not None and b.codes is not None
        same = a.codes.dtype == b.codes.dtype and a.shape == b.shape
        return (a, b) if same else None

    def add(self, item: Paired, start: int, count: int) -> None:
        """Count the code changes of entries [start, start + count) of ``item`` (and its scales with the first)."""
        pair = self._pair(item)
        if pair is None or count == 0:
            return
        a, b = pair
        assert a.codes is not None and a.scale is not None and b.scale is not None
        name = item.name
        c0 = self.base.raw_codes(name, start, count)
        c1 = self.ft.raw_codes(name, start, count)
        self.codes[name] = self.codes.get(name, 0) + _changed(c0, c1, a.codes.dtype.torch)
        if start == 0 and a.block == b.block and a.scale.shape == b.scale.shape:
            self.blocks[name] = _changed(self.base.scale(name), self.ft.scale(name), torch.float32)

    def columns(self, item: Paired) -> dict[str, float]:
        """The two columns of ``item``'s row: counts, or NaN (an empty cell) for other tensors."""
        nan = float("nan")
        if self._pair(item) is None or not item.comparable:
            return dict.fromkeys(FP8_COLUMNS, nan)
        name = item.name
        return {"codes_changed": self.codes.get(name, 0), "scale_blocks_changed": self.blocks.get(name, nan)}

    def close(self) -> None:
        """Stop the sources keeping codes (once)."""
        if self.open:
            self.open = False
            for s in (self.base, self.ft):
                s.retain(False)
