"""Checkpoint sources: every supported input, and every bad input gets a clear InputError."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from factory import llama_like, save_sharded, save_single
from hub_server import serve

from ckptdiff.errors import InputError
from ckptdiff.io import layout
from ckptdiff.io.formats.safetensors import SafetensorsSource
from ckptdiff.io.formats.torch_file import TorchFileSource
from ckptdiff.io.hub import download as hub
from ckptdiff.io.resolve import open_stored


def _same(src_tensors: dict[str, torch.Tensor], source: object) -> None:
    assert set(source.infos) == set(src_tensors)  # type: ignore[attr-defined]
    for k, v in src_tensors.items():
        got = source.read_full(k)  # type: ignore[attr-defined]
        assert got.dtype == v.dtype and torch.equal(got.view(torch.int16), v.view(torch.int16)), k


def test_single_file_and_directory(tmp_path: Path) -> None:
    sd = llama_like()
    f = save_single(sd, tmp_path / "m" / "model.safetensors")
    _same(sd, open_stored(str(f)))
    _same(sd, open_stored(str(f.parent)))


def test_sharded_directory_and_partial_reads(tmp_path: Path) -> None:
    sd = llama_like(layers=3)
    save_sharded(sd, tmp_path / "s", [5, 7, len(sd) - 12])
    src = open_stored(str(tmp_path / "s"))
    assert isinstance(src, SafetensorsSource)
    _same(sd, src)
    name = "model.layers.1.mlp.up_proj.weight"
    flat = sd[name].reshape(-1)
    assert torch.equal(src.read(name, 7, 100).view(torch.int16), flat[7:107].view(torch.int16))
    # The index file itself is also accepted.
    _same(sd, open_stored(str(tmp_path / "s" / "model.safetensors.index.json")))


def test_bin_and_nested_state_dict(tmp_path: Path) -> None:
    sd = llama_like()
    torch.save(sd, tmp_path / "plain.bin")
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "nested.pt")
    for name in ("plain.bin", "nested.pt"):
        src = open_stored(str(tmp_path / name))
        assert isinstance(src, TorchFileSource)
        _same(sd, src)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this would run code",))


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "x": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(InputError, match="not a weights-only"):
        open_stored(str(tmp_path / "evil.bin"))


def test_missing_path() -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_stored("/no/such/checkpoint.safetensors")


def test_directory_without_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(InputError, match="holds no checkpoint"):
        open_stored(str(tmp_path))


def test_truncated_safetensors(tmp_path: Path) -> None:
    f = save_single(llama_like(), tmp_path / "model.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated"):
        open_stored(str(f))
    f.write_bytes(data[:5])
    with pytest.raises(InputError, match="truncated"):
        open_stored(str(f))


def test_corrupt_header(tmp_path: Path) -> None:
    f = tmp_path / "bad.safetensors"
    body = b"{not json"
    f.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 16)
    with pytest.raises(InputError, match="corrupt header"):
        open_stored(str(f))
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="corrupt or truncated"):
        open_stored(str(f))


def test_index_names_missing_shard(tmp_path: Path) -> None:
    sd = llama_like()
    save_sharded(sd, tmp_path / "s", [4, len(sd) - 4])
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="missing"):
        open_stored(str(tmp_path / "s"))


def test_index_promises_tensor_shard_lacks(tmp_path: Path) -> None:
    sd = llama_like()
    save_sharded(sd, tmp_path / "s", [4, len(sd) - 4])
    idx = tmp_path / "s" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(InputError, match="ghost"):
        open_stored(str(tmp_path / "s"))


def test_unknown_extension(tmp_path: Path) -> None:
    f = tmp_path / "weights.npz"
    f.write_bytes(b"123")
    with pytest.raises(InputError, match="not a checkpoint"):
        open_stored(str(f))


# ---------------------------------------------------------------------------------------------
# Hub: a cache laid out in tmp_path, offline; and the online path mocked at huggingface_hub's boundary.

SHA = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo: str, sd: dict[str, torch.Tensor]) -> Path:
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / SHA
    save_single(sd, snap / "model.safetensors")
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SHA)
    return snap


def test_hub_offline_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = llama_like()
    _hub_cache(tmp_path / "cache", "acme/tiny", sd)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = open_stored("acme/tiny", progress=False)
    assert SHA in src.resolved
    _same(sd, src)
    src_rev = open_stored(f"acme/tiny@{SHA}", progress=False)
    _same(sd, src_rev)


def test_hub_offline_unknown_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local cache"):
        open_stored("acme/never-downloaded", progress=False)


def test_hub_home_sets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / "hub")


def test_hub_online_fetches_only_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub as hf

    sd = llama_like()
    snap = tmp_path / "snap" / SHA
    save_sharded(sd, snap, [3, len(sd) - 3])
    calls: dict[str, object] = {}

    def fake_info(self: object, repo_id: str, revision: str | None = None, **_: object) -> SimpleNamespace:
        calls["list"] = (repo_id, revision)
        names = [
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "pytorch_model.bin",
            "consolidated.safetensors",
        ]
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=n) for n in names])

    fetched: list[tuple[str, str, object]] = []

    def fake_download(repo_id: str, filename: str, **kw: object) -> str:
        fetched.append((repo_id, filename, kw["revision"]))
        return str(snap / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf.HfApi, "model_info", fake_info)
    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    src = open_stored("acme/big@v1.0", progress=False)
    _same(sd, src)
    assert calls["list"] == ("acme/big", "v1.0")
    names = {name for _, name, _ in fetched}
    assert "model.safetensors.index.json" in names
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert "consolidated.safetensors" not in names
    assert "config.json" in names  # how FP8 weights are block-scaled, read by ckptdiff.io.views.fp8
    # The first file at the revision asked for (the cache records the branch's commit), the others at that commit.
    assert [rev for _, _, rev in fetched] == ["v1.0"] + [SHA] * (len(fetched) - 1)
    assert {repo for repo, _, _ in fetched} == {"acme/big"}


def test_hub_files_after_the_first_download_in_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first file pins the commit, the others are fetched several at a time: here each of the two
    shards waits at a barrier for the other, which only a parallel download passes (no timing involved)."""
    import threading

    import huggingface_hub as hf

    sd = llama_like()
    snap = tmp_path / "snap" / SHA
    save_sharded(sd, snap, [3, len(sd) - 3])
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names = ["model.safetensors.index.json", *shards]

    def fake_info(self: object, repo_id: str, revision: str | None = None, **_: object) -> SimpleNamespace:
        sizes = {n: (snap / n).stat().st_size for n in names}  # the index is the smallest: fetched first, alone
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=n, size=sizes[n]) for n in names])

    both = threading.Barrier(2, timeout=10)

    def fake_download(repo_id: str, filename: str, **kw: object) -> str:
        if filename in shards:
            both.wait()  # BrokenBarrierError after 10 s if the other shard is not being fetched at the same time
        return str(snap / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf.HfApi, "model_info", fake_info)
    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    _same(sd, open_stored("acme/big", progress=False))


