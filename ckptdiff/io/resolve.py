"""The front door: what a user typed (a file, a folder, an index, a Hub id) becomes the checkpoint the analyses see.

:func:`open` returns a checkpoint as the analyses compare it (:func:`logical`: ties declared, FP8 weights
dequantized, fused experts split); ``stored=True`` gives the tensors as stored. Every command and library function
opens its inputs here. Supported inputs: a ``.safetensors`` file; a folder with ``model.safetensors`` or a sharded
set with ``model.safetensors.index.json``; a PyTorch ``.bin``/``.pt`` state dict; a Hugging Face Hub id
``org/name[@revision]`` (see :mod:`ckptdiff.io.hub`); as a fine-tune, a PEFT adapter folder or Hub repo
(``adapter_config.json``), merged into the base (:mod:`ckptdiff.io.views.lora`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ckptdiff.errors import InputError
from ckptdiff.io import layout
from ckptdiff.io.files import stat_input
from ckptdiff.io.formats.safetensors import SafetensorsSource
from ckptdiff.io.formats.torch_file import TorchFileSource
from ckptdiff.io.layout import contained, read_index
from ckptdiff.io.source import Source
from ckptdiff.io.views import fp8, lora, moe, quant, ties

if TYPE_CHECKING:
    import torch


def _from_directory(spec: str, d: Path, resolved_prefix: str = "") -> Source:
    """Pick the checkpoint inside a directory, preferring safetensors; a PEFT adapter folder is an :class:`Adapter`."""
    prefix = resolved_prefix or str(d)
    weights = layout.adapter_weights(d)
    if weights is not None:
        config = lora.read_config(contained(d, d / layout.ADAPTER_CONFIG))
        kind = SafetensorsSource if weights.name.endswith(layout.SAFETENSORS) else TorchFileSource
        return lora.Adapter(spec, kind(spec, [weights], f"{prefix}/{weights.name}"), config)
    idx = d / layout.SAFETENSORS_INDEX
    if idx.exists():  # not is_file(): an index that is a pipe or a folder is refused when read, not skipped
        shards, wmap = read_index(contained(d, idx))
        return SafetensorsSource(spec, shards, f"{prefix} ({len(shards)} safetensors shards)", wmap)
    single = d / layout.SINGLE
    if single.is_file():
        return SafetensorsSource(spec, [contained(d, single)], f"{prefix}/model.safetensors")
    found = [contained(d, p) for p in sorted(d.glob(f"*{layout.SAFETENSORS}"))]
    if found:
        return SafetensorsSource(spec, found, f"{prefix} ({len(found)} safetensors files)")
    bidx = d / layout.PICKLE_INDEX
    if bidx.exists():
        shards, wmap = read_index(contained(d, bidx))
        return TorchFileSource(spec, shards, f"{prefix} ({len(shards)} .bin shards)", wmap)
    pickles = sorted(p for suffix in layout.PICKLE_SUFFIXES for p in d.glob(f"*{suffix}"))
    if len(pickles) == 1:
        contained(d, pickles[0])
        return TorchFileSource(spec, pickles, str(pickles[0]))
    if pickles:
        raise InputError(
            f"directory {d} holds several PyTorch files and no pytorch_model.bin.index.json; pass one file"
        )
    raise InputError(f"directory {d} holds no checkpoint (.safetensors, index.json, .bin or .pt); check the path")


def open_stored(spec: str, *, progress: bool = True, stream: bool | None = None) -> Source:
    """A path or Hub id as a lazy :class:`Source` of its tensors as stored; :class:`InputError` on anything unusable.

    ``stream`` (Hub ids only): read tensors by byte range over HTTP instead of downloading the repo
    (:mod:`ckptdiff.io.hub.stream`); ``None`` follows the environment variable ``CKPTDIFF_HUB_STREAM``.
    """
    path = Path(spec).expanduser()
    found = stat_input(spec)
    if found is not None:
        if stat.S_ISDIR(found.st_mode):
            return _from_directory(spec, path)
        suffix = path.suffix.lower()
        if suffix == layout.SAFETENSORS:
            return SafetensorsSource(spec, [path], str(path.resolve()))
        if layout.is_index(path.name):
            shards, wmap = read_index(path)
            if path.name.endswith(layout.SAFETENSORS + layout.INDEX_SUFFIX):
                return SafetensorsSource(spec, shards, f"{path} ({len(shards)} shards)", wmap)
            return TorchFileSource(spec, shards, f"{path} ({len(shards)} shards)", wmap)
        if layout.is_pickle(path.name):
            return TorchFileSource(spec, [path], str(path.resolve()))
        raise InputError(
            f"{spec} is not a checkpoint ckptdiff can read; pass a .safetensors, .bin/.pt file, a directory or a Hub id"
        )
    if layout.is_hub_id(spec):
        from ckptdiff.io.hub import download as hub

        hub.refuse_path_like(spec)
        if hub.stream_wanted(stream):
            from ckptdiff.io.hub.stream import AdapterRepo, HubStreamSource

            try:
                return HubStreamSource.open(spec)
            except AdapterRepo:  # an adapter's files are small and its config is needed: downloaded instead
                pass
        folder, resolved = hub.download(spec, progress=progress)
        return _from_directory(spec, folder, resolved)
    raise layout.missing(spec)


SourceLike = str | os.PathLike[str] | Source


def open(
    spec: SourceLike,
    *,
    stored: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    base: Source | None = None,
    merged_dtype: torch.dtype | None = None,
) -> Source:
    """The checkpoint ``spec`` names (a path, a Hub id, or a source already open) as the analyses compare it.

    By default that is :func:`logical`: tied names recorded, block-scaled FP8 weights dequantized, fused experts
    split, a PEFT adapter merged into ``base`` (the base as opened here; ``merged_dtype``: what its merged weights
    are stored as, the base's dtype by default). ``stored=True`` gives the tensors as stored (FP8 codes and their
    scales, fused experts, an adapter's factors), and an analysis handed that source compares them so. ``stream``
    (Hub ids only): read by byte range instead of downloading; ``None`` follows ``CKPTDIFF_HUB_STREAM``.
    """
    src = spec if isinstance(spec, Source) else open_stored(os.fspath(spec), progress=progress, stream=stream)
    if stored:
        src.viewed = True
        return src
    return logical(src, base=base, merged_dtype=merged_dtype)


def is_adapter(src: Source) -> bool:
    """Whether ``src`` is a PEFT adapter as stored, which is a fine-tune only merged into a base."""
    return isinstance(src, lora.Adapter) and not src.viewed


def logical(src: Source, *, base: Source | None = None, merged_dtype: torch.dtype | None = None) -> Source:
    """``src`` as the analyses see it: ties declared, quantized and FP8 weights dequantized, fused experts split, an
    adapter merged into ``base`` (:mod:`ckptdiff.io.views.lora`) (or ``src`` itself); a source already viewed is
    returned as it is. Within :func:`ckptdiff.io.views.quant.as_stored` (``--as-stored``) nothing is dequantized and
    every quantized part carries a note saying so."""
    if src.viewed:
        return src
    if isinstance(src, lora.Adapter):
        return lora.merge(src, base, merged_dtype)
    if quant.stored_wanted():  # --as-stored: nothing dequantized, every quantized part noted as compared raw
        out = moe.split(quant.wrap(ties.declare(src)))
    else:
        out = moe.split(fp8.wrap(quant.wrap(ties.declare(src))))
    out.viewed = True
    return out
