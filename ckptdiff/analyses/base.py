"""What every analysis shares: opening one input, the report header, and per-tensor row basics."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ckptdiff.engine.alignment import Aligned
from ckptdiff.io.views import fp8
from ckptdiff.metrics.mask import comparison_dtype
from ckptdiff.naming import expert_of, is_linear, layer_of, module_of

_F = TypeVar("_F", bound=Callable[..., Any])


def once_per_key(method: _F) -> _F:
    """Make a result's rollup method compute once per argument, returning a copy each call.

    Whole-run results are read-only once made (a caller that edits ``rows`` afterwards gets stale rollups), and
    one ``report`` run asks for the same rollup several times (terminal, HTML, Markdown, JSON, figures); on an
    80-layer model each costs a noticeable fraction of a second.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        key = (method.__name__, tuple(bound.arguments.items())[1:])
        cache = self.__dict__.setdefault("_once", {})
        if key not in cache:
            cache[key] = method(self, *args, **kwargs)
        return cache[key].copy()

    return wrapper  # type: ignore[return-value]


def row_basics(item: Aligned) -> dict[str, object]:
    """The leading columns of every per-tensor row: tensor, layer, module, expert, shape, dtypes, numel, status.

    A block-scaled FP8 weight's dtype reads ``f8_e4m3/128x128`` (stored codes / block size; its values are
    compared dequantized, in fp32).
    """
    infos = item.infos
    base, ft = infos[0], infos[-1]
    shape_src = base or ft
    shape = tuple(shape_src.shape) if shape_src is not None else ()
    return {
        "tensor": item.name,
        "layer": layer_of(item.name),
        "module": module_of(item.name),
        "expert": expert_of(item.name),
        "shape": "x".join(str(d) for d in shape) if shape else "scalar",
        "dtype_base": fp8.label(base) if base is not None else "",
        "dtype_ft": fp8.label(ft) if ft is not None else "",
        "numel": shape_src.numel if shape_src is not None else 0,
        "linear": is_linear(item.name, shape),
        "status": item.status.value,
    }


def item_detail(item: Aligned) -> str:
    """The structural note of a tensor: alignment's detail and any FP8 note of its sides (see ckptdiff.io.views.fp8)."""
    return "; ".join(d for d in (item.detail, fp8.notes(item.infos)) if d)


def pair_target(item: Aligned, as_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a base/fine-tune float pair is compared in (``--as`` wins; see ``comparison_dtype``)."""
    a, b = (i.dtype.torch for i in item.infos if i is not None)
    return comparison_dtype(a, b, as_dtype)
