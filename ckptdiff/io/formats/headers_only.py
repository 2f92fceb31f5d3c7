"""Header-only checkpoints: tensor names, dtypes and shapes without reading any tensor data.

A local safetensors checkpoint (file, folder, sharded index) is read through :mod:`ckptdiff.io.source`'
header parser, which touches the headers only. A Hub id ``org/name[@revision]`` goes through
``huggingface_hub.get_safetensors_metadata``, which fetches the headers with HTTP range requests and
downloads no weights; its ``config.json`` is fetched only if a view needs it (:mod:`ckptdiff.io.views.config`).
PyTorch pickles (``.bin``/``.pt``) have no header: they are refused.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io import layout
from ckptdiff.io.formats.safetensors_header import I64_MAX
from ckptdiff.io.resolve import open_stored, stat_input
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views import lora

if TYPE_CHECKING:
    from ckptdiff.io.hub.stream import Remote

_PICKLES_ONLY = "header-only mode needs safetensors ({what} holds PyTorch pickles, which have no header); "
_PICKLES_FIX = "convert it to safetensors or drop --header-only"


class HeaderSource(Source):
    """A checkpoint known from its headers alone: ``infos`` is filled, reading tensor data is not possible."""

    def read(self, name: str, start: int = 0, count: int | None = None, out: Any = None) -> torch.Tensor:
        """Always fails: a header-only source holds no tensor data."""
        raise InputError(f"{self.spec} was opened header-only; tensor {name!r} cannot be read")

    @property
    def parameter_count(self) -> int:
        """Total entries over every tensor."""
        return sum(i.numel for i in self.infos.values())


class HubHeaderSource(HeaderSource):
    """A Hub repo's headers; its ``config.json`` is fetched if a view asks for it."""

    def remote_config(self) -> tuple[str, bytes] | None:
        """The repo's ``config.json`` at the revision asked for, fetched once by byte range (nothing written to
        disk); None when the repo has none."""
        return self._remote.config()

    @functools.cached_property
    def _remote(self) -> Remote:
        from ckptdiff.io.hub import download as hub
        from ckptdiff.io.hub.stream import Remote

        return Remote.open(*hub.split_id(self.spec))


def open_headers(spec: str) -> Source:
    """Tensor metadata of a local safetensors checkpoint or a Hub id, without reading tensor data (a local PEFT
    adapter folder: its factors' headers and its config, :class:`~ckptdiff.io.views.lora.Adapter`)."""
    path = Path(spec).expanduser()
    if stat_input(spec) is not None:  # refuses links that loop, pipes and devices before anything is opened
        return _local(spec, path)
    if layout.is_hub_id(spec):
        from ckptdiff.io.hub import download as hub

        hub.refuse_path_like(spec)
        return _hub(spec)
    raise InputError(
        f"{spec} does not exist; pass a safetensors file, a directory or a Hub id like org/name[@revision]"
    )


def _local(spec: str, path: Path) -> Source:
    """Local headers via the sources' safetensors reader (which opens files for their headers only)."""
    if (path.is_file() and layout.is_pickle(path.name)) or path.name == layout.PICKLE_INDEX:
        raise InputError(_PICKLES_ONLY.format(what=spec) + _PICKLES_FIX)
    if path.is_dir() and not _has_safetensors(path) and _has_pickles(path):
        raise InputError(_PICKLES_ONLY.format(what=f"directory {path}") + _PICKLES_FIX)
    src = open_stored(spec, progress=False)  # safetensors only from here on: headers parsed, no data read
    src.close()
    headers = HeaderSource(spec, f"{src.resolved} (headers only)", dict(src.infos))
    if isinstance(src, lora.Adapter):
        return lora.Adapter(spec, headers, src.config)
    return headers


def _has_safetensors(folder: Path) -> bool:
    return (folder / layout.SAFETENSORS_INDEX).is_file() or any(folder.glob(f"*{layout.SAFETENSORS}"))


def _has_pickles(folder: Path) -> bool:
    return any(any(folder.glob(f"*{suffix}")) for suffix in layout.PICKLE_SUFFIXES)


def _hub(spec: str) -> Source:
    """Hub headers from huggingface_hub's metadata call: a few range requests, no weights downloaded."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    from ckptdiff.io.hub import download as hub

    repo, revision = hub.split_id(spec)
    if hub.offline():  # the headers of the snapshot in the local cache, parsed like any local folder's
        folder, resolved = hub.download(spec, progress=False)
        local = _local(str(folder), folder)
        headers = HeaderSource(spec, f"{resolved} (headers only)", local.infos)
        return lora.Adapter(spec, headers, local.config) if isinstance(local, lora.Adapter) else headers
    try:
        with hub.request_errors(f"the safetensors headers of Hub repo {spec}"), hub.repo_errors(repo, revision):
            meta = hf.get_safetensors_metadata(repo, revision=revision)
    except hf_errors.NotASafetensorsRepoError:
        raise InputError(
            f"Hub repo {spec} has no model.safetensors or model.safetensors.index.json; "
            "header-only mode needs safetensors weights: drop --header-only"
        ) from None
    except hf_errors.SafetensorsParsingError as e:
        raise InputError(
            f"Hub repo {spec} has a corrupt safetensors header ({_first_line(e)}); report it upstream"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise InputError(f"could not fetch the safetensors headers of Hub repo {spec}: {_first_line(e)}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        # huggingface_hub parses the remote header itself and trips over malformed entries with these
        raise InputError(
            f"Hub repo {spec} has a corrupt safetensors header ({type(e).__name__}: {_first_line(e)}); "
            "report it upstream"
        ) from None
    infos = infos_from_hub_metadata(spec, meta)
    label = f"hub:{repo}@{revision or 'main'} ({len(meta.files_metadata)} safetensors file(s), headers only)"
    return HubHeaderSource(spec, label, infos)


def infos_from_hub_metadata(spec: str, meta: Any) -> dict[str, TensorInfo]:
    """TensorInfo records from a ``SafetensorsRepoMetadata`` (its per-file ``tensors`` dicts)."""
    infos: dict[str, TensorInfo] = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, tensor in file_meta.tensors.items():
            dt = dtypes.from_name(str(tensor.dtype))
            if dt is None:
                raise InputError(
                    f"Hub repo {spec}: tensor {name!r} in {filename} has dtype {tensor.dtype!r}, "
                    "which ckptdiff does not support"
                )
            if name in infos:
                raise InputError(
                    f"Hub repo {spec}: tensor {name!r} appears in both {infos[name].file} and {filename}; "
                    "the repo's shards overlap"
                )
            shape = tensor.shape
            if not isinstance(shape, (list, tuple)) or not all(type(d) is int and 0 <= d <= I64_MAX for d in shape):
                raise InputError(
                    f"Hub repo {spec}: tensor {name!r} in {filename} has shape {str(shape)[:60]}, which is not a list "
                    "of non-negative integers; the repo's safetensors header is corrupt: report it upstream"
                )
            infos[name] = TensorInfo(name, dt, tuple(shape), f"hub:{filename}")
    return infos


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
