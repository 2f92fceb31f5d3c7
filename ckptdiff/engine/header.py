"""The header every result carries: the tool's version, each input as resolved, what is tied, the comparison mode,
the parameters, and where and when the run was made."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from collections.abc import Sequence

import torch

from ckptdiff import __version__
from ckptdiff.io.source import Source
from ckptdiff.io.views import ties
from ckptdiff.metrics.mask import CompareMode


def header(
    analysis: str,
    sources: Sequence[Source],
    roles: Sequence[str],
    device: torch.device,
    mode: CompareMode | None = None,
    **params: object,
) -> dict[str, str]:
    """The report header: tool version, inputs as resolved, what is tied in them, comparison mode, parameters,
    device.

    Keys are snake_case (:func:`header_key`): a fine-tune labelled ``rl-seed1`` is ``ft_rl_seed1``.
    """
    out: dict[str, str] = {"analysis": analysis, "ckptdiff": __version__}
    keys: list[str] = []
    for role, src in zip(roles, sources, strict=True):
        key = header_key(role)
        while key in out:  # labels that differ only in punctuation or case
            key += "_"
        out[key] = src.resolved
        keys.append(key)
    tied = ties.describe(sources, keys)  # each checkpoint named by its header key, as in the lines above
    if tied:
        out["tied"] = tied
    if mode is not None:
        out["comparison"] = mode.describe()
    for key, value in params.items():
        out[header_key(key)] = str(value)
    return {**out, **runtime(str(device))}


def runtime(device: str) -> dict[str, str]:
    """Where and when a report was made, the closing keys of every header: device, torch, date; the host name only
    when asked for (``ckptdiff --host``, or ``CKPTDIFF_HOST=1`` for the library): a report.md is pasted into model
    cards and pull requests, where a machine's name has no business."""
    out = {"device": device, "torch": torch.__version__}
    if os.environ.get("CKPTDIFF_HOST", "") not in ("", "0"):
        out["host"] = platform.node()
    out["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def header_key(name: str) -> str:
    """A report header key in snake_case: lower case, runs of anything but letters and digits as one ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "_"
