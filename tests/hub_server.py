"""A fake Hugging Face Hub on 127.0.0.1 for tests: the few endpoints ckptdiff's Hub code calls, over local folders.

Endpoints (as huggingface_hub 2.x calls them):

- ``GET /api/models/{org}/{name}`` and ``GET /api/models/{org}/{name}/revision/{rev}`` (``HfApi.model_info``):
  ``{"id", "sha", "siblings": [{"rfilename", "size"}]}``; ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound``;
- ``GET`` / ``HEAD /{org}/{name}/resolve/{rev}/{file}``: the file, ``206`` with ``Content-Range`` for a
  ``Range: bytes=a-b`` request; ``X-Error-Code: GatedRepo`` (401) for a gated repo, ``EntryNotFound`` (404);
  with ``redirect`` set, a ``302`` to ``/cdn/{org}/{name}/{sha}/{file}`` instead, which serves the bytes (as the
  Hub redirects large files to its CDN).

Misbehaviours, each for one kind of answer (``"info"``: model info, the repo's file listing; ``"file"``: a file's
bytes, on ``/resolve/`` or the CDN): ``status`` (answer a GET with that HTTP status instead; a HEAD, the
metadata request, is answered normally), ``drip`` (send the body one byte at a time, this many seconds apart),
``loop`` (redirect the request to itself, forever), ``garble`` (``"junk"``: bytes that are no HTTP answer;
``"gzip"``: a body that claims gzip and is not); ``faults`` (one per file GET, in turn); and ``info`` (rewrite the
model-info document, or replace it with raw bytes).

Every request is logged with the bytes of body it was sent. HTTP/1.0 (one request per connection), a socket
timeout per connection, and :meth:`FakeHub.stop` shuts the loop down, ends every dripping or stalled answer and
closes the listening socket, so nothing outlives the test. :func:`serve` starts one and points huggingface_hub at
it (its endpoint, and a cache and home under the test's folder), for a test module's fixture.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest


@dataclass
class Repo:
    """A repo: one commit whose files are those of ``folder``, reachable by its sha and its branch names."""

    folder: Path
    sha: str
    branches: tuple[str, ...] = ("main",)
    gated: bool = False

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


@dataclass
class Served:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    status: int
    nbytes: int  # body bytes sent (or being sent)


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    revisions: dict[str, list[Repo]] = field(default_factory=dict)  # further commits of a repo, by their branches
    log: list[Served] = field(default_factory=list)
    ignore_range: bool = False  # answer range requests with the whole file (200), as a broken proxy would
    redirect: bool = False  # send file requests on to /cdn/... with a 302
    # for the next file GETs: "503", "cut" (half a body, then hang up) or "stall" (no body until the server stops,
    # calling on_stall first); "" answers normally
    faults: list[str] = field(default_factory=list)
    on_stall: Callable[[], None] | None = None
    status: dict[str, int] = field(default_factory=dict)  # kind ("info", "file") -> status for a GET
    drip: dict[str, float] = field(default_factory=dict)  # kind -> seconds between the body's bytes
    loop: set[str] = field(default_factory=set)  # kinds redirected to themselves
    garble: dict[str, str] = field(default_factory=dict)  # kind -> "junk" or "gzip"
    info: Callable[[dict[str, Any]], Any] | bytes | None = None  # rewrites the model-info document, or replaces it
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: str, folder: Path, sha: str, **kw: Any) -> None:
        self.repos[repo] = Repo(folder, sha, **kw)

    def add_revision(self, repo: str, folder: Path, sha: str, branches: tuple[str, ...]) -> None:
        """Another commit of ``repo`` (added first with :meth:`add`), reachable by its sha and ``branches``."""
        self.revisions.setdefault(repo, []).append(Repo(folder, sha, branches))

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        self._stopping.set()  # a dripping answer ends now
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            assert not self._thread.is_alive()

    def record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def data_requests(self) -> list[Served]:
        return [s for s in self.log if s.status in (200, 206) and s.method == "GET" and not s.path.startswith("/api/")]

    def bytes_served(self, suffix: str = "") -> int:
        return sum(s.nbytes for s in self.data_requests() if s.path.endswith(suffix))


@contextlib.contextmanager
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started :class:`FakeHub` that huggingface_hub and ckptdiff talk to: ``HF_ENDPOINT`` and the constants
    huggingface_hub read at import point at it, its cache and home lie in ``tmp_path``, offline mode is off, and the
    working directory is an empty ``tmp_path/cwd`` (no local folder named like a repo's org). A host name other
    than the loopback's cannot be looked up meanwhile: a request that missed the fake fails instead of going out."""
    from huggingface_hub import constants

    fake = FakeHub()
    endpoint = fake.start()
    monkeypatch.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    # huggingface_hub's own requests: the endpoint, and the file URL built from it, both read at import
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: a test that imported it offline must not leak here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    try:
        yield fake
    finally:
        fake.stop()


