"""Hub ids read by byte range (CKPTDIFF_HUB_STREAM=1), against a fake Hub served on 127.0.0.1 by the test.

Nothing here touches the network: huggingface_hub's endpoint (the environment variable and the constant it read
at import) points at :class:`hub_server.FakeHub`, and its cache and home at ``tmp_path``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from factory import EMBED, HEAD, bump_ulps, hub_metadata, llama_like, save_sharded, save_single, save_tied_hf
from hub_server import FakeHub, serve
from typer.testing import CliRunner

from ckptdiff.analyses.sparsity import sparsity
from ckptdiff.analyses.spectral import spectral
from ckptdiff.cli import app
from ckptdiff.errors import InputError
from ckptdiff.io.formats.headers_only import open_headers
from ckptdiff.io.formats.safetensors import SafetensorsSource
from ckptdiff.io.hub import download as hub
from ckptdiff.io.hub import stream as hub_stream
from ckptdiff.io.hub.stream import HubStreamSource
from ckptdiff.io.resolve import open_stored
from ckptdiff.io.views.ties import HINT

runner = CliRunner()
SHA_BASE = "b" * 40
SHA_FT = "f" * 40


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with serve(tmp_path, monkeypatch) as fake:
        monkeypatch.setenv("CKPTDIFF_HUB_STREAM", "1")
        monkeypatch.setattr(hub_stream, "RETRY_WAITS", (0.05, 0.1))
        yield fake


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """A base and a fine-tune with 1-ULP changes, sharded at different boundaries."""
    base = llama_like(layers=3, seed=1)
    ft = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(2)
    for i, (k, v) in enumerate(base.items()):
        idx = torch.randperm(v.numel(), generator=g)[: (5 * i) % max(1, v.numel() // 2)]
        ft[k] = bump_ulps(v, idx, 1 + i % 3)
    save_sharded(base, tmp_path / "base", [4, 9, len(base) - 13])
    save_sharded(ft, tmp_path / "ft", [11, len(ft) - 11])
    return tmp_path / "base", tmp_path / "ft"


def _repo_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json")))


def _no_overlaps(fake: FakeHub) -> None:
    """Every byte of every file was sent at most once."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for s in fake.data_requests():
        assert s.status == 206 and s.range is not None
        a, b = (int(x) for x in s.range.removeprefix("bytes=").split("-"))
        seen.setdefault(s.path, []).append((a, b))
    for path, spans in seen.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start > end, f"{path}: bytes {start}-{end} fetched twice"


def _nothing_written(tmp_path: Path) -> None:
    for d in ("hf-cache", "hf-home"):
        assert not (tmp_path / d).exists() or not any((tmp_path / d).rglob("*")), d
    assert not any((tmp_path / "cwd").rglob("*"))


def _frame(result: object) -> object:
    return result.to_frame().reset_index(drop=True)  # type: ignore[attr-defined]