def test_a_hub_download_is_found_offline_afterwards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are downloaded one by one (the first at the branch asked for): the cache still records each branch's
    commit, so HF_HUB_OFFLINE finds the snapshot by the repo id, a branch or the commit."""
    from huggingface_hub import constants

    sd = llama_like()
    save_sharded(sd, tmp_path / "repo", [3, len(sd) - 3])
    with serve(tmp_path, monkeypatch) as fake:
        fake.add("acme/big", tmp_path / "repo", SHA, branches=("main", "v1.0"))
        for spec in ("acme/big", "acme/big@v1.0"):
            open_stored(spec, progress=False).close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for spec in ("acme/big", "acme/big@v1.0", f"acme/big@{SHA}"):
        src = open_stored(spec, progress=False)
        _same(sd, src)
        assert SHA in src.resolved
        src.close()


def test_hub_bin_fallback_patterns() -> None:
    assert hub._choose_patterns(["pytorch_model.bin", "config.json"]) == layout.HUB_PICKLE_PATTERNS
    assert hub._choose_patterns(["model.safetensors", "pytorch_model.bin"]) == ["model.safetensors"]


def test_hub_not_found_is_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub as hf
    from huggingface_hub import errors

    def missing(self: object, repo_id: str, **_: object) -> list[str]:
        response = SimpleNamespace(headers={}, status_code=404, request=None)
        raise errors.RepositoryNotFoundError("404 Repository Not Found", response=response)  # type: ignore[arg-type]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf.HfApi, "model_info", missing)
    with pytest.raises(InputError, match="not found"):
        open_stored("acme/nothing", progress=False)
