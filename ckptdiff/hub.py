"""Hugging Face Hub checkpoints: download only the weights, honour the user's cache, offline mode and token.

Environment read at call time: ``HF_HUB_OFFLINE`` (use the local cache only), ``HF_HUB_CACHE`` / ``HF_HOME``
(where the cache lives), ``HF_TOKEN`` (picked up by huggingface_hub itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptdiff.errors import InputError

SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
_TRUE = {"1", "true", "yes", "on"}


def split_id(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> revision None (the default branch)."""
    repo, _, rev = spec.partition("@")
    return repo, (rev or None)


def offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


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
    if "model.safetensors.index.json" in names:
        return ["model.safetensors.index.json", "model-*.safetensors", "model.safetensors"]
    if "model.safetensors" in names:
        return ["model.safetensors"]
    if any(f.endswith(".safetensors") for f in files):
        return SAFETENSORS_PATTERNS
    return PICKLE_PATTERNS


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
                patterns = SAFETENSORS_PATTERNS + PICKLE_PATTERNS
            else:
                patterns = _choose_patterns(hf.HfApi().list_repo_files(repo, revision=revision))
            folder = hf.snapshot_download(
                repo, revision=revision, cache_dir=cache, local_files_only=is_offline, allow_patterns=patterns
            )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        where = cache or "the default Hugging Face cache"
        raise InputError(
            f"Hub repo {spec} is not in the local cache ({where}) and HF_HUB_OFFLINE is set; "
            "download it once online or unset HF_HUB_OFFLINE"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"could not fetch Hub repo {spec}: {first}; check the network, or set HF_HUB_OFFLINE=1"
        ) from None
    path = Path(folder)
    return path, f"hub:{repo}@{path.name} ({path})"
