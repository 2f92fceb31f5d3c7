"""Hub checkpoints read by byte range: compare a pair larger than the disk without storing either side.

``HubStreamSource.open("org/name@rev")`` (what :func:`ckptdiff.io.source.resolve` returns for a Hub id when
``CKPTDIFF_HUB_STREAM=1`` or ``stream=True``):

1. one metadata request resolves the revision to its commit and lists the files with their sizes; it is not
   retried, so a Hub that cannot be reached is one line at once, and it is checked strictly (safe relative names,
   byte counts: :func:`ckptdiff.io.hub.download.listing`);
2. ``model.safetensors.index.json``, when the repo has one, is fetched whole (it is small);
3. each shard's header is read with two range requests, its first 8 bytes and then its N header bytes, for all
   shards in parallel, and validated by the same strict parser as a local file
   (:mod:`ckptdiff.io.formats.safetensors_header`);
4. every read afterwards is a range request for exactly the bytes asked for (large reads are split into a few
   parallel requests), written into the caller's buffer (the reader's reused buffer ring): nothing is written
   to disk, and the bytes that cross the network are the headers plus the tensor bytes read, each once;
5. ``config.json`` is fetched whole, once, only if a view needs it (FP8 block size, ``tie_word_embeddings`` when
   ``lm_head.weight`` is absent: :mod:`ckptdiff.io.views.config`).

Every URL names the commit the revision resolved to, so a branch that moves during a long run cannot mix two
commits. Requests go through huggingface_hub's HTTP session (its proxy and client settings) with its headers
(``HF_TOKEN``); a failed connection or a 429/5xx answer is retried twice (1 s, then 3 s, resuming after the
bytes already received), each wait and stall bounded by ``HF_HUB_DOWNLOAD_TIMEOUT``, and each request by a
:class:`ckptdiff.io.hub.download.Deadline` (a server that drips bytes is given up, naming the file). When the run
stops (Ctrl-C while the source's workers or the reader's prefetch thread wait on a stalled read),
:meth:`Remote.abort` shuts the connections in use down, so the run ends at once (exit 130) rather than when the
reads time out.

PyTorch pickles (``.bin``/``.pt``) cannot be streamed: a pickle must be read to know where its tensors are, so
a repo without safetensors is refused (download it instead).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import quote

import numpy as np
import torch

from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io import layout
from ckptdiff.io.formats import safetensors_header as st_header
from ckptdiff.io.formats.safetensors import header_infos
from ckptdiff.io.hub import download as hub
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views.config import NAME as CONFIG

INDEX = layout.SAFETENSORS_INDEX
PART_BYTES = 8 * 1024 * 1024  # a read larger than this is split into parallel requests of this size
WORKERS = 4  # parallel requests per checkpoint (large reads, shard headers)
RETRY_WAITS = (1.0, 3.0)  # seconds before each retry of a failed request; len() is the number of retries
RETRY_AFTER_CAP = 10.0  # the most a 429's Retry-After is honoured, in seconds
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
WHOLE_FILE_MAX = 4 * 1024 * 1024  # a file this small may come whole when a server ignores the range asked for
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class _Retry(Exception):
    """A response worth asking again for (408, 429, 5xx), with the wait the server asked for."""

    def __init__(self, status: int, wait: float | None = None):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.wait = wait


class Remote:
    """Range requests for the files of one repo at one commit, with bounded retries; counts what it fetched."""

    def __init__(self, repo: str, sha: str, sizes: dict[str, int | None]):
        from huggingface_hub.utils import build_hf_headers, get_session

        self.repo = repo
        self.sha = sha
        self.sizes = sizes
        self.endpoint = hub.endpoint()
        self.session: Any = get_session()
        if not hasattr(self.session, "stream"):  # huggingface_hub < 1.0 used requests
            raise InputError(
                "streaming Hub reads need huggingface_hub 1.0 or later; upgrade it, or unset CKPTDIFF_HUB_STREAM"
            )
        self.headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        self.timeout = hub.timeout()
        self.fetched = 0  # body bytes received
        self.requests = 0
        self._lock = threading.Lock()
        self._transport = hub._transport_errors()
        self._request = hub._request_errors()  # also a redirect loop, a body that cannot be decoded
        self._generation = 0  # abort() moves it on: a request begun before then gives up
        self._reading: dict[int, Any] = {}  # the responses being read, by id (abort() shuts them down)
        self._config_lock = threading.Lock()
        self._config: tuple[tuple[str, bytes] | None] | None = None  # (config,) once fetched

    @classmethod
    def open(cls, repo: str, revision: str | None) -> Remote:
        """The repo at ``revision``, resolved to its commit and file sizes in one request (not retried)."""
        found = hub.listing(repo, revision, sizes=True)
        return cls(repo, found.sha, found.sizes)

    def small_file(self, filename: str, what: str, limit: int) -> tuple[str, bytes] | None:
        """A small file of the repo (at most ``limit`` bytes, the cap of a local side file of its kind), fetched
        whole, and where it is (for messages); None when the repo lacks it."""
        if filename not in self.sizes:
            return None
        size = self.sizes[filename]
        if size is None or size > limit:
            raise InputError(f"{self.where(filename)} is {size} bytes, not {what}; check the repo")
        raw = bytearray(size)
        self.get_range(filename, 0, memoryview(raw), what)
        return self.where(filename), bytes(raw)

    def config(self) -> tuple[str, bytes] | None:
        """The repo's ``config.json`` and where it is, fetched whole the first time it is asked for (None when the
        repo has none): what a view needs from it (:mod:`ckptdiff.io.views.config`)."""
        with self._config_lock:
            if self._config is None:
                self._config = (self.small_file(CONFIG, "a model config", fileio.MAX_CONFIG_BYTES),)
            return self._config[0]

    def url(self, filename: str) -> str:
        """The file's address at the pinned commit (``{endpoint}/{repo}/resolve/{commit}/{file}``)."""
        return f"{self.endpoint}/{self.repo}/resolve/{quote(self.sha, safe='')}/{quote(filename)}"

    def where(self, filename: str) -> str:
        """A file, named for messages."""
        return f"{filename} of Hub repo {self.repo}@{self.sha[:12]}"

    def get_range(self, filename: str, pos: int, view: memoryview, what: str) -> int | None:
        """Fill ``view`` with the bytes of ``filename`` from ``pos``; the file's size as the server states it.

        One request, resumed after the bytes already received when it fails in a way worth retrying.
        """
        n = len(view)
        if n == 0:
            return self.sizes.get(filename)
        done = 0
        failures = 0
        generation = self._generation
        while True:
            try:
                return self._get(filename, pos, view, done, what, generation)
            except _Retry as e:  # an answer worth asking again for, before any byte of it was taken
                error: BaseException = e
                wait = e.wait
            except self._transport as e:  # no connection
                error, wait = e, None
            except _Progress as p:  # the connection broke after some bytes arrived
                done, error, wait = p.done, p.error, None
            except self._request as e:  # an answer that is no usable HTTP: asking again would get the same
                raise hub.request_failed(e, f"{what} of {self.where(filename)}") from None
            if self._generation != generation:  # abort() shut the connection down: not a failure to retry
                raise self._abandoned(filename, what)
            failures += 1
            if failures > len(RETRY_WAITS):
                if isinstance(error, _Retry):
                    raise hub.answered(error.status, f"{what} of {self.where(filename)}", failures) from None
                raise hub.request_failed(error, f"{what} of {self.where(filename)}", failures) from None
            time.sleep(RETRY_WAITS[failures - 1] if wait is None else min(wait, RETRY_AFTER_CAP))

    def abort(self) -> None:
        """Make the requests in progress, in other threads, end at once with an error (not retried), instead of
        when their bytes come or their timeout passes: their connections are shut down, which wakes a thread
        blocked reading one. Requests made afterwards are unaffected."""
        with self._lock:
            self._generation += 1
            reading = list(self._reading.values())
        for response in reading:
            _shut_down(response)

    @contextmanager
    def _reading_now(self, response: Any, generation: int, filename: str, what: str) -> Iterator[None]:
        """While ``response`` is read, :meth:`abort` can shut it down; one begun before an abort gives up now."""
        with self._lock:
            if self._generation != generation:
                raise self._abandoned(filename, what)
            self._reading[id(response)] = response
        try:
            yield
        finally:
            with self._lock:
                self._reading.pop(id(response), None)

    def _abandoned(self, filename: str, what: str) -> InputError:
        return InputError(f"the read of {what} of {self.where(filename)} was abandoned: the run is stopping")

    def _get(self, filename: str, pos: int, view: memoryview, done: int, what: str, generation: int) -> int | None:
        n = len(view)
        first, last = pos + done, pos + n - 1
        headers = {**self.headers, "Range": f"bytes={first}-{last}"}
        started = time.monotonic()
        with self._lock:
            self.requests += 1
        with (
            self.session.stream("GET", self.url(filename), headers=headers, timeout=self.timeout) as r,
            self._reading_now(r, generation, filename, what),
        ):
            status = r.status_code
            if status in RETRY_STATUS:
                raise _Retry(status, _retry_after(r.headers.get("Retry-After")))
            if status >= 400:
                r.read()  # small error bodies: huggingface_hub reads them to name the error
                self._raise_http(r, filename, what)
            if status == 206:
                size, skip = self._check_range(r.headers.get("Content-Range"), filename, first, last), 0
            elif status == 200:  # the range was ignored: tolerable for a small file only
                size, skip = self._whole_file(r.headers.get("Content-Length"), filename), first
            else:
                raise InputError(
                    f"the Hub at {self.endpoint} answered a byte-range request for {self.where(filename)} with "
                    f"HTTP {status}; unset CKPTDIFF_HUB_STREAM to download it"
                )
            deadline = hub.Deadline(skip + n - done, f"{what} of {self.where(filename)}", started)
            try:
                for chunk in r.iter_bytes():
                    with self._lock:
                        self.fetched += len(chunk)
                    piece = memoryview(chunk)
                    deadline.got = (deadline.got or 0) + len(piece)
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                    take = min(len(piece), n - done)
                    if take < len(piece) and status == 206:
                        raise InputError(
                            f"the Hub sent more bytes than asked for while reading {what} from {self.where(filename)}; "
                            "rerun, or unset CKPTDIFF_HUB_STREAM to download it"
                        )
                    view[done : done + take] = piece[:take]
                    done += take
                    if done == n and status == 200:
                        break  # the rest of a small whole file is not needed
                    deadline.check()
            except self._transport as e:
                raise _Progress(done, e) from None
            if done < n:
                raise _Progress(done, ConnectionError(f"the response ended after {done} of {n} bytes"))
            return size

    def _whole_file(self, length: str | None, filename: str) -> int:
        """The size of a file sent whole in answer to a range request; :class:`InputError` unless it is small."""
        size = int(length) if length and length.isdigit() else self.sizes.get(filename)
        if size is None or size > WHOLE_FILE_MAX:
            raise InputError(
                f"the Hub at {self.endpoint} answered a byte-range request for {self.where(filename)} with the whole "
                f"file ({'unknown size' if size is None else f'{size} bytes'}: HTTP 200 instead of 206), so it "
                "cannot be streamed; unset CKPTDIFF_HUB_STREAM to download it"
            )
        return size

    def _check_range(self, header: str | None, filename: str, first: int, last: int) -> int | None:
        """The total size from ``Content-Range``; :class:`InputError` unless it is the range asked for."""
        m = _CONTENT_RANGE.match(header or "")
        if m is None:
            raise InputError(
                f"the Hub's answer to a byte-range request for {self.where(filename)} has no valid Content-Range "
                f"({header!r}); unset CKPTDIFF_HUB_STREAM to download it"
            )
        got_first, got_last = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == "*" else int(m.group(3))
        expected = self.sizes.get(filename)
        if total is not None and expected is not None and total != expected:
            raise InputError(f"{self.where(filename)} is {total} bytes, but the repo listing says {expected}; rerun")
        if (got_first, got_last) != (first, last):
            if total is not None and got_first == first and got_last == total - 1 < last:
                raise InputError(
                    f"safetensors file {self.where(filename)} is truncated: it ends at byte {total}, before byte "
                    f"{last + 1} that its header promises; report it to the repo's owner"
                )
            raise InputError(
                f"the Hub answered a request for bytes {first}-{last} of {self.where(filename)} with bytes "
                f"{got_first}-{got_last}; unset CKPTDIFF_HUB_STREAM to download it"
            )
        return total

    def _raise_http(self, response: Any, filename: str, what: str) -> None:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub.utils import hf_raise_for_status

        if response.status_code == 416:
            raise InputError(
                f"safetensors file {self.where(filename)} is shorter than its header says (HTTP 416 for {what}); "
                "report it to the repo's owner"
            )
        try:
            with hub.repo_errors(self.repo, self.sha):
                hf_raise_for_status(response)
        except hf_errors.EntryNotFoundError:
            raise InputError(f"{self.where(filename)} was not found; the repo is incomplete") from None
        except hf_errors.HfHubHTTPError as e:
            raise hub.http_refused(e, f"{what} of {self.where(filename)}") from None
        raise InputError(f"the Hub refused to send {what} of {self.where(filename)}: HTTP {response.status_code}")


