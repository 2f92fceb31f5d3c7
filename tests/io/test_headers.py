"""Header-only checkpoints: local safetensors headers and mocked Hub metadata; no tensor data, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from factory import hub_metadata, llama_like, save_sharded, save_single
from huggingface_hub.errors import NotASafetensorsRepoError
from huggingface_hub.utils import SafetensorsRepoMetadata

from ckptdiff.errors import InputError
from ckptdiff.io.formats.headers_only import HeaderSource, open_headers
from ckptdiff.io.formats.safetensors import SafetensorsSource


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of tensor data fails the test."""

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("header-only mode read tensor data")

    monkeypatch.setattr(SafetensorsSource, "read", refuse)


def test_local_file_and_shards_match_the_state_dict(tmp_path: Path, no_reads: None) -> None:
    sd = llama_like(layers=2)
    single = open_headers(str(save_single(sd, tmp_path / "one.safetensors")))
    save_sharded(sd, tmp_path / "sharded", [5, len(sd) - 5])
    sharded = open_headers(str(tmp_path / "sharded"))
    for src in (single, sharded):
        assert isinstance(src, HeaderSource)
        assert set(src.infos) == set(sd)
        assert all(src.infos[k].shape == tuple(v.shape) and src.infos[k].dtype.torch == v.dtype for k, v in sd.items())
        assert src.parameter_count == sum(v.numel() for v in sd.values())
        assert "headers only" in src.resolved
        with pytest.raises(InputError, match="header-only"):
            src.read("model.norm.weight")


def test_pickles_are_refused(tmp_path: Path) -> None:
    sd = {"w": torch.zeros(2, 2)}
    torch.save(sd, tmp_path / "model.pt")
    with pytest.raises(InputError, match="header-only mode needs safetensors"):
        open_headers(str(tmp_path / "model.pt"))
    folder = tmp_path / "bin_only"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="header-only mode needs safetensors"):
        open_headers(str(folder))


def test_missing_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_headers(str(tmp_path / "nope.safetensors"))


def test_hub_id_uses_the_metadata_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder named like the repo
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sd = llama_like(layers=2)
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(repo_id: str, **kwargs: Any) -> SafetensorsRepoMetadata:
        calls.append((repo_id, kwargs))
        return hub_metadata(sd)

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake)
    src = open_headers("org/model@v1.2")
    assert calls == [("org/model", {"revision": "v1.2"})]
    assert set(src.infos) == set(sd)
    assert src.infos["model.embed_tokens.weight"].shape == (50, 16)
    assert src.infos["model.embed_tokens.weight"].dtype.name == "BF16"
    assert "hub:org/model@v1.2" in src.resolved
    open_headers("org/model")
    assert calls[-1] == ("org/model", {"revision": None})


def test_hub_errors_become_one_line_input_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def not_safetensors(repo_id: str, **kwargs: Any) -> None:
        raise NotASafetensorsRepoError("no safetensors here\nsecond line")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", not_safetensors)
    with pytest.raises(InputError, match="needs safetensors weights") as info:
        open_headers("org/model")
    assert "\n" not in str(info.value)

    def offline_network(repo_id: str, **kwargs: Any) -> None:
        raise ConnectionError("connection refused\ntraceback-ish detail")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", offline_network)
    with pytest.raises(InputError, match=r"could not fetch the safetensors headers.*connection refused") as info:
        open_headers("org/model")
    assert "\n" not in str(info.value)


def test_hub_offline_mode_does_not_call_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network call in offline mode")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", boom)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        open_headers("org/model")


def test_hub_unknown_dtype_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    meta = hub_metadata({"w": torch.zeros(2, dtype=torch.float32)}, shards=1)
    meta.files_metadata["model-00001-of-00001.safetensors"].tensors["w"].dtype = "U3"
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda repo_id, **kw: meta)
    with pytest.raises(InputError, match=r"'w'.*'U3'"):
        open_headers("org/model")