def test_streamed_pair_equals_local_and_fetches_each_byte_once(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.add("acme/ft", ft, SHA_FT, branches=("main", "v2"))
    local = sparsity(str(base), str(ft), progress=False, device="cpu")
    streamed = sparsity("acme/base", "acme/ft@v2", progress=False, device="cpu")
    assert _frame(streamed).equals(_frame(local))  # type: ignore[attr-defined]
    assert streamed.overall() == local.overall()
    # Every byte of both checkpoints crossed once: index, headers and tensor data, nothing twice.
    assert fake_hub.bytes_served() == _repo_bytes(base) + _repo_bytes(ft)
    _no_overlaps(fake_hub)
    paths = {s.path for s in fake_hub.data_requests()}
    assert all(f"/resolve/{SHA_BASE}/" in p or f"/resolve/{SHA_FT}/" in p for p in paths)  # the commit, pinned
    assert f"hub:acme/ft@{SHA_FT}" in json.dumps(streamed.header)
    _nothing_written(tmp_path)


def test_whole_tensor_reads_split_into_parallel_ranges(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.add("acme/ft", ft, SHA_FT)
    monkeypatch.setattr(hub_stream, "PART_BYTES", 256)  # a 16x50 bf16 embedding (1600 B) becomes 6 requests
    local = spectral(str(base), str(ft), k=4, progress=False, device="cpu")
    streamed = spectral("acme/base", "acme/ft", k=4, progress=False, device="cpu")
    assert _frame(streamed).equals(_frame(local))  # type: ignore[attr-defined]
    _no_overlaps(fake_hub)
    sizes = [_size(s.range) for s in fake_hub.data_requests() if s.range]
    assert sizes.count(256) >= 2 * 6  # each side's 1600-byte embedding came as 6 parallel requests


def _size(byte_range: str) -> int:
    a, b = byte_range.removeprefix("bytes=").split("-")
    return int(b) - int(a) + 1


def _header_bytes(folder: Path) -> int:
    """What reading a checkpoint's headers costs: the index, and each shard's 8-byte prefix and header."""
    total = sum(p.stat().st_size for p in folder.glob("*.index.json"))
    for p in folder.glob("*.safetensors"):
        total += 8 + int.from_bytes(p.read_bytes()[:8], "little")
    return total


def test_include_fetches_only_the_tensors_needed(fake_hub: FakeHub, tmp_path: Path) -> None:
    base, ft = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.add("acme/ft", ft, SHA_FT)
    res = sparsity("acme/base", "acme/ft", include=["*.mlp.*"], progress=False, device="cpu")
    wanted = set(res.to_frame()["tensor"])
    assert wanted and all(".mlp." in n for n in wanted)
    data = 0
    for folder in (base, ft):
        src = SafetensorsSource("x", sorted(folder.glob("*.safetensors")), "x")
        data += sum(src.infos[n].nbytes for n in wanted)
        src.close()
    assert fake_hub.bytes_served() == data + _header_bytes(base) + _header_bytes(ft)
    _no_overlaps(fake_hub)


@pytest.mark.parametrize("server", ["redirects to a CDN", "ignores ranges on small files"])
def test_redirects_and_small_whole_files(server: str, fake_hub: FakeHub, tmp_path: Path) -> None:
    base, _ = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.redirect = server.startswith("redirects")
    fake_hub.ignore_range = not fake_hub.redirect
    src = open_stored("acme/base")
    local = open_stored(str(base))
    for name in local.infos:
        assert torch.equal(src.read_full(name).view(torch.uint8), local.read_full(name).view(torch.uint8)), name
    if fake_hub.redirect:  # the Range header followed the redirect: each byte still sent once
        assert {s.status for s in fake_hub.log if "/resolve/" in s.path} == {302}
        assert fake_hub.bytes_served() == _repo_bytes(base)
        _no_overlaps(fake_hub)
    src.close()
    local.close()


def test_read_fills_the_callers_buffer(fake_hub: FakeHub, tmp_path: Path) -> None:
    sd = llama_like()
    save_single(sd, tmp_path / "one" / "model.safetensors")
    fake_hub.add("acme/one", tmp_path / "one", SHA_BASE)
    src = open_stored("acme/one")
    assert isinstance(src, HubStreamSource)
    name = "model.layers.1.mlp.up_proj.weight"
    out = np.zeros(4096, dtype=np.uint8)
    t = src.read(name, 7, 100, out=out)
    assert t.data_ptr() == out.ctypes.data  # viewed, not copied
    assert torch.equal(t.view(torch.int16), sd[name].reshape(-1)[7:107].view(torch.int16))
    assert fake_hub.data_requests()[-1].range == f"bytes={_offset(src, name) + 14}-{_offset(src, name) + 213}"
    assert src.read(name, 0, 0).numel() == 0  # an empty read asks for nothing
    src.close()


def _offset(src: HubStreamSource, name: str) -> int:
    return src._spans[name][1]


def test_header_only_over_the_stream_source_matches_local(fake_hub: FakeHub, tmp_path: Path) -> None:
    base, _ = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    streamed = open_stored("acme/base")
    local = open_stored(str(base))
    assert streamed.infos.keys() == local.infos.keys()
    assert all(streamed.infos[n].shape == local.infos[n].shape for n in local.infos)
    assert fake_hub.bytes_served() == _header_bytes(base)  # headers and index only
    streamed.close()
    local.close()


def test_a_streamed_config_json_declares_a_tie_like_a_local_one(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A fine-tune saved tied (no lm_head.weight, config.json says tie_word_embeddings): its config is fetched
    once, by byte range, and the rows are the local pair's."""
    sd = llama_like(seed=1)
    ft_sd = {k: bump_ulps(v, torch.arange(3)) if k == EMBED else v for k, v in sd.items()}
    base = save_single(sd, tmp_path / "base" / "model.safetensors").parent
    ft = save_tied_hf(ft_sd, tmp_path / "ft", {"tie_word_embeddings": True})
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.add("acme/ft", ft, SHA_FT)
    local = sparsity(str(base), str(ft), progress=False, device="cpu")
    streamed = sparsity("acme/base", "acme/ft", progress=False, device="cpu")
    assert _frame(streamed).equals(_frame(local))  # type: ignore[attr-defined]
    rows = streamed.to_frame().set_index("tensor")
    assert rows.loc[HEAD, "status"] == "tie_changed" and rows.loc[EMBED, "changed"] == 3
    assert streamed.header["tied"] == f"ft: {HEAD} -> {EMBED} (config.json tie_word_embeddings)"
    assert [s.path for s in fake_hub.data_requests() if s.path.endswith("/config.json")] == [
        f"/acme/ft/resolve/{SHA_FT}/config.json"
    ]
    _nothing_written(tmp_path)


def test_header_only_hub_ids_download_the_config_json_a_tie_needs(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CKPTDIFF_HUB_STREAM")  # header-only: huggingface_hub's metadata call (mocked), no stream
    sd = llama_like(seed=1)
    untied = {k: v for k, v in sd.items() if k != HEAD}
    metas = {"acme/base": hub_metadata(sd), "acme/tied": hub_metadata(untied), "acme/bare": hub_metadata(untied)}
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda repo, **kw: metas[repo])
    fake_hub.add("acme/base", save_single(sd, tmp_path / "base" / "model.safetensors").parent, SHA_BASE)
    fake_hub.add("acme/tied", save_tied_hf(sd, tmp_path / "tied", {"tie_word_embeddings": True}), SHA_FT)
    fake_hub.add("acme/bare", save_tied_hf(sd, tmp_path / "bare", None), "c" * 40)
    res = runner.invoke(app, ["check", "acme/base", "acme/tied", "--header-only", "--same-keys", "-q", "-f", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["header"]["tied"] == f"ft: {HEAD} -> {EMBED} (config.json tie_word_embeddings)"
    configs = [s.path for s in fake_hub.data_requests() if s.path.endswith("/config.json")]
    assert configs == [f"/acme/tied/resolve/{SHA_FT}/config.json"]  # once; the base has its lm_head: not read
    res = runner.invoke(app, ["check", "acme/base", "acme/bare", "--header-only", "--same-keys", "-q", "-f", "json"])
    assert res.exit_code == 1, res.output  # no config.json in the repo: lm_head.weight is missing, with the hint
    assert json.loads(res.stdout)["rules"][0]["offenders"][0]["detail"] == f"only in base; {HINT}"
    _nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------
# errors: one line each, exit 2, fast


def test_hub_unreachable_is_one_line_exit_2_fast(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.add("acme/ft", ft, SHA_FT)
    fake_hub.stop()  # nothing listens on the port any more
    for stream in ("1", "0"):  # streamed, and the download path
        monkeypatch.setenv("CKPTDIFF_HUB_STREAM", stream)
        t0 = time.monotonic()
        res = runner.invoke(app, ["sparsity", "acme/base", "acme/ft"])
        assert time.monotonic() - t0 < 5
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach the Hub" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0], lines
    _nothing_written(tmp_path)


def test_connection_lost_mid_run_is_one_line_after_bounded_retries(fake_hub: FakeHub, tmp_path: Path) -> None:
    base, _ = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    src = open_stored("acme/base")
    fake_hub.stop()
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"cannot reach the Hub.*3 tries.*HF_HUB_OFFLINE=1") as info:
        src.read_full("model.embed_tokens.weight")
    assert time.monotonic() - t0 < 5
    assert "\n" not in str(info.value)
    src.close()


def test_transient_failures_are_retried_and_resumed(fake_hub: FakeHub, tmp_path: Path) -> None:
    base, _ = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    src = open_stored("acme/base")
    name = "model.embed_tokens.weight"
    fake_hub.faults = ["503", "cut"]  # busy, then half the bytes and a hang-up: the third request finishes it
    got = src.read_full(name)
    assert torch.equal(got.view(torch.int16), open_stored(str(base)).read_full(name).view(torch.int16))
    last = fake_hub.log[-3:]
    assert [s.status for s in last] == [503, 206, 206]
    half = src.infos[name].nbytes // 2
    assert last[2].range == f"bytes={_offset(src, name) + half}-{_offset(src, name) + 2 * half - 1}"  # resumed
    assert fake_hub.bytes_served() == _header_bytes(base) + src.infos[name].nbytes  # still each byte once
    src.close()


@pytest.mark.parametrize(
    ("spec", "setup", "message"),
    [
        ("acme/nothing", None, "was not found"),
        ("acme/base@no-such-branch", None, "revision 'no-such-branch'"),
        ("acme/gated", "gated", "is gated"),
        ("acme/pickles", "pickles", "cannot be read by byte range"),
        ("acme/base", "no_ranges", "HTTP 200 instead of 206"),
        ("acme/base", "truncated", "truncated"),
        ("acme/base", "bad_index", "not a file of the repo"),
    ],
)
def test_hub_errors_are_one_line(
    spec: str, setup: str | None, message: str, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    if setup == "gated":
        fake_hub.add("acme/gated", base, SHA_FT, gated=True)
    elif setup == "pickles":
        (tmp_path / "pk").mkdir()
        torch.save(llama_like(), tmp_path / "pk" / "pytorch_model.bin")
        fake_hub.add("acme/pickles", tmp_path / "pk", SHA_FT)
    elif setup == "no_ranges":
        fake_hub.ignore_range = True
        monkeypatch.setattr(hub_stream, "WHOLE_FILE_MAX", 1000)  # the test's shards stand for large ones
    elif setup == "truncated":
        shard = base / "model-00003-of-00003.safetensors"
        shard.write_bytes(shard.read_bytes()[:-10])
    elif setup == "bad_index":
        index = base / "model.safetensors.index.json"
        doc = json.loads(index.read_text())
        doc["weight_map"]["lm_head.weight"] = "../other/model.safetensors"
        index.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=message) as info:
        open_stored(spec).close()
    assert "\n" not in str(info.value)


def test_corrupt_header_gets_the_local_files_reason(fake_hub: FakeHub, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    f = save_single(llama_like(), bad / "model.safetensors")
    raw = f.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + hlen].replace(b'"BF16"', b'"XX16"', 1)
    f.write_bytes(raw[:8] + header + raw[8 + hlen :])
    fake_hub.add("acme/bad", bad, SHA_BASE)
    with pytest.raises(InputError) as local:
        open_stored(str(f))
    with pytest.raises(InputError) as streamed:
        open_stored("acme/bad")
    reason = str(local.value).split(str(f), 1)[1]
    assert str(streamed.value).endswith(reason)


# ---------------------------------------------------------------------------------------------
# a local path with a typo is not a Hub id; offline header-only reads the cache


@pytest.mark.parametrize("spec", ["runs/ckpt-20O", "acme/model.safetensors", "runs/ckpt@100"])
def test_local_path_typo_is_no_such_file_at_once(spec: str, fake_hub: FakeHub, tmp_path: Path) -> None:
    (Path.cwd() / "runs" / "ckpt-100").mkdir(parents=True)
    save_single(llama_like(), Path.cwd() / "runs" / "ckpt-100" / "model.safetensors")
    for stream in ("0", "1"):
        t0 = time.monotonic()
        res = runner.invoke(app, ["sparsity", "runs/ckpt-100", spec], env={"CKPTDIFF_HUB_STREAM": stream})
        assert time.monotonic() - t0 < 5
        assert res.exit_code == 2, res.output
        assert res.stderr.strip().splitlines() == [res.stderr.strip()]
        assert "no such file or directory" in res.stderr
    with pytest.raises(InputError, match="no such file or directory"):
        open_headers(spec)
    assert fake_hub.log == []  # never asked the Hub


def test_path_like_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub.path_like("runs/ckpt-20O") == "a folder named runs exists here"
    assert hub.path_like("acme/x.bin") == "it ends in .bin"
    assert hub.path_like("Qwen/Qwen2.5-7B") is None
    assert hub.path_like("acme/model@refs/pr/1") is None


def _cache(root: Path, repo: str, sd: dict[str, torch.Tensor]) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    save_single(sd, folder / "snapshots" / SHA_BASE / "model.safetensors")
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SHA_BASE)


def test_header_only_offline_reads_the_cached_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sd = llama_like()
    _cache(tmp_path / "cache", "acme/tiny", sd)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = open_headers("acme/tiny")
    assert set(src.infos) == set(sd) and SHA_BASE in src.resolved and "headers only" in src.resolved
    res = runner.invoke(app, ["check", "acme/tiny", "acme/tiny", "--header-only", "--same-structure"])
    assert res.exit_code == 0, res.output
    with pytest.raises(InputError, match="not in the local cache"):
        open_headers("acme/never-downloaded")
    # Offline, a streamed Hub id reads the cache too: the weights are on disk already.
    monkeypatch.setenv("CKPTDIFF_HUB_STREAM", "1")
    assert isinstance(open_stored("acme/tiny"), SafetensorsSource)


def test_the_hub_stream_flag_streams_from_the_command_line(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = _pair(tmp_path)
    fake_hub.add("acme/base", base, SHA_BASE)
    fake_hub.add("acme/ft", ft, SHA_FT)
    monkeypatch.delenv("CKPTDIFF_HUB_STREAM")  # only the flag asks for streaming here
    res = runner.invoke(app, ["--hub-stream", "sparsity", "acme/base", "acme/ft", "-q", "-f", "json"])
    assert res.exit_code == 0, res.output
    assert "streamed by byte range" in json.loads(res.stdout)["header"]["base"]
    assert fake_hub.bytes_served() == _repo_bytes(base) + _repo_bytes(ft)
    _nothing_written(tmp_path)
