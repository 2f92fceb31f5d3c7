"""A checkpoint's ``config.json``: where it is and how it is read, for every view that needs a fact from it.

The file sits beside the weights: in the folder given, or the one holding the weight files (a Hub download
fetches it with them, :mod:`ckptdiff.io.hub.download`); a streamed Hub repo fetches it by byte range
(:meth:`ckptdiff.io.source.Source.remote_config`). It is read only when a view needs it: the block size of FP8
weights (:mod:`ckptdiff.io.views.fp8`), ``tie_word_embeddings`` when ``lm_head.weight`` is absent
(:mod:`ckptdiff.io.views.ties`).
It is a side file (:mod:`ckptdiff.io.files`): a regular file of at most ``MAX_CONFIG_BYTES``, nested a bounded
number of levels. A file that is not such JSON is an :class:`~ckptdiff.errors.InputError` naming it and what it was
read for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptdiff.io import files as fileio
from ckptdiff.io.source import Source

NAME = "config.json"


@dataclass(frozen=True)
class ModelConfig:
    """A parsed ``config.json`` and where it came from (for messages)."""

    where: str
    data: dict[str, Any]  # empty when the file holds JSON that is not an object


def folder(src: Source) -> Path | None:
    """The folder a checkpoint's ``config.json`` would sit in: the folder given, or the one holding the weights."""
    spec = Path(src.spec).expanduser()
    if spec.is_dir():
        return spec
    if spec.is_file():
        return spec.parent
    files = sorted({i.file for i in src.infos.values() if i.file and not i.file.startswith("hub:")})
    return Path(files[0]).parent if files else None


def load(src: Source, purpose: str) -> ModelConfig | None:
    """``src``'s ``config.json``, or None when none is at hand; InputError when it is not JSON.

    ``purpose`` says in that error what ckptdiff reads the file for ("its tie_word_embeddings ...").
    """
    fix = f"ckptdiff reads {purpose}: fix or remove the file"
    fetched = src.remote_config()
    if fetched is not None:
        where, raw = fetched
    else:
        d = folder(src)
        path = d / NAME if d is not None else None
        if path is None or not os.path.exists(path):  # not is_file(): a pipe or a device is refused, not skipped
            return None
        where = str(path)
        raw = fileio.read_side_file(path, where, fileio.MAX_CONFIG_BYTES, fix)
    data = fileio.parse_json(raw, where, fix)
    return ModelConfig(where, data if isinstance(data, dict) else {})
