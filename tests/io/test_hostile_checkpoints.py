"""Hostile checkpoint files and folders: what a checkpoint holds is exactly what its files say, or it is refused.

The contract for local checkpoints (safetensors, ``.bin``/``.pt`` pickles, their index JSON, the folder around
them): an index that names a tensor its shard lacks, a pickled state dict whose keys collide once they are
text, and a link that leads out of the checkpoint folder are each refused with exit 2 and one line that names
the file, the tensor or the link, and nothing is written. The header-level cases (malformed safetensors
headers, pickles that would run code, pipes and loops) live in ``test_hostile_inputs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hostile import assert_refused
from safetensors.torch import save_file

import ckptdiff

W = torch.arange(16, dtype=torch.float32)


def _bases(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    torch.save({"w": W, "x": W.clone()}, base / "pytorch_model.bin")
    return base


def _args(base: Path, ft: Path, tmp_path: Path) -> list[str]:
    return ["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json")]


def test_bin_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    shard = "pytorch_model-00001-of-00001.bin"
    torch.save({"w": W + 1}, ft / shard)  # "x" is not in it
    (ft / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": shard, "x": shard}}))
    assert_refused(_args(_bases(tmp_path), ft, tmp_path), tmp_path, ["'x'", shard], "does not hold it")


def test_bin_index_given_directly_is_checked_too(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    torch.save({"w": W + 1}, ft / "a.bin")
    index = ft / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.bin", "x": "a.bin"}}))
    assert_refused(_args(_bases(tmp_path), index, tmp_path), tmp_path, ["'x'", "a.bin"], "does not hold it")


def test_bin_index_naming_a_tied_name_is_complete(tmp_path: Path) -> None:
    """A tie in a .bin is one storage under two names; an index naming both is complete, not missing one."""
    emb = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for side in ("base", "ft"):
        d = tmp_path / side
        d.mkdir()
        e = emb if side == "base" else emb + 1
        torch.save({"model.embed_tokens.weight": e, "lm_head.weight": e}, d / "a.bin")
        wmap = {"model.embed_tokens.weight": "a.bin", "lm_head.weight": "a.bin"}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    overall = ckptdiff.sparsity(tmp_path / "base", tmp_path / "ft").overall()
    assert (overall["tensors"], overall["changed"]) == (1, 12)  # one tensor, every entry moved: by construction


def test_pickle_keys_that_collide_as_text_are_refused(tmp_path: Path) -> None:
    ft = tmp_path / "ft.pt"
    torch.save({1: W, "1": W + 1}, ft)
    assert_refused(_args(_bases(tmp_path), ft, tmp_path), tmp_path, ["ft.pt", "'1'"], "distinct string keys")


def _outside_target(tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"w": W, "x": W.clone()}, str(outside / "secret.safetensors"))
    return outside / "secret.safetensors"


def test_index_shard_linking_outside_the_folder_is_refused(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    target = _outside_target(tmp_path)
    (ft / "model-00001-of-00001.safetensors").symlink_to(target)
    (ft / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors", "x": "model-00001-of-00001.safetensors"}})
    )
    base = tmp_path / "base.safetensors"
    save_file({"w": W, "x": W.clone()}, str(base))
    line = assert_refused(_args(base, ft, tmp_path), tmp_path, ["model-00001-of-00001.safetensors"], "outside")
    assert str(target) in line


def test_folder_file_linking_outside_the_folder_is_refused(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors").symlink_to(_outside_target(tmp_path))
    base = tmp_path / "base.safetensors"
    save_file({"w": W, "x": W.clone()}, str(base))
    assert_refused(_args(base, ft, tmp_path), tmp_path, ["model.safetensors", "secret.safetensors"], "outside")


def test_shard_through_a_linked_subfolder_outside_is_refused(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    target = _outside_target(tmp_path)
    (ft / "sub").symlink_to(target.parent, target_is_directory=True)
    (ft / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "sub/secret.safetensors", "x": "sub/secret.safetensors"}})
    )
    base = tmp_path / "base.safetensors"
    save_file({"w": W, "x": W.clone()}, str(base))
    assert_refused(_args(base, ft, tmp_path), tmp_path, ["secret.safetensors"], "outside")


def test_links_inside_the_folder_and_into_the_hub_cache_blobs_are_followed(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot is links into ../../blobs: followed, as is a link within the folder."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file({"w": W + 1, "x": W.clone()}, str(repo / "blobs" / "f00d"))
    (snap / "model.safetensors").symlink_to("../../blobs/f00d")
    local = tmp_path / "local"
    local.mkdir()
    save_file({"w": W, "x": W.clone()}, str(local / "real.safetensors"))
    (local / "model.safetensors").symlink_to("real.safetensors")
    overall = ckptdiff.sparsity(local, snap).overall()
    assert overall["changed"] == 16  # every entry of w moved by 1, x unchanged: known by construction
