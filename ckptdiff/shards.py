"""Shard names from a checkpoint index (``*.index.json``), kept inside the checkpoint's folder.

An index is text from wherever the checkpoint came from; its ``weight_map`` names the shard files. A name
like ``../outside/secret.safetensors`` or ``/etc/...`` would make ckptdiff open a file the user never pointed
it at, so every name goes through :func:`shard_path`, the one place that turns a shard name into a path
(full reads through :mod:`ckptdiff.sources`, ``check --header-only`` through the same resolver, and the output
checks of :mod:`ckptdiff.outputs`).

The rule is lexical, on purpose. A shard name must be a relative path that, normalised (``a/../b`` -> ``b``),
stays below the index's folder; the path opened is that normalised one, so no ``..`` is left for a symlinked
folder to turn around. Symlinks that the folder itself holds are then followed wherever they point: a Hugging
Face cache snapshot is a folder of links into ``../../blobs/``, and a user's folder of links to shards on
another disk is their own layout. Those links were made by whoever made the folder, not by the index, and
ckptdiff follows a linked ``model.safetensors`` in a folder without an index in just the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptdiff import fileio
from ckptdiff.errors import InputError


def shard_path(index: Path, name: str) -> Path:
    """The file that shard ``name`` of ``index`` refers to; :class:`InputError` if it is not inside the folder."""
    rel = os.path.normpath(name) if name else ""
    escapes = rel in ("", ".", "..") or rel.startswith(("../", "/")) or os.path.isabs(name) or "\0" in name
    if escapes:
        raise InputError(
            f"index {index} names shard {name!r}, which is not inside the checkpoint folder {index.parent}; "
            "shard names must be relative paths within that folder: the index is corrupt or was tampered with, "
            "re-download it from a source you trust"
        )
    return index.parent / rel


def read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shards named by a ``*.index.json`` (each checked by :func:`shard_path`, each must exist) and its weight map.

    The index is a side file (:func:`ckptdiff.fileio.load_json`): a regular file of bounded size and nesting.
    """
    data = fileio.load_json(index, f"index {index}", fileio.MAX_INDEX_BYTES, "re-download it")
    try:
        weight_map: dict[str, str] = {str(k): str(v) for k, v in data["weight_map"].items()}
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"index {index} is not a valid checkpoint index (no weight_map); re-download it") from None
    shards: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        p = shard_path(index, shard)
        if not p.is_file():
            raise InputError(f"index {index} names shard {shard}, which is missing; download the missing shard")
        shards.append(p)
    return shards, weight_map
