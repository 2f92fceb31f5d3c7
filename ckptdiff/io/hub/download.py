"""Hugging Face Hub checkpoints: download only the weights, honour the user's cache, offline mode and token.

Environment read at call time: ``HF_HUB_OFFLINE`` (use the local cache only), ``HF_HUB_CACHE`` / ``HF_HOME``
(where the cache lives), ``HF_ENDPOINT`` (a Hub mirror), ``CKPTDIFF_HUB_STREAM`` (read tensors by byte range
instead of downloading: :mod:`ckptdiff.io.hub.stream`), ``HF_TOKEN`` (picked up by huggingface_hub itself).

A spec that matches ``org/name`` but names a local path with a typo in it (``runs/ckpt-20O`` next to a folder
``runs/``) is refused at once as a missing path (:func:`refuse_path_like`), and a Hub that cannot be reached is
one line with the fix, after one attempt, never minutes of retries. A failed request is one line that names the
file and the repo and says how it failed (:func:`request_failed`, :func:`answered`): no connection, no answer in
time, a garbled answer, an HTTP error (a 5xx says to rerun later, never that the repo is not in the cache).

What the Hub answers is checked as strictly as a local file: the file listing (:func:`listing`) must be a
document with a commit id and files whose names are safe relative paths and whose sizes are byte counts, and a
malformed answer, a redirect loop or a name like ``../../x`` is one line naming the repo, not an internal error.

Every transfer has a :class:`Deadline`: one timeout (``HF_HUB_DOWNLOAD_TIMEOUT``), plus its bytes at
:data:`MIN_RATE`. A per-read timeout alone never trips on a server that drips a byte every few seconds; the
deadline gives it up and names the file. huggingface_hub's own calls (the listing, downloads) run in a thread
that this one waits for (:func:`supervised`), so that a deadline or Ctrl-C is acted on at once.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from ckptdiff.errors import InputError
from ckptdiff.io import layout
from ckptdiff.io.formats.safetensors_header import I64_MAX

STREAM_ENV = "CKPTDIFF_HUB_STREAM"
_TRUE = {"1", "true", "yes", "on"}
_COMMIT = re.compile(r"[0-9a-fA-F]{7,64}")  # a git commit id, as the Hub's listing gives it
NAME_MAX = 1024  # characters in a file name of a repo (the Hub's own paths are far shorter)
# What huggingface_hub raises while parsing an answer it could not make sense of (JSONDecodeError is a ValueError).
_MALFORMED = (ValueError, TypeError, KeyError, AttributeError, RecursionError)
MIN_RATE = 64 * 1024  # bytes per second a transfer from the Hub must average (after one timeout to get going)
LISTING_BYTES = 1 << 20  # what a file listing's deadline allows for (a repo of thousands of files)
POLL_S = 0.05  # how often a wait for huggingface_hub's call looks at the deadlines
PARALLEL = 8  # files downloaded at once after the first (huggingface_hub's snapshot download uses 8 too)
T = TypeVar("T")
_quiet_lock = threading.Lock()
_quiet: dict[str, int] = {"threads": 0, "level": logging.NOTSET}  # see _hub_quiet


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


def _named(*names: str) -> tuple[type[BaseException], ...]:
    """The exception classes of these names in the HTTP clients huggingface_hub may use (httpx2, httpx, requests)."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "requests"):
        try:
            client = __import__(module)
        except ImportError:
            continue
        for name in names:
            cls = getattr(client, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean 'the network failed' (worth asking again) for huggingface_hub's HTTP client."""
    return _named("TransportError", "ConnectionError")


def _request_errors() -> tuple[type[BaseException], ...]:
    """Every failed request of whichever HTTP client huggingface_hub uses: no connection, and also an answer that
    is no usable HTTP (a redirect loop, a body that cannot be decoded)."""
    return _named(
        "RequestError", "ConnectionError", "Timeout", "TooManyRedirects", "ContentDecodingError", "ChunkedEncodingError"
    )


_OFFLINE_FIX = "or set HF_HUB_OFFLINE=1 to use the local cache"
_PROXY_FIX = "check HF_ENDPOINT and any proxy, and rerun"


def request_failed(error: BaseException, what: str, tries: int = 1) -> InputError:
    """The one-line error for a request for ``what`` (which names the file and the repo) that got no usable answer,
    saying which way it failed: no connection, no answer in time, a redirect loop, a garbled answer, or a connection
    that broke off."""
    at = f"the Hub at {endpoint()}"
    told = f"{first_line(error)}{f'; {tries} tries' if tries > 1 else ''}"
    if isinstance(error, _named("ConnectError", "ConnectTimeout", "ProxyError", "ConnectionError")):
        return InputError(f"cannot reach {at} to fetch {what} ({told}); check the network, {_OFFLINE_FIX}")
    if isinstance(error, _named("TimeoutException", "Timeout")):
        return InputError(
            f"{at} did not answer the request for {what} in time ({told}); check the network and rerun, {_OFFLINE_FIX}"
        )
    if isinstance(error, _named("TooManyRedirects")):
        return InputError(f"{at} redirected the request for {what} in a loop ({told}); {_PROXY_FIX}")
    if isinstance(error, _named("ProtocolError", "DecodingError", "ContentDecodingError", "ChunkedEncodingError")):
        return InputError(
            f"{at} sent a garbled answer to the request for {what} ({type(error).__name__}: {told}); {_PROXY_FIX}"
        )
    return InputError(
        f"the connection to {at} broke off during the request for {what} ({told}); check the network and rerun, "
        + _OFFLINE_FIX
    )


def answered(status: object, what: str, tries: int = 1, said: str = "") -> InputError:
    """The one-line error for a request for ``what`` that the Hub answered with the error HTTP ``status``."""
    told = f" ({said})" if said else ""
    again = f" {tries} times" if tries > 1 else ""
    busy = status == 429 or (isinstance(status, int) and status >= 500)
    fix = f"rerun later, {_OFFLINE_FIX}" if busy else "check HF_ENDPOINT, HF_TOKEN and any proxy"
    return InputError(f"the Hub at {endpoint()} answered the request for {what} with HTTP {status}{told}{again}; {fix}")


def http_refused(error: BaseException, what: str) -> InputError:
    """:func:`answered` for huggingface_hub's ``HfHubHTTPError`` (its status, and what the server said)."""
    status = getattr(getattr(error, "response", None), "status_code", None) or "error"
    said = getattr(error, "server_message", None)
    return answered(status, what, said=first_line(said) if isinstance(said, str) else "")


@contextmanager
def request_errors(what: str) -> Iterator[None]:
    """Turn a request for ``what`` that got no usable answer into one line (:func:`request_failed`)."""
    try:
        yield
    except _request_errors() as e:
        raise request_failed(e, what) from None


def first_line(error: BaseException | str) -> str:
    """An exception's message (or a text), first line only; an exception's type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "" if isinstance(error, str) else type(error).__name__


def timeout() -> float:
    """Seconds one read from the Hub may wait (``HF_HUB_DOWNLOAD_TIMEOUT``, as huggingface_hub read it)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


class Deadline:
    """When a transfer of ``nbytes`` (None: a listing, of unknown size) that starts now (or at ``start``) must have
    ended: one :func:`timeout` to get going, plus the bytes at :data:`MIN_RATE`. ``got`` counts the bytes received
    so far, where the reader can tell (None where it cannot)."""

    def __init__(self, nbytes: int | None, what: str, start: float | None = None, got: int | None = 0):
        self.nbytes = nbytes
        self.what = what  # the file and the repo, for the message
        self.got = got
        self.start = time.monotonic() if start is None else start
        self.end = self.start + timeout() + (LISTING_BYTES if nbytes is None else nbytes) / MIN_RATE

    def check(self) -> None:
        """:class:`InputError` naming the file once the deadline has passed."""
        if time.monotonic() <= self.end:
            return
        took = f"{time.monotonic() - self.start:.1f} s"
        if self.nbytes is None:
            done = f"not all of it in {took}"
        elif self.got is None:
            done = f"not all {self.nbytes} bytes in {took}"
        else:
            done = f"{self.got} of {self.nbytes} bytes in {took}"
        raise InputError(
            f"the Hub at {endpoint()} sent {self.what} too slowly ({done}; a transfer must average "
            f"{MIN_RATE // 1024} KiB/s); check the network, or HF_ENDPOINT and any proxy, and rerun"
        )


def supervised(work: Callable[[threading.Event], T], deadlines: Callable[[], Iterable[Deadline]]) -> T:
    """``work(stop)`` in a daemon thread, waited for here: Ctrl-C is taken at once, and a transfer past its
    :class:`Deadline` raises that deadline's error. Either way ``stop`` is set and the thread is left to end by itself
    (a read inside huggingface_hub cannot be cut short from outside; ``work`` looks at ``stop`` between reads)."""
    outcome: list[tuple[bool, Any]] = []
    done, stop = threading.Event(), threading.Event()

    def run() -> None:
        try:
            with _hub_quiet():
                outcome.append((True, work(stop)))
        except BaseException as e:  # re-raised in the waiting thread
            outcome.append((False, e))
        finally:
            done.set()

    threading.Thread(target=run, name="ckptdiff-hub", daemon=True).start()
    try:
        while not done.wait(POLL_S):
            for deadline in list(deadlines()):
                deadline.check()
    except BaseException:
        stop.set()
        raise
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


@contextmanager
def _hub_quiet() -> Iterator[None]:
    """huggingface_hub's warnings off while a thread of :func:`supervised` runs (its retries and resumed downloads
    were a dozen lines; ckptdiff says what failed, in one), until the last such thread has ended, a given-up one
    included; ``CKPTDIFF_DEBUG`` keeps them."""
    if os.environ.get("CKPTDIFF_DEBUG", "") not in ("", "0"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    with _quiet_lock:
        if _quiet["threads"] == 0:
            _quiet["level"] = logger.level
            logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
        _quiet["threads"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["threads"] -= 1
            if _quiet["threads"] == 0:
                logger.setLevel(_quiet["level"])


def cache_dir() -> str | None:
    """The hub cache folder the user configured, or None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def unsafe_name(name: object) -> str | None:
    """Why ``name`` cannot be a file of a repo (as a phrase), or None for a safe relative path like ``a/b.json``."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a file name"
    if not name or len(name) > NAME_MAX:
        return "is empty" if not name else f"is longer than {NAME_MAX} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or "\\" in name:
        return "holds a control character or a backslash"
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return "is not a relative path inside the repo"
    return None


def show(value: object, limit: int = 60) -> str:
    """A value from an untrusted answer, short enough for a message (an integer of thousands of digits included)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Listing:
    """What the Hub says a repo holds at a revision: the commit it resolved to, and each file's size in bytes
    (None when sizes were not asked for). Every name is a safe relative path and every size a byte count."""

    repo: str
    sha: str
    sizes: dict[str, int | None]


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
    """Fetch (or find in the cache) the weight files of a Hub repo; return the snapshot folder and a label.

    Online, the files are those of the checked listing (:func:`listing`), fetched one by one, so that a failure
    names its file, and a name the Hub did not list is never asked for.
    """
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    repo, revision = split_id(spec)
    if progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
    if offline():
        path = _cached(spec, repo, revision)
    else:
        found = listing(repo, revision, sizes=True)
        path = _fetch(spec, found, revision, _choose_files(list(found.sizes)))
    return path, f"hub:{repo}@{path.name} ({path})"


def _cached(spec: str, repo: str, revision: str | None) -> Path:
    """The snapshot of the repo in the local cache (HF_HUB_OFFLINE is set); :class:`InputError` if it has none."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    cache = cache_dir()
    patterns = [*layout.HUB_SAFETENSORS_PATTERNS, *layout.HUB_PICKLE_PATTERNS, *layout.HUB_SIDE_FILES]
    try:
        with repo_errors(repo, revision):
            folder = hf.snapshot_download(
                repo, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=patterns
            )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        where = cache or "the default Hugging Face cache"
        raise InputError(
            f"Hub repo {spec} is not in the local cache ({where}) and HF_HUB_OFFLINE is set; "
            "download it once online or unset HF_HUB_OFFLINE"
        ) from None
    return Path(folder)


def _fetch(spec: str, found: Listing, revision: str | None, files: list[str]) -> Path:
    """Download ``files`` into the cache (or find them there) and return their snapshot folder; each transfer has
    a :class:`Deadline` (:func:`supervised`).

    The first (smallest) file is asked for at ``revision``, so that huggingface_hub records which commit the branch
    or tag is at (``HF_HUB_OFFLINE`` finds the snapshot by it later); the others at that commit.
    """
    if not files:
        raise no_checkpoint(spec)
    deadlines: list[Deadline] = []  # the transfer in progress, once it has begun
    ordered = sorted(files, key=lambda f: (found.sizes.get(f) or 0, f))
    return supervised(lambda stop: _fetch_files(spec, found, revision, ordered, deadlines, stop), lambda: deadlines)


def _fetch_files(
    spec: str, found: Listing, revision: str | None, files: list[str], deadlines: list[Deadline], stop: threading.Event
) -> Path:
    """The downloads of :func:`_fetch` until ``stop``: the first alone (it pins the commit), the rest
    :data:`PARALLEL` at a time, as huggingface_hub's own snapshot download does; their snapshot folder."""
    first = Path(_fetch_file(spec, found, revision, files[0], deadlines, stop))
    folder = first.parents[files[0].count("/")]  # snapshots/{commit}/{name}
    if folder.name != found.sha:
        raise InputError(
            f"Hub repo {spec} moved from commit {found.sha[:12]} to {folder.name[:12]} while it was being downloaded; "
            "rerun"
        )
    rest = files[1:]
    if rest:
        pool = ThreadPoolExecutor(max_workers=min(PARALLEL, len(rest)), thread_name_prefix="ckptdiff-hub")
        try:
            futures = [pool.submit(_fetch_file, spec, found, folder.name, n, deadlines, stop) for n in rest]
            for done in as_completed(futures):
                done.result()  # the first failure ends the download (the others stop at their next piece)
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    return folder


def _fetch_file(
    spec: str, found: Listing, revision: str | None, name: str, deadlines: list[Deadline], stop: threading.Event
) -> str:
    """One file of the repo into the cache, at ``revision``, with its :class:`Deadline` in ``deadlines`` while it
    transfers; its path."""
    import huggingface_hub as hf

    if stop.is_set():
        raise InputError(f"the download of Hub repo {spec} was given up")
    what = f"{name} of Hub repo {spec}"
    mine: list[Deadline] = []
    try:
        with _file_errors(found.repo, revision, what):
            return str(
                hf.hf_hub_download(
                    found.repo,
                    name,
                    revision=revision,
                    cache_dir=cache_dir(),
                    endpoint=endpoint(),
                    tqdm_class=_timed_bar(found.sizes.get(name), what, mine, stop, deadlines),
                )
            )
    finally:
        for deadline in mine:
            with suppress(ValueError):
                deadlines.remove(deadline)


def _timed_bar(
    size: int | None, what: str, mine: list[Deadline], stop: threading.Event, deadlines: list[Deadline]
) -> Any:
    """huggingface_hub's progress bar class for one file's download, which also gives the transfer a
    :class:`Deadline` (put in ``mine`` and ``deadlines`` when the bar is made, as the file's bytes begin to arrive),
    and ends the transfer once ``stop`` is set (the bar is updated, in the downloading thread, as pieces arrive)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    owner = threading.get_ident()

    class TimedBar(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # the bar is updated per 10 MB or so, not as bytes arrive: no count for the message
            deadline = Deadline(size if size is not None else kwargs.get("total"), what, got=None)
            mine.append(deadline)
            deadlines.append(deadline)

        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set() and threading.get_ident() == owner:  # never from a thread huggingface_hub runs
                raise InputError(f"the download of {what} was given up")
            return super().update(n)  # type: ignore[no-any-return]

    return TimedBar


@contextmanager
def _file_errors(repo: str, revision: str | None, what: str) -> Iterator[None]:
    """Turn a failed download of ``what`` (a file of a repo) into one line that names it."""
    from huggingface_hub import errors as hf_errors

    try:
        with repo_errors(repo, revision), request_errors(what):
            yield
    except hf_errors.LocalEntryNotFoundError as e:  # the metadata request failed, and the cache has no copy
        raise _failed(e.__cause__ or e, what) from None
    except hf_errors.EntryNotFoundError:
        raise InputError(f"the Hub lists {what} but does not have it; the repo is incomplete") from None
    except OSError as e:  # HfHubHTTPError included; a file that arrived short; a full disk
        raise _failed(e, what) from None


def _failed(error: BaseException, what: str) -> InputError:
    """The one-line error for a download of ``what`` that failed with ``error``."""
    from huggingface_hub import errors as hf_errors

    if isinstance(error, _request_errors()):
        return request_failed(error, what)
    if isinstance(error, hf_errors.HfHubHTTPError):
        return http_refused(error, what)
    return InputError(f"could not download {what}: {first_line(error)}; check the network and rerun")


def no_checkpoint(spec: str) -> InputError:
    """A Hub repo with no weights ckptdiff can read."""
    return InputError(f"Hub repo {spec} holds no checkpoint (.safetensors, index.json, .bin or .pt); check the id")


def listing(repo: str, revision: str | None, *, sizes: bool = False) -> Listing:
    """The repo's commit at ``revision`` and its files (with their sizes if ``sizes``), in one request with no
    retries, checked strictly (:class:`Listing`); :class:`InputError` naming the repo for a malformed answer.

    huggingface_hub retries listings for half a minute when the network is down; one request, bounded by
    ``HF_HUB_ETAG_TIMEOUT`` (10 s by default), answers the question "can the Hub be reached" at once.
    """
    import huggingface_hub as hf
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    what = f"the file listing of Hub repo {repo}"
    api = hf.HfApi(endpoint=endpoint())
    deadline = Deadline(None, what)
    try:
        with request_errors(what), repo_errors(repo, revision):
            info = supervised(
                lambda stop: api.model_info(
                    repo, revision=revision, files_metadata=sizes, timeout=constants.HF_HUB_ETAG_TIMEOUT
                ),
                lambda: [deadline],
            )
    except hf_errors.HFValidationError as e:
        raise InputError(f"{repo} is not a valid Hub repo id ({first_line(e)}); check the id") from None
    except hf_errors.HfHubHTTPError as e:  # a 5xx, a 403 (the 404s of a missing repo or revision: repo_errors)
        raise http_refused(e, what) from None
    except _MALFORMED as e:  # not JSON, a list instead of an object, a number too long to parse, ...
        raise InputError(
            f"the Hub at {endpoint()} answered {what} with a malformed document ({type(e).__name__}: "
            f"{first_line(e)}); check HF_ENDPOINT and any proxy, and rerun"
        ) from None
    return _checked(repo, info, what)


def _checked(repo: str, info: Any, what: str) -> Listing:
    """The :class:`Listing` in huggingface_hub's ``ModelInfo``, each field checked; :class:`InputError` otherwise."""
    fix = "check HF_ENDPOINT and any proxy, or report it to the repo's owner"
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
        raise InputError(f"{what} gives the commit as {show(sha)}, which is not a commit id; {fix}")
    siblings = getattr(info, "siblings", None) or []
    if not isinstance(siblings, list):
        raise InputError(f"{what} lists its files as {type(siblings).__name__}, not a list; {fix}")
    files: dict[str, int | None] = {}
    for sibling in siblings:
        name, size = getattr(sibling, "rfilename", None), getattr(sibling, "size", None)
        why = unsafe_name(name)
        if why is not None or not isinstance(name, str):  # (why names the type of a name that is no str)
            raise InputError(f"{what} names a file {show(name)}, which {why}; {fix}")
        if size is not None and (type(size) is not int or not 0 <= size <= I64_MAX):
            raise InputError(f"{what} gives file {name} a size of {show(size)}, which is not a byte count; {fix}")
        files[name] = size
    return Listing(repo, sha, files)


def _choose_files(files: list[str]) -> list[str]:
    """The files of a repo to download: its weights (:func:`_choose_patterns`, matched as huggingface_hub matches
    them), its ``config.json`` (FP8 block size, tied embeddings: :mod:`ckptdiff.io.views.config`) and an adapter's
    ``adapter_config.json`` (:mod:`ckptdiff.io.views.lora`)."""
    patterns = [*_choose_patterns(files), *layout.HUB_SIDE_FILES]
    return [f for f in files if any(fnmatchcase(f, p) for p in patterns)]