def _loopback_only(lookup: Callable[..., Any]) -> Callable[..., Any]:
    """``socket.getaddrinfo`` for 127.0.0.1 and localhost only."""

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", b"localhost"):
            raise OSError(f"tests do not touch the network (a request for {host!r})")
        return lookup(host, *args, **kwargs)

    return guarded


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_ROUTES = (  # kind of answer, path, the handler's method (called with the path's groups and ``body``)
    ("info", re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?$"), "_api"),
    ("file", re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$"), "_file"),
    ("file", re.compile(r"^/cdn/([^/]+/[^/]+)/([^/]+)/(.+)$"), "_cdn"),
)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    kind = ""  # the kind of answer being sent ("info", "file"): which misbehaviour applies
    timeout = 10  # per connection: a client that stalls cannot hold a thread longer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        for kind, pattern, answer in _ROUTES:
            m = pattern.match(path)
            if m is not None:
                self.kind = kind
                if not self._misbehave(body):
                    getattr(self, answer)(*m.groups(), body)
                return
        self._send(404, b"no such endpoint", body, {"X-Error-Code": "EntryNotFound"})

    def _misbehave(self, body: bool) -> bool:
        """Answer as ``status``, ``loop`` or ``garble`` ask for this kind of request; False if they do not."""
        fake, kind = self.fake, self.kind
        if kind in fake.status and self.command == "GET":
            self._send(fake.status[kind], b"server error", body, {})
        elif kind in fake.loop:
            self._send(302, b"", body, {"Location": self.path})
        elif fake.garble.get(kind) == "junk":
            self.fake.record(Served(self.command, self.path, None, 0, 0))
            self.wfile.write(b"\x00\xff this is no HTTP answer\r\n\r\n")
            self.close_connection = True
        elif fake.garble.get(kind) == "gzip":
            self._send(200, b"\x1f\x8b not gzip at all", body, {"Content-Encoding": "gzip"})
        else:
            return False
        return True

    def _repo(self, repo_id: str, rev: str, body: bool) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._send(404, b"Repository not found", body, {"X-Error-Code": "RepoNotFound"})
            return None
        for candidate in (repo, *self.fake.revisions.get(repo_id, [])):
            if rev == candidate.sha or rev in candidate.branches:
                return candidate
        self._send(404, b"Revision not found", body, {"X-Error-Code": "RevisionNotFound"})
        return None

    def _info(self, repo_id: str, repo: Repo) -> Any:
        """The model-info document, as rewritten by ``FakeHub.info``."""
        siblings = [{"rfilename": name, "size": p.stat().st_size} for name, p in repo.files().items()]
        doc = {"id": repo_id, "sha": repo.sha, "siblings": siblings, "gated": "auto" if repo.gated else False}
        info = self.fake.info
        return info if isinstance(info, bytes) else doc if info is None else info(doc)

    def _api(self, repo_id: str, rev: str | None, body: bool) -> None:
        repo = self._repo(repo_id, rev or "main", body)
        if repo is None:
            return
        doc = self._info(repo_id, repo)
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self._send(200, payload, body, {"Content-Type": "application/json"})

    def _cdn(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        """A file's bytes where the Hub's ``redirect`` sent the request."""
        self._file(repo_id, rev, name, body, cdn=True)

    def _file(self, repo_id: str, rev: str, name: str, body: bool, cdn: bool = False) -> None:
        """The file's bytes (a range of them with ``Range``), or a redirect to the CDN; ``faults`` apply to GETs."""
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        if repo.gated:
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted."}
            self._send(401, b"gated", body, headers)
            return
        path = repo.files().get(name)
        if path is None:
            self._send(404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
            return
        if self.fake.redirect and not cdn:
            self._send(302, b"", body, {"Location": f"/cdn/{repo_id}/{repo.sha}/{name}"})
            return
        size = path.stat().st_size
        headers = {"ETag": f'"{repo.sha}-{name}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        status, first, last = 200, 0, size - 1
        m = _RANGE.match(self.headers.get("Range") or "")
        if m is not None and not self.fake.ignore_range:
            status, first = 206, int(m.group(1))
            last = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if first >= size:
                self._send(416, b"", body, {**headers, "Content-Range": f"bytes */{size}"})
                return
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        with self.fake._lock:
            fault = self.fake.faults.pop(0) if self.fake.faults and body else None
        if fault == "503":
            self._send(503, b"busy", body, {"Retry-After": "0"})
            return
        with path.open("rb") as f:
            f.seek(first)
            self._send(status, f.read(last + 1 - first), body, headers, fault=fault)

    def _send(self, status: int, payload: bytes, body: bool, headers: dict[str, str], fault: str | None = None) -> None:
        """Answer, promising the whole payload; a ``"cut"`` fault sends half of it and hangs up, ``"stall"`` sends
        none of it and waits for the server to stop."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        sent = {"cut": payload[: len(payload) // 2], "stall": b""}.get(fault or "", payload)
        # Logged before the body goes out, so that a client that has its bytes finds them in the log.
        self.fake.record(Served(self.command, self.path, self.headers.get("Range"), status, len(sent) * body))
        self.end_headers()
        if body:
            with contextlib.suppress(OSError):  # the client hung up (a refused answer)
                self._write(sent)
        if fault == "stall":
            self.wfile.flush()
            if self.fake.on_stall is not None:
                self.fake.on_stall()
            self.fake._stopping.wait()
        if fault in ("cut", "stall"):
            self.close_connection = True

    def _write(self, payload: bytes) -> None:
        """The body, at once or dripped a byte at a time (until the server stops)."""
        pause = self.fake.drip.get(self.kind)
        if not pause:
            self.wfile.write(payload)
            return
        for i in range(len(payload)):
            self.wfile.write(payload[i : i + 1])
            self.wfile.flush()
            if self.fake._stopping.wait(pause):
                return
