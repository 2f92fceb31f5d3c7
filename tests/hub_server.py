"""A fake Hugging Face Hub on 127.0.0.1 for tests: the few endpoints ckptdiff's Hub code calls, over local folders.

Endpoints (as huggingface_hub 2.x calls them):

- ``GET /api/models/{org}/{name}`` and ``GET /api/models/{org}/{name}/revision/{rev}`` (``HfApi.model_info``):
  ``{"id", "sha", "siblings": [{"rfilename", "size"}]}``; ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound``;
- ``GET`` / ``HEAD /{org}/{name}/resolve/{rev}/{file}``: the file, ``206`` with ``Content-Range`` for a
  ``Range: bytes=a-b`` request; ``X-Error-Code: GatedRepo`` (401) for a gated repo, ``EntryNotFound`` (404);
  with ``redirect`` set, a ``302`` to ``/cdn/{org}/{name}/{sha}/{file}`` instead, which serves the bytes (as the
  Hub redirects large files to its CDN).

Every request is logged with the bytes of body it was sent. HTTP/1.0 (one request per connection), a socket
timeout per connection, and :meth:`FakeHub.stop` shuts the loop down and closes the listening socket, so
nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


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
    log: list[Served] = field(default_factory=list)
    ignore_range: bool = False  # answer range requests with the whole file (200), as a broken proxy would
    redirect: bool = False  # send file requests on to /cdn/... with a 302
    faults: list[str] = field(default_factory=list)  # for the next range requests: "503", or "cut" (half a body)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: str, folder: Path, sha: str, **kw: Any) -> None:
        self.repos[repo] = Repo(folder, sha, **kw)

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


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    timeout = 10  # per connection: a client that stalls cannot hold a thread longer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        m = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?$", path)
        if m:
            self._api(m.group(1), m.group(2) or "main", body)
            return
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            self._file(m.group(1), m.group(2), m.group(3), body, cdn=False)
            return
        m = re.match(r"^/cdn/([^/]+/[^/]+)/([^/]+)/(.+)$", path)
        if m:
            self._file(m.group(1), m.group(2), m.group(3), body, cdn=True)
            return
        self._send(404, b"no such endpoint", body, {"X-Error-Code": "EntryNotFound"})

    def _repo(self, repo_id: str, rev: str, body: bool) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._send(404, b"Repository not found", body, {"X-Error-Code": "RepoNotFound"})
            return None
        if rev != repo.sha and rev not in repo.branches:
            self._send(404, b"Revision not found", body, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _api(self, repo_id: str, rev: str, body: bool) -> None:
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        siblings = [{"rfilename": name, "size": p.stat().st_size} for name, p in repo.files().items()]
        doc = {"id": repo_id, "sha": repo.sha, "siblings": siblings, "gated": "auto" if repo.gated else False}
        self._send(200, json.dumps(doc).encode(), body, {"Content-Type": "application/json"})

    def _file(self, repo_id: str, rev: str, name: str, body: bool, cdn: bool) -> None:
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
        common = {"ETag": f'"{repo.sha}-{name}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range")
        m = _RANGE.match(wanted or "")
        if m is None or self.fake.ignore_range:
            self._send(200, path.read_bytes(), body, common)
            return
        first = int(m.group(1))
        last = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if first >= size:
            self._send(416, b"", body, {**common, "Content-Range": f"bytes */{size}"})
            return
        with path.open("rb") as f:
            f.seek(first)
            part = f.read(last + 1 - first)
        with self.fake._lock:
            fault = self.fake.faults.pop(0) if self.fake.faults else None
        if fault == "503":
            self._send(503, b"busy", body, {"Retry-After": "0"})
            return
        headers = {**common, "Content-Range": f"bytes {first}-{last}/{size}"}
        self._send(206, part, body, headers, cut=fault == "cut")

    def _send(self, status: int, payload: bytes, body: bool, headers: dict[str, str], cut: bool = False) -> None:
        """Answer; with ``cut``, promise the whole payload but send half of it and hang up."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        sent = payload[: len(payload) // 2] if cut else payload
        # Logged before the body goes out, so that a client that has its bytes finds them in the log.
        self.fake.record(Served(self.command, self.path, self.headers.get("Range"), status, len(sent) * body))
        self.end_headers()
        if body:
            with contextlib.suppress(OSError):  # the client hung up (a refused answer)
                self.wfile.write(sent)
        if cut:
            self.close_connection = True
