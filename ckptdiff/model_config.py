"""A checkpoint's ``config.json``: where it is and how it is read, for every view that needs a fact from it.

The file sits beside the weights: in the folder given, or the one holding the weight files (a Hub download
fetches it with them, :mod:`ckptdiff.hub`); a streamed Hub repo fetches it by byte range
(:meth:`ckptdiff.sources.Source.remote_config`). It is read only when a view needs it: the block size of FP8
weights (:mod:`ckptdiff.fp8`), ``tie_word_embeddings`` when ``lm_head.weight`` is absent (:mod:`ckptdiff.ties`).
A file that is not JSON is an :class:`~ckptdiff.errors.InputError` naming it and what it was read for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptdiff.errors import InputError
from ckptdiff.sources import Source

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
    fetched = src.remote_config()
    if fetched is not None:
        where, raw = fetched
    else:
        d = folder(src)
        path = d / NAME if d is not None else None
        if path is None or not path.is_file():
            return None
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise InputError(f"{where}: {e.strerror}; ckptdiff reads {purpose}: fix or remove the file") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{where}: not valid JSON; ckptdiff reads {purpose}: fix or remove the file") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise InputError(
            f"{where}: holds a number too long to read; ckptdiff reads {purpose}: fix or remove the file"
        ) from None
    return ModelConfig(where, data if isinstance(data, dict) else {})
