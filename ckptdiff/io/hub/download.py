"""Hugging Face Hub checkpoints: download only the weights, honour the user's cache, offline mode and token.

Environment read at call time: ``HF_HUB_OFFLINE`` (use the local cache only), ``HF_HUB_CACHE`` / ``HF_HOME``
(where the cache lives), ``HF_ENDPOINT`` (a Hub mirror), ``CKPTDIFF_HUB_STREAM`` (read tensors by byte range
instead of downloading: :mod:`ckptdiff.io.hub.stream`), ``HF_TOKEN`` (picked up by huggingface_hub itself).

A spec that matches ``org/name`` but names a local path with a typo in it (``runs/ckpt-20O`` next to a folder
``runs/``) is refused at once as a missing path (:func:`refuse_path_like`), and a Hub that cannot be reached is
one line with the fix, after one attempt, never minutes of retries (:func:`network_errors`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckptdiff.errors import InputError
from ckptdiff.io import layout

STREAM_ENV = "CKPTDIFF_HUB_STREAM"
_TRUE = {"1", "true", "yes", "on"}


def split_id(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> revision None (the default branch)."""
    repo, _, rev = spec.partition("@")
    return repo, (rev or None)


def offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def stream_wanted(stream: bool | None = None) -> bool:
    """Whether a Hub id is read by byte range (``stream``, or ``CKPTDIFF_HUB_STREAM`` when None); never offline.

    With ``HF_HUB_OFFLINE`` set the weights are on disk already (the cache), so they are read from there.
    """
    wanted = os.environ.get(STREAM_ENV, "").strip().lower() in _TRUE if stream is None else stream
    return wanted and not offline()


def endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def path_like(spec: str) -> str | None:
    """Why ``spec``, though shaped like ``org/name[@rev]``, must be a local path; None when it reads as a Hub id."""
    repo, _ = split_id(spec)
    if spec.startswith(("./", "../", "/", "~")):
        return "it starts like a path"
    seps = [s for s in (os.sep, os.altsep) if s and s != "/"]
    if repo.count("/") > 1 or any(s in repo for s in seps):
        return "it has more than one path separator"
    lowered = repo.lower()
    for suffix in layout.PATH_SUFFIXES:
        if lowered.endswith(suffix):
            return f"it ends in {suffix}"
    first = repo.split("/", 1)[0]
    if os.path.lexists(os.path.expanduser(first)):
        kind = "a folder" if os.path.isdir(first) else "a file"
        return f"{kind} named {first} exists here"
    return None


def refuse_path_like(spec: str) -> None:
    """:class:`InputError` ("no such file or directory") for a missing local path that looks like a Hub id."""
    reason = path_like(spec)
    if reason is not None:
        raise InputError(
            f"{spec}: no such file or directory ({reason}, so it is read as a local path, not a Hub id); check the path"
        )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean 'the network failed' for whichever HTTP client huggingface_hub uses."""
    found: list[type[BaseException]] = []
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            cls = getattr(__import__(module), attr, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def unreachable(error: BaseException) -> InputError:
    """The one-line error for a Hub that cannot be reached, with the fix."""
    return InputError(
        f"cannot reach the Hub at {endpoint()} ({first_line(error)}); check the network, or set HF_HUB_OFFLINE=1 "
        "to use the local cache"
    )


def first_line(error: BaseException) -> str:
    """An exception's message, first line only, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def network_errors() -> Iterator[None]:
    """Turn a failed connection (refused, no route, DNS, timeout) into one-line :func:`unreachable`."""
    errors = _transport_errors()
    try:
        yield
    except errors as e:
        raise unreachable(e) from None


def cache_dir() -> str | None:
    """The hub cache folder the user configured, or None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _choose_patterns(files: list[str]) -> list[str]:
    """Weights to fetch: safetensors (with index) if the repo has any, otherwise PyTorch pickles."""
    names = set(files)
    if layout.SAFETENSORS_INDEX in names:
        return [layout.SAFETENSORS_INDEX, f"model-*{layout.SAFETENSORS}", layout.SINGLE]
    if layout.SINGLE in names:
        return [layout.SINGLE]
    if any(f.endswith(layout.SAFETENSORS) for f in files):
        return layout.HUB_SAFETENSORS_PATTERNS
    return layout.HUB_PICKLE_PATTERNS


@contextmanager
def repo_errors(repo: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's access errors (gated, unknown repo, unknown revision) into one-line InputErrors."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.GatedRepoError:
        raise InputError(f"Hub repo {repo} is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise InputError(
            f"Hub repo {repo} was not found (or is private); check the id, or set HF_TOKEN for a private repo"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise InputError(
            f"revision {revision!r} of Hub repo {repo} was not found; check the branch, tag or commit"
        ) from None


def download(spec: str, *, progress: bool = True) -> tuple[Path, str]:
    """Fetch (or find in the cache) the weight files of a Hub repo; return the snapshot folder and a label."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    repo, revision = split_id(spec)
    is_offline = offline()
    cache = cache_dir()
    if progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
    try:
        with repo_errors(repo, revision):
            if is_offline:
                patterns = layout.HUB_SAFETENSORS_PATTERNS + layout.HUB_PICKLE_PATTERNS
            else:
                patterns = _choose_patterns(repo_files(repo, revision))
            patterns = [*patterns, "config.json"]  # small; FP8 block size, tied embeddings (ckptdiff.io.views.config)
            folder = hf.snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=is_offline,
                allow_patterns=patterns,
                endpoint=None if is_offline else endpoint(),
            )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        where = cache or "the default Hugging Face cache"
        raise InputError(
            f"Hub repo {spec} is not in the local cache ({where}) and HF_HUB_OFFLINE is set; "
            "download it once online or unset HF_HUB_OFFLINE"
        ) from None
    except _transport_errors() as e:
        raise unreachable(e) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise InputError(
            f"could not fetch Hub repo {spec}: {first_line(e)}; check the network, or set HF_HUB_OFFLINE=1"
        ) from None
    path = Path(folder)
    return path, f"hub:{repo}@{path.name} ({path})"


def repo_info(repo: str, revision: str | None, *, files_metadata: bool = False) -> Any:
    """The repo's ``ModelInfo`` at ``revision`` (its commit and files), in one request with no retries.

    huggingface_hub retries listings for half a minute when the network is down; one request, bounded by
    ``HF_HUB_ETAG_TIMEOUT`` (10 s by default), answers the question "can the Hub be reached" at once.
    """
    import huggingface_hub as hf
    from huggingface_hub import constants

    with network_errors(), repo_errors(repo, revision):
        return hf.HfApi(endpoint=endpoint()).model_info(
            repo, revision=revision, files_metadata=files_metadata, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )


def repo_files(repo: str, revision: str | None) -> list[str]:
    """Every file name of the repo at ``revision`` (see :func:`repo_info`)."""
    info = repo_info(repo, revision)
    return [s.rfilename for s in info.siblings or []]
