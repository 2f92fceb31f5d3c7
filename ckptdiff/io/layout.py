"""Which files inside a checkpoint folder ckptdiff may open: shard names from an index, and links in the folder.

An index is text from wherever the checkpoint came from; its ``weight_map`` names the shard files. A name
like ``../outside/secret.safetensors`` or ``/etc/...`` would make ckptdiff open a file the user never pointed
it at, so every name goes through :func:`shard_path`, the one place that turns a shard name into a path
(full reads through :mod:`ckptdiff.io.source`, ``check --header-only`` through the same resolver, and the output
checks of :mod:`ckptdiff.io.outputs`).

The name rule is lexical: a shard name must be a relative path that, normalised (``a/../b`` -> ``b``), stays
below the index's folder. Then every file the folder leads to, a shard or a ``model.safetensors`` found by its
name, goes through :func:`contained`: followed through its symlinks, it must land inside the checkpoint folder,
or, for a Hugging Face cache snapshot (``models--org--name/snapshots/REV``, a folder of links into
``../../blobs/``), inside that same cache repo folder. A link anywhere else is refused with where it points:
a checkpoint downloaded from someone else may carry links, and following them would read files the user never
named. (A file the user names directly is theirs to name, link or not.)
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio


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
    return contained(index.parent, index.parent / rel)


_CACHE_REPO_KINDS = ("models--", "datasets--", "spaces--")


def _roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may lead: the folder itself, and a Hub cache repo around its snapshot."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(_CACHE_REPO_KINDS):
        roots.append(real.parent.parent)
    return roots


def contained(folder: Path, path: Path) -> Path:
    """``path`` (a file inside checkpoint ``folder``) if its links lead inside the folder or its Hub cache repo."""
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(root) for root in _roots(folder)):
        return path
    raise InputError(
        f"{path} is a symbolic link to {real}, outside the checkpoint folder {folder}; ckptdiff follows links only "
        "within the checkpoint folder (or its Hugging Face cache repo): copy the file in, or pass the folder it is in"
    )


def read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shards named by a ``*.index.json`` (each checked by :func:`shard_path`, each must exist) and its weight map.

    The index is a side file (:func:`ckptdiff.io.files.load_json`): a regular file of bounded size and nesting.
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