def _shut_down(response: Any) -> None:
    """Shut the connection of ``response`` down both ways: a thread blocked reading it gets an error at once.

    The plain socket's shutdown, also under TLS (``SSLSocket.shutdown`` would drop the TLS state under the reader's
    feet); a response without a socket (another transport) is left alone.
    """
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Progress(Exception):
    """A connection that broke after ``done`` bytes of the range had arrived (retried from there)."""

    def __init__(self, done: int, error: BaseException):
        super().__init__(str(error))
        self.done = done
        self.error = error


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class HubStreamSource(Source):
    """A safetensors checkpoint on the Hub, read by byte range: headers up front, tensor bytes on demand."""

    def __init__(self, spec: str, resolved: str, remote: Remote):
        super().__init__(spec, resolved)
        self.remote = remote
        self._spans: dict[str, tuple[str, int]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def open(cls, spec: str) -> HubStreamSource:
        """Resolve ``org/name[@revision]`` and read every shard's header; :class:`InputError` if unusable."""
        repo, revision = hub.split_id(spec)
        remote = Remote.open(repo, revision)
        sha = remote.sha
        shards, expected = _shards(spec, remote)
        label = f"hub:{repo}@{sha} (streamed by byte range, {len(shards)} safetensors file{'s' * (len(shards) > 1)})"
        src = cls(spec, label, remote)
        try:
            for filename, (infos, offsets) in zip(shards, src._map(src._header, shards), strict=True):
                for name, tinfo in infos.items():
                    if name in src.infos:
                        raise InputError(
                            f"Hub repo {spec}: tensor {name!r} appears in both {src.infos[name].file[4:]} and "
                            f"{filename}; the repo's shards overlap"
                        )
                    src.infos[name] = tinfo
                    src._spans[name] = (filename, offsets[name])
            for name, shard in (expected or {}).items():
                if name not in src.infos:
                    raise InputError(
                        f"the index of Hub repo {spec} says tensor {name!r} is in {shard}, but that shard does not "
                        "hold it; the repo is incomplete"
                    )
        except BaseException:
            src.close()
            raise
        return src

    def _header(self, filename: str) -> tuple[dict[str, TensorInfo], dict[str, int]]:
        """One shard's header: its first 8 bytes, then exactly its N header bytes, strictly validated."""
        remote = self.remote
        what = f"safetensors file {remote.where(filename)}"
        head = bytearray(8)
        known = remote.sizes.get(filename)
        if known is not None and known < 8:
            raise InputError(
                f"{what} is truncated (shorter than its 8-byte header length); report it to the repo's owner"
            )
        size = remote.get_range(filename, 0, memoryview(head), "its header length")
        size = known if size is None else size
        if size is None:
            raise InputError(f"the Hub did not say how large {remote.where(filename)} is; unset CKPTDIFF_HUB_STREAM")
        hlen = int.from_bytes(head, "little")
        try:
            st_header.check_length(hlen, size)
            raw = bytearray(hlen)
            remote.get_range(filename, 8, memoryview(raw), "its header")
            header = st_header.parse(bytes(raw), size - 8 - hlen)
        except st_header.HeaderProblem as p:
            raise InputError(f"{what} {p.reason}; {p.fix}") from None
        return header_infos(header, 8 + hlen, what, f"hub:{filename}")

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        info = self.infos[name]
        n = info.numel - start if count is None else count
        size = info.dtype.itemsize
        buf = np.empty(n * size, dtype=np.uint8) if out is None else out[: n * size]
        filename, offset = self._spans[name]
        self._fetch(filename, offset + start * size, memoryview(buf), f"tensor {name!r}")  # type: ignore[arg-type]
        return fileio.as_dtype(buf, info.dtype.torch)

    def _fetch(self, filename: str, pos: int, view: memoryview, what: str) -> None:
        """Fill ``view`` from byte ``pos``: one request, or parallel ones of ``PART_BYTES`` for a large read."""
        n = len(view)
        if n <= PART_BYTES * 3 // 2:
            self.remote.get_range(filename, pos, view, what)
            return
        bounds = [(a, min(a + PART_BYTES, n)) for a in range(0, n, PART_BYTES)]
        if n - bounds[-1][0] < PART_BYTES // 2 and len(bounds) > 1:  # no sliver of a last part
            bounds[-2:] = [(bounds[-2][0], n)]
        list(self._map(lambda ab: self.remote.get_range(filename, pos + ab[0], view[ab[0] : ab[1]], what), bounds))

    def _map(self, fn: Any, items: list[Any]) -> Iterator[Any]:
        """``fn`` over ``items`` on this source's few worker threads, results in order; the first error is raised."""
        if len(items) <= 1:
            return iter([fn(x) for x in items])
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="ckptdiff-hub")
            pool = self._pool
        futures: list[Future[Any]] = []
        with _cancel_on_error(futures, self.remote.abort):
            futures.extend(pool.submit(fn, x) for x in items)
            return iter([f.result() for f in futures])

    def remote_config(self) -> tuple[str, bytes] | None:
        """The repo's ``config.json``, fetched whole the first time a view asks for it (None when it has none)."""
        return self.remote.config()

    def abandon_reads(self) -> None:
        self.remote.abort()

    @property
    def fetched_bytes(self) -> int:
        """Bytes received from the Hub so far (headers, index and tensor data)."""
        return self.remote.fetched

    def close(self) -> None:
        """Abandon the reads in progress (none, unless the run is being interrupted), then end the workers."""
        self.remote.abort()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _cancel_on_error(futures: list[Future[Any]], abort: Callable[[], None]) -> Iterator[None]:
    """On an error, cancel what has not started and wait for what has, so no request outlives the call; on Ctrl-C
    (or another exception that is no error), ``abort()`` the requests in progress first, so the wait is short."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, Exception):
            abort()
        for f in futures:
            f.cancel()
        for f in futures:
            if not f.cancelled():
                with suppress(BaseException):  # the first error is the one raised
                    f.result()
        raise


class AdapterRepo(InputError):
    """The repo is a PEFT adapter (``adapter_config.json``): a few MB of factors, downloaded with its config
    rather than streamed (:func:`ckptdiff.io.resolve.open_stored` does so)."""


def _shards(spec: str, remote: Remote) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight map when there is one (the local folder's rules)."""
    names = remote.sizes
    if layout.ADAPTER_CONFIG in names:
        raise AdapterRepo(f"Hub repo {spec} is a PEFT adapter; it is downloaded, not streamed")
    if INDEX in names:
        return _read_index(spec, remote)
    if layout.SINGLE in names:
        return [layout.SINGLE], None
    top = sorted(f for f in names if f.endswith(".safetensors") and "/" not in f)
    if top:
        return top, None
    if any(layout.is_pickle(f) for f in names):
        raise InputError(
            f"Hub repo {spec} holds PyTorch pickles and no safetensors; a pickle cannot be read by byte range "
            "(it must be unpickled to find its tensors): unset CKPTDIFF_HUB_STREAM to download it"
        )
    raise hub.no_checkpoint(spec)


def _read_index(spec: str, remote: Remote) -> tuple[list[str], dict[str, str]]:
    """Fetch the index whole; every shard it names must be a file of the repo."""
    size = remote.sizes.get(INDEX)
    if size is None or size > fileio.MAX_INDEX_BYTES:
        raise InputError(f"the index of Hub repo {spec} is {size} bytes, not a checkpoint index; check the repo")
    raw = bytearray(size)
    remote.get_range(INDEX, 0, memoryview(raw), "the index")
    where = remote.where(INDEX)
    data = fileio.parse_json(bytes(raw), where, "check the repo")  # bounded nesting and integers, as a local index
    weight_map = layout.parse_weight_map(data, where, "check the repo")
    shards: list[str] = []
    for shard in dict.fromkeys(weight_map.values()):
        if shard not in remote.sizes:  # every name of the listing is a safe relative path (hub.listing)
            raise InputError(
                f"{remote.where(INDEX)} names shard {shard!r}, which is not a file of the repo; the repo is incomplete"
            )
        shards.append(shard)
    return shards, weight_map
