"""`ckptdiff patch create|apply|verify|size` from the command line: exit codes, and every refusal (a wrong base, a
truncated or tampered patch, a reordered chain, an output that would replace something) writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from factory import bump_ulps, llama_like, save_single
from hostile import assert_refused, invoke
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptdiff.analyses.patch import COLUMNS

ROOT = Path(__file__).resolve().parents[2]
UP = "model.layers.1.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
HEAD = "lm_head.weight"


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("trio")
    base = llama_like(layers=2, d=16, ff=32, seed=4)
    ft = {k: v.clone() for k, v in base.items()}
    ft[UP] = bump_ulps(base[UP], torch.arange(0, base[UP].numel(), 5))
    ft[Q] = bump_ulps(base[Q], torch.arange(0, 3))
    wrong = {k: v.clone() for k, v in base.items()}
    wrong[UP] = bump_ulps(base[UP], torch.tensor([7]))  # same names and shapes, one entry off
    paths = {
        "base": save_single(base, tmp_path / "base.safetensors"),
        "ft": save_single(ft, tmp_path / "ft.safetensors"),
        "wrong": save_single(wrong, tmp_path / "wrong.safetensors"),
        "patch": tmp_path / "step.safetensors",
    }
    code, _, output, _ = invoke(
        ["patch", "create", str(paths["base"]), str(paths["ft"]), "-o", str(paths["patch"]), "-q"]
    )
    assert code == 0, output
    return paths


def test_create_apply_verify(trio: dict[str, Path], tmp_path: Path) -> None:
    code, _, output, _ = invoke(
        ["patch", "apply", str(trio["base"]), str(trio["patch"]), "-o", str(tmp_path / "rebuilt"), "-q"]
    )
    assert code == 0, output
    out = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    want = load_file(str(trio["ft"]))
    assert {n: _sha(t) for n, t in out.items()} == {n: _sha(t) for n, t in want.items()}
    code, _, output, _ = invoke(["patch", "verify", str(trio["base"]), str(trio["patch"]), str(trio["ft"]), "-q"])
    assert code == 0 and output.startswith("Same"), output
    code, _, output, _ = invoke(["patch", "verify", str(trio["base"]), str(trio["patch"]), str(trio["wrong"]), "-q"])
    assert code == 1 and "Differs" in output and Q in output, output  # the first in the fine-tune's order


def test_size_writes_its_columns(trio: dict[str, Path], tmp_path: Path) -> None:
    csv = tmp_path / "sizes.csv"
    code, _, output, _ = invoke(["patch", "size", str(trio["base"]), str(trio["ft"]), "--csv", str(csv), "-q", "-s"])
    assert code == 0, output
    assert "would move" in output
    header = csv.read_text().splitlines()[0].split(",")
    assert header == COLUMNS
    changed = {
        line.split(",")[0]: line.split(",")[COLUMNS.index("changed")] for line in csv.read_text().splitlines()[1:]
    }
    assert changed[UP] == str(len(range(0, 32 * 16, 5))) and changed[Q] == "3"


def _before(path: Path) -> bytes:
    return path.read_bytes()


def test_a_wrong_base_is_refused_and_the_earlier_output_stays(trio: dict[str, Path], tmp_path: Path) -> None:
    earlier = tmp_path / "out.json"  # an earlier output at the destination (assert_refused's own name is kept free)
    dest = tmp_path / "rebuilt.safetensors"
    dest.write_bytes(b"an earlier rebuilt checkpoint")
    args = ["patch", "apply", str(trio["wrong"]), str(trio["patch"]), "-o", str(dest)]
    assert_refused(args, tmp_path, [UP, "wrong.safetensors"], "is not the base of patch")
    assert dest.read_bytes() == b"an earlier rebuilt checkpoint"
    assert not earlier.exists() and not list(tmp_path.glob(".rebuilt*"))
    folder = tmp_path / "folder"
    assert_refused(
        ["patch", "apply", str(trio["wrong"]), str(trio["patch"]), "-o", str(folder)], tmp_path, [UP], "is not the base"
    )
    assert not folder.exists() and not list(tmp_path.glob(".folder*"))


def _data_offset(path: Path, key: str) -> int:
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    return 8 + hlen + header[key]["data_offsets"][0]


def test_a_tampered_or_truncated_patch_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.safetensors"
    raw = bytearray(trio["patch"].read_bytes())
    raw[_data_offset(trio["patch"], f"{Q}:values")] ^= 0x01
    tampered.write_bytes(bytes(raw))
    out = tmp_path / "rebuilt"
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(tampered), "-o", str(out)], tmp_path, [Q, "tampered"], "is damaged"
    )
    assert not out.exists()
    assert_refused(["patch", "verify", str(trio["base"]), str(tampered), str(trio["ft"])], tmp_path, [Q], "is damaged")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trio["patch"].read_bytes()[:-3])
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(truncated), "-o", str(out)], tmp_path, ["truncated"], "truncated"
    )
    assert not out.exists() and not list(tmp_path.glob(".rebuilt*"))
    not_a_patch = trio["ft"]
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(not_a_patch), "-o", str(out)],
        tmp_path,
        ["ft.safetensors"],
        "is not a ckptdiff patch",
    )


def test_a_reordered_chain_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    ft2 = load_file(str(trio["ft"]))
    ft2[Q] = bump_ulps(ft2[Q], torch.tensor([9]))
    second = save_single(ft2, tmp_path / "ft2.safetensors")
    p2 = tmp_path / "step2.safetensors"
    code, _, output, _ = invoke(["patch", "create", str(trio["ft"]), str(second), "-o", str(p2), "-q"])
    assert code == 0, output
    out = tmp_path / "rebuilt"
    code, _, output, _ = invoke(
        ["patch", "apply", str(trio["base"]), str(trio["patch"]), str(p2), "-o", str(out), "-q"]
    )
    assert code == 0, output
    assert {n: _sha(t) for n, t in load_file(str(out / "model.safetensors")).items()} == {
        n: _sha(t) for n, t in ft2.items()
    }
    again = tmp_path / "again"
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(p2), str(trio["patch"]), "-o", str(again)],
        tmp_path,
        ["step2", "step.safetensors"],
        "does not follow",
    )
    assert not again.exists()


def test_outputs_that_would_replace_something_are_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(trio["patch"]), "-o", str(full)], tmp_path, ["full"], "not empty"
    )
    assert (full / "notes.txt").read_text() == "mine"
    before = trio["base"].read_bytes()
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(trio["patch"]), "-o", str(trio["base"])],
        tmp_path,
        ["base.safetensors"],
        "input of this run",
    )
    assert_refused(
        ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(trio["ft"])],
        tmp_path,
        ["ft.safetensors"],
        "input of this run",
    )
    assert trio["base"].read_bytes() == before


def test_two_torchrun_ranks_write_the_same_patch(trio: dict[str, Path], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CKPTDIFF_DEBUG="")
    out = tmp_path / "ranked.safetensors"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ckptdiff",
    ]
    args = ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(out), "-q", "-s"]
    res = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("A delta sync") == 1  # rank 0 alone prints
    with safe_open(str(out), "pt") as p, safe_open(str(trio["patch"]), "pt") as q:
        assert p.metadata()["ckptdiff.ft"] == q.metadata()["ckptdiff.ft"]
        assert sorted(p.keys()) == sorted(q.keys())
        for key in sorted(q.keys()):
            assert _sha(p.get_tensor(key)) == _sha(q.get_tensor(key)), key
    assert not list(tmp_path.glob(".*"))  # every rank's scratch files are gone


def test_max_shard_size_writes_a_folder_of_shards(trio: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    code, _, output, _ = invoke(
        ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(folder), "--max-shard-size", "0.2KB", "-q"]
    )
    assert code == 0, output
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    code, _, output, _ = invoke(["patch", "verify", str(trio["base"]), str(folder), str(trio["ft"]), "-q"])
    assert code == 0, output
    assert_refused(
        ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(tmp_path / "x"), "--max-shard-size", "5XB"],
        tmp_path,
        ["--max-shard-size", "5XB"],
        "is not a size",
    )
    assert_refused(  # a folder of shards replaces nothing: the folder just written is not empty
        ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(folder), "--max-shard-size", "1GB"],
        tmp_path,
        ["sharded"],
        "not empty",
    )


def test_a_base_of_other_shapes_is_refused_from_its_headers(trio: dict[str, Path], tmp_path: Path) -> None:
    other = load_file(str(trio["base"]))
    other[UP] = other[UP].float()  # same names, one dtype differs
    path = save_single(other, tmp_path / "retyped.safetensors")
    out = tmp_path / "rebuilt"
    line = assert_refused(
        ["patch", "apply", str(path), str(trio["patch"]), "-o", str(out)],
        tmp_path,
        [UP, "F32", "BF16"],
        "is not the base",
    )
    assert "retyped.safetensors" in line and not out.exists()


def _rewritten(patch: Path, dest: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> Path:
    """A copy of ``patch`` whose ``ckptdiff.ft`` and ``ckptdiff.base`` JSON went through ``edit(ft, base)``."""
    with safe_open(str(patch), "pt") as p:
        meta = dict(p.metadata())
    ft, base = json.loads(meta["ckptdiff.ft"]), json.loads(meta["ckptdiff.base"])
    edit(ft, base)
    meta.update({"ckptdiff.ft": json.dumps(ft), "ckptdiff.base": json.dumps(base)})
    save_file(load_file(str(patch)), str(dest), metadata=meta)
    return dest


def _entry(ft: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in ft["tensors"] if t["name"] == name)


@pytest.mark.parametrize("shard", ["../../evil.safetensors", "ABSOLUTE", "sub/evil.safetensors", "evil.json"])
def test_shard_names_of_a_patch_cannot_put_files_outside_the_output(
    trio: dict[str, Path], tmp_path: Path, shard: str
) -> None:
    name = str(tmp_path / "evil.safetensors") if shard == "ABSOLUTE" else shard

    def edit(ft: dict[str, Any], base: dict[str, Any]) -> None:
        first = "model-00001-of-00002.safetensors"
        ft["shards"] = {t["name"]: name if i % 2 else first for i, t in enumerate(ft["tensors"])}

    patch = _rewritten(trio["patch"], tmp_path / "shards.safetensors", edit)
    (tmp_path / "a").mkdir()
    out = tmp_path / "a" / "rebuilt"
    assert_refused(["patch", "apply", str(trio["base"]), str(patch), "-o", str(out)], tmp_path, [name], "is damaged")
    assert not out.exists() and not list(tmp_path.rglob("evil*")) and not list((tmp_path / "a").iterdir())


DAMAGED_METADATA: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "a negative dimension": lambda ft, base: _entry(ft, HEAD).update(shape=[-50, -16]),
    "a fractional dimension": lambda ft, base: _entry(ft, HEAD).update(shape=[50.5, 16]),
    "a shape that is a string": lambda ft, base: _entry(ft, Q).update(shape="16"),
    "a count that is a string": lambda ft, base: _entry(ft, Q).update(changed="3"),
    "a base layout entry without its shape": lambda ft, base: base["layout"].update({Q: ["BF16"]}),
    "a tensor listed twice": lambda ft, base: ft["tensors"].append(dict(_entry(ft, HEAD))),
    "an unchanged tensor its base lacks": lambda ft, base: _entry(ft, HEAD).update(name="lm_head.bias"),
    "an unchanged tensor of another shape than its base's": lambda ft, base: _entry(ft, HEAD).update(shape=[16, 50]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_METADATA))
def test_patch_metadata_of_the_wrong_kind_is_refused(trio: dict[str, Path], tmp_path: Path, damage: str) -> None:
    patch = _rewritten(trio["patch"], tmp_path / "damaged.safetensors", DAMAGED_METADATA[damage])
    out = tmp_path / "rebuilt"
    apply_args = ["patch", "apply", str(trio["base"]), str(patch), "-o", str(out)]
    assert_refused(apply_args, tmp_path, ["damaged.safetensors"], "re-create the patch")
    assert not out.exists() and not list(tmp_path.glob(".rebuilt*"))
    verify_args = ["patch", "verify", str(trio["base"]), str(patch), str(trio["ft"])]
    assert_refused(verify_args, tmp_path, ["damaged.safetensors"], "re-create the patch")


def test_deeply_nested_patch_metadata_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    with safe_open(str(trio["patch"]), "pt") as p:
        meta = dict(p.metadata())
    meta["ckptdiff.ft"] = "[" * 100_000 + "]" * 100_000
    patch = tmp_path / "deep.safetensors"
    save_file(load_file(str(trio["patch"])), str(patch), metadata=meta)
    out = tmp_path / "rebuilt"
    assert_refused(
        ["patch", "apply", str(trio["base"]), str(patch), "-o", str(out)],
        tmp_path,
        ["deep.safetensors", "ckptdiff.ft"],
        "nested more than 64 levels deep",
    )
    assert not out.exists()


@pytest.mark.parametrize("size", ["inf", "1e400", "-inf"])
def test_a_shard_size_that_is_not_a_number_of_bytes_is_refused(
    trio: dict[str, Path], tmp_path: Path, size: str
) -> None:
    out = tmp_path / "sharded"
    args = ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(out), "--max-shard-size", size]
    assert_refused(args, tmp_path, ["--max-shard-size", size], "is not a size")
    assert not out.exists()


def test_create_refuses_a_patch_file_that_apply_would_not_read(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "step.patch"
    args = ["patch", "create", str(trio["base"]), str(trio["ft"]), "-o", str(out), "--csv", str(tmp_path / "out.csv")]
    assert_refused(args, tmp_path, ["step.patch"], ".safetensors")
    assert not out.exists() and not list(tmp_path.glob(".step.patch*"))
