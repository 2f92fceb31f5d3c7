"""A hostile Hub: whatever the server at HF_ENDPOINT answers, a run ends soon with one ``ckptdiff: error:`` line
that names the repo and the file (exit 2; Ctrl-C: 130), no traceback, no output file, for a plain download and
for ``--hub-stream`` alike.

The Hub is :class:`hub_server.FakeHub` on 127.0.0.1, told to misbehave: answers that are not what the Hub's API
promises (not JSON, the wrong shapes, sizes that are not byte counts, names that climb out of the repo), redirect
loops, bytes dripped one at a time, stalls, garbled answers, server errors, a download cut halfway, and Ctrl-C
while a read stalls. Every case runs under an alarm, so a regression that hangs fails instead of blocking the
suite; the timeouts and the rate a transfer must keep are made small here, so each case takes a second or two.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from factory import llama_like, save_sharded, save_single
from hostile import SECONDS, deadline, runner
from hub_server import FakeHub, serve

from ckptdiff.cli import app
from ckptdiff.io.hub import download as hub
from ckptdiff.io.hub import stream as hub_stream

MODES = {"download": "0", "stream": "1"}  # CKPTDIFF_HUB_STREAM
BASE, FT = "acme/base", "acme/ft"  # a sharded repo (with an index) and a single-file one
SHARD = "model-00001-of-00002.safetensors"
TIMEOUT = 1.0  # HF_HUB_DOWNLOAD_TIMEOUT and HF_HUB_ETAG_TIMEOUT for the test: how long one read may wait
DRIP = 0.25  # seconds between the bytes of a dripping answer: each read gets one well within TIMEOUT
STALL = 60.0  # a drip this slow is a stall: the first byte, then nothing


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Two repos on a fake Hub: a base sharded in two files with an index, a fine-tune in one file. A read waits
    TIMEOUT at most, and a transfer must average 1 MiB/s (a listing is given 1 s more)."""
    from huggingface_hub import constants

    with serve(tmp_path, monkeypatch) as fake:
        monkeypatch.setattr(hub_stream, "RETRY_WAITS", (0.05, 0.1))
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", TIMEOUT)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", TIMEOUT)
        monkeypatch.setattr(hub, "MIN_RATE", 1 << 20)
        sd = llama_like(layers=2, seed=1)
        save_sharded(sd, tmp_path / "base", [5, len(sd) - 5])
        save_single(sd, tmp_path / "ft" / "model.safetensors")
        fake.add(BASE, tmp_path / "base", "b" * 40)
        fake.add(FT, tmp_path / "ft", "f" * 40)
        yield fake


class _Records(logging.Handler):
    """A logging handler that keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def hub_log() -> Iterator[list[logging.LogRecord]]:
    """What huggingface_hub logs (past its logger's level) during the test: it would print it on stderr."""
    handler = _Records()
    logger = logging.getLogger("huggingface_hub")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _run(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repos: tuple[str, str] = (BASE, FT)
) -> tuple[int, str, float]:
    """``ckptdiff sparsity acme/base acme/ft`` with CSV and JSON outputs; exit code, stderr, seconds taken."""
    monkeypatch.setenv("CKPTDIFF_HUB_STREAM", MODES[mode])
    outputs = ["--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json")]
    args = ["sparsity", *repos, *outputs, "-q"]
    start = time.monotonic()
    with deadline(SECONDS):
        res = runner.invoke(app, args)
    return res.exit_code, res.stderr, time.monotonic() - start


def _refused(
    mode: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: list[str],
    expect: str,
    repos: tuple[str, str] = (BASE, FT),
    within: float = SECONDS,
) -> str:
    """Run; assert exit 2 and one ``ckptdiff: error:`` line naming each of ``names`` and saying ``expect``, no
    traceback, no output file, in less than ``within`` seconds."""
    code, stderr, took = _run(mode, tmp_path, monkeypatch, repos)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error: "), stderr
    assert "internal error" not in lines[0] and "HF_HUB_OFFLINE is set" not in lines[0], lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert expect in lines[0], (expect, lines[0])
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.json").exists()
    assert took < within, took
    return lines[0]


# ---------------------------------------------------------------------------------------------
# item 13: malformed answers are checked as strictly as a local file


def _sizes(change: Callable[[str, int], Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A model-info rewrite that gives each file the size ``change(name, size)``."""

    def rewrite(doc: dict[str, Any]) -> dict[str, Any]:
        siblings = [{**s, "size": change(s["rfilename"], s["size"])} for s in doc["siblings"]]
        return {**doc, "siblings": siblings}

    return rewrite


def _huge_size(doc: dict[str, Any]) -> bytes:
    """The model-info document with a 5,001-digit size for the first shard (too long for json.loads to parse)."""
    marked = _sizes(lambda name, size: "HUGE" if name == SHARD else size)(doc)
    return json.dumps(marked).replace('"HUGE"', "9" * 5001).encode()


def _climbing(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "siblings": [*doc["siblings"], {"rfilename": "../../../../evil.safetensors", "size": 10}]}


LISTING = "file listing of Hub repo acme/base"
MALFORMED: dict[str, tuple[Any, list[str], str]] = {  # FakeHub.info, names in the line, what it says
    "not JSON": (b"<html>busy</html>", [LISTING], "malformed document (JSONDecodeError"),
    "a list": (lambda doc: [doc], [LISTING], "malformed document (TypeError"),
    "a size as text": (_sizes(lambda n, s: str(s)), [LISTING, SHARD], "is not a byte count"),
    "a negative size": (_sizes(lambda n, s: -s), [LISTING, SHARD], "is not a byte count"),
    "a 5,001-digit size": (_huge_size, [LISTING], "malformed document (ValueError"),
    "a name out of the repo": (_climbing, [LISTING, "../../../../evil.safetensors"], "not a relative path"),
    "no commit": (lambda doc: {**doc, "sha": None}, [LISTING], "not a commit id"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_listing_is_one_line_naming_the_repo(
    case: str, mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.info, names, expect = MALFORMED[case]
    _refused(mode, tmp_path, monkeypatch, names, expect)
    assert "evil" not in " ".join(s.path for s in fake_hub.log)  # a name out of the repo is never asked for


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["info", "file"])
def test_a_redirect_loop_is_one_line_naming_the_file(
    kind: str, mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.loop.add(kind)
    names = [LISTING] if kind == "info" else ["Hub repo acme/base", ".json"]  # the index or the config: smallest
    _refused(mode, tmp_path, monkeypatch, names, "in a loop")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [["model-00001-of-00002.safetensors"], {"file": SHARD}, 7])
def test_an_index_mapping_a_tensor_to_no_file_name_is_one_line(
    value: object, mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "base" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.embed_tokens.weight"] = value
    index.write_text(json.dumps(doc))
    _refused(mode, tmp_path, monkeypatch, ["model.safetensors.index.json", "acme"], "shard")


# ---------------------------------------------------------------------------------------------
# item 12: a server that drips bytes never trips a read's timeout; each transfer has a deadline


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", [BASE, FT], ids=["sharded", "single file"])
def test_a_dripping_file_is_given_up_at_its_deadline_naming_it(
    first: str, mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.drip["file"] = DRIP
    repos = (first, FT if first == BASE else BASE)
    names = [f"Hub repo {first}", "model.safetensors"]  # the index (sharded) or the one file, its first request
    _refused(mode, tmp_path, monkeypatch, names, "too slowly", repos, within=4 * TIMEOUT)


@pytest.mark.parametrize("mode", MODES)
def test_a_dripping_listing_is_given_up_at_itsdeadline(
    mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.drip["info"] = DRIP
    _refused(mode, tmp_path, monkeypatch, [LISTING], "too slowly", within=5 * TIMEOUT)


# ---------------------------------------------------------------------------------------------
# item 14: each failure says what happened, naming the repo and the file; Ctrl-C is exit 130, at once


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["stalled", "junk", "gzip"])
def test_a_stalled_or_garbled_listing_says_so_naming_the_repo(
    how: str, mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "stalled":
        fake_hub.drip["info"] = STALL
    else:
        fake_hub.garble["info"] = how  # bytes that are no HTTP answer; a body that claims gzip and is not
    expect = "did not answer" if how == "stalled" else "garbled answer"
    line = _refused(mode, tmp_path, monkeypatch, [LISTING], expect, within=4 * TIMEOUT)
    assert "cannot reach" not in line


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["info", "file"])
def test_a_server_error_says_so_naming_the_file(
    kind: str,
    mode: str,
    fake_hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hub_log: list[logging.LogRecord],
) -> None:
    fake_hub.status[kind] = 500
    names = [LISTING] if kind == "info" else ["Hub repo acme/base", ".json"]  # the listing, or the first file
    line = _refused(mode, tmp_path, monkeypatch, names, "with HTTP 500")
    assert "rerun later" in line and "local cache (" not in line
    assert hub_log == []


@pytest.mark.parametrize("mode", MODES)
def test_a_download_cut_halfway_is_resumed_quietly(
    mode: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_log: list[logging.LogRecord]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5 * TIMEOUT)  # huggingface_hub waits 1 s to resume
    fake_hub.faults = ["cut"]  # the first file GET: half its body, then the connection closes
    code, stderr, _ = _run(mode, tmp_path, monkeypatch)
    assert code == 0, stderr
    assert stderr.strip() == "" and hub_log == []  # huggingface_hub's own warnings were a dozen lines here
    assert (tmp_path / "out.csv").exists()


def _interrupt_on_stall(fake: FakeHub, normal: int) -> None:
    """The file GET after ``normal`` ones stalls (headers, then no body), and the stall sends this process a SIGINT
    (once): Ctrl-C while a read waits for bytes that do not come."""
    fired: list[bool] = []

    def interrupt() -> None:
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    fake.on_stall = interrupt
    fake.faults = [""] * normal + ["stall"]


STALLED_READS = {  # which read stalls: (mode, file GETs answered before it)
    "the index, read by the main thread": ("stream", 0),
    "a shard header, read by a worker of the source": ("stream", 1),
    "a tensor, read ahead by the prefetch thread": ("stream", 7),  # after the index and 6 header reads
    "a file being downloaded": ("download", 0),
}


@pytest.mark.parametrize("read", STALLED_READS)
def test_ctrl_c_during_a_stalled_read_exits_130_at_once(
    read: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    mode, normal = STALLED_READS[read]
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10 * TIMEOUT)  # waiting the stall out would show
    _interrupt_on_stall(fake_hub, normal)
    code, stderr, took = _run(mode, tmp_path, monkeypatch)
    assert code == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == "ckptdiff: error: interrupted; no output file was written", stderr
    # On a loaded machine the main thread may take longer than the watcher's grace to run the handler; the watcher
    # then acknowledges the signal first (runtime/signals.py), which is right, and is the only other line allowed.
    assert all(line.startswith("ckptdiff: interrupted: stopping when") for line in lines[:-1]), stderr
    assert len(lines) <= 2, stderr
    # Waiting the stall out takes 10 * TIMEOUT; half that bound leaves room for a loaded machine (measured: 3.5 s
    # with four busy loops on two cores) and still fails a read that was not cut short.
    assert took < 5 * TIMEOUT, took
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.json").exists()
