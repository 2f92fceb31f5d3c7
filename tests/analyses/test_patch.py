"""Patches rebuild the fine-tune bit for bit: every dtype, NaN payloads, -0.0, empty and one-entry tensors,
structural changes; the encodings and sizes agree with formulas written here; chunks, ranks and the plain-torch
recipe of docs/patches.md give the same bytes."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import as_two_ranks, save_sharded, save_single
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptdiff.analyses.patch import PatchAnalysis, hub_commit, patch_apply, patch_create, patch_size, patch_verify
from ckptdiff.engine.alignment import align
from ckptdiff.engine.pipeline import Run, execute
from ckptdiff.errors import InputError
from ckptdiff.io.outputs import standalone
from ckptdiff.io.resolve import open as open_ckpt
from ckptdiff.metrics.patch import changed_mask, gap_escapes, patch_cost

ROOT = Path(__file__).resolve().parents[2]
INT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(t: torch.Tensor) -> np.ndarray:
    """Stored bits as unsigned integers, by numpy (independent of ckptdiff's views)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.frombuffer(raw, dtype=INT[t.element_size()])


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _f32_bits(*words: int) -> torch.Tensor:
    return torch.from_numpy(np.array(words, dtype=np.uint32).view(np.float32).copy())


def _bf16_bits(*words: int) -> torch.Tensor:
    return torch.from_numpy(np.array(words, dtype=np.int16)).view(torch.bfloat16)


def zoo() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and a fine-tune covering every case of issue 22 item 5, with changes known by construction."""
    g = torch.Generator().manual_seed(3)
    b: dict[str, torch.Tensor] = {}
    f: dict[str, torch.Tensor] = {}
    q = "model.layers.0.self_attn.q_proj.weight"  # bf16, 11 of 4096 changed: sparse
    b[q] = torch.randn(64, 64, generator=g).bfloat16()
    f[q] = b[q].clone()
    f[q].view(-1)[torch.arange(5, 4096, 409)] += 1
    up = "model.layers.0.mlp.up_proj.weight"  # fp16, every 4th changed: bitmask
    b[up] = torch.randn(64, 64, generator=g).half()
    f[up] = b[up].clone()
    f[up].view(-1).view(torch.int16)[::4] ^= 1
    down = "model.layers.0.mlp.down_proj.weight"  # fp32, all but 10 changed: dense
    b[down] = torch.randn(32, 64, generator=g)
    f[down] = b[down] * 1.5
    f[down].view(-1)[:10] = b[down].view(-1)[:10]
    gate = "model.layers.1.mlp.gate_proj.weight"  # block-scaled FP8: codes and scales patched as stored
    b[gate] = (torch.randn(128, 128, generator=g) * 50).to(torch.float8_e4m3fn)
    f[gate] = b[gate].clone()
    f[gate].view(-1).view(torch.uint8)[7::50] ^= 1
    b[gate + "_scale_inv"] = torch.tensor([[0.5]])
    f[gate + "_scale_inv"] = torch.tensor([[0.25]])
    pos = "model.position_ids"  # int64
    b[pos] = torch.arange(16, dtype=torch.int64)
    f[pos] = b[pos].clone()
    f[pos][3] = -7
    keep = "model.layers.0.attn_mask"  # bool
    b[keep] = torch.zeros(8, 8, dtype=torch.bool)
    f[keep] = b[keep].clone()
    f[keep][2, 5] = True
    ln = "model.layers.1.input_layernorm.weight"  # fp32: NaN payload 1 -> 2, +0.0 -> -0.0, one NaN kept
    b[ln] = _f32_bits(0x7FC00001, 0x00000000, 0x7FC00003, 0x3F800000)
    f[ln] = _f32_bits(0x7FC00002, 0x80000000, 0x7FC00003, 0x3F800000)
    norm = "model.norm.weight"  # bf16 NaN payloads and -0.0
    b[norm] = _bf16_bits(0x7FC1, 0x0000, 0x3F80)
    f[norm] = _bf16_bits(0x7FC2, -0x8000, 0x3F80)
    b["model.empty"] = torch.zeros(0)
    f["model.empty"] = torch.zeros(0)
    b["model.scale"] = torch.tensor(1.0)  # one entry, no dimensions
    f["model.scale"] = torch.tensor(2.0)
    b["model.one"] = torch.ones(1).bfloat16()
    f["model.one"] = torch.ones(1).bfloat16()
    k = "model.layers.1.self_attn.k_proj.weight"  # reshaped
    b[k] = torch.randn(16, 32, generator=g).bfloat16()
    f[k] = b[k].reshape(32, 16).clone()
    v = "model.layers.1.self_attn.v_proj.weight"  # re-typed
    b[v] = torch.randn(16, 16, generator=g).bfloat16()
    f[v] = b[v].float()
    f["lm_head.weight"] = torch.randn(10, 16, generator=g).bfloat16()  # added
    b["model.old.weight"] = torch.randn(4, generator=g)  # removed
    return b, f


SHARD_META = {"format": "pt", "step": "7"}
WHOLE = {"model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight", "lm_head.weight"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("patch")
    b, f = zoo()
    save_single(b, tmp / "base.safetensors")
    names = list(f)
    save_sharded({n: f[n] for n in names}, tmp / "ft", [6, len(names) - 6])
    first = tmp / "ft" / "model-00001-of-00002.safetensors"  # a shard with safetensors metadata of its own
    save_file({n: f[n].contiguous() for n in names[:6]}, str(first), metadata=SHARD_META)
    return tmp / "base.safetensors", tmp / "ft", f


def _ft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _expected_choice(b: torch.Tensor, f: torch.Tensor) -> tuple[str, int]:
    """The cheapest encoding by the formulas of docs/patches.md, from numpy's bit comparison."""
    changed = int(np.count_nonzero(_bits(b) != _bits(f)))
    n, s = f.numel(), f.element_size()
    if changed == 0:
        return "none", 0
    sizes = {"sparse": changed * (4 + s), "bitmask": -(-n // 8) + changed * s, "dense": n * s}
    best = min(sizes.values())
    return next(e for e in ("sparse", "bitmask", "dense") if sizes[e] == best), best


def test_round_trip_is_bit_exact(pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    base, ft, want = pair
    patch = tmp_path / "p.safetensors"
    result = patch_create(str(base), str(ft), patch, progress=False)
    assert result.path == patch and patch.is_file()
    rows = result.to_frame().set_index("tensor")
    b, _ = zoo()
    for name, f in want.items():
        if name in WHOLE:
            assert rows.loc[name, "encoding"] == "dense", name
            continue
        enc, size = _expected_choice(b[name], f)
        assert (rows.loc[name, "encoding"], rows.loc[name, "patch_bytes"]) == (enc, size), name
    assert {"sparse", "bitmask", "dense", "none"} <= set(rows["encoding"])
    assert rows.loc["model.old.weight", "encoding"] == "removed"
    applied = patch_apply(str(base), [str(patch)], tmp_path / "out", progress=False)
    out = _ft_tensors(tmp_path / "out")
    assert set(out) == set(want)
    for name, f in want.items():
        assert out[name].dtype == f.dtype and out[name].shape == f.shape, name
        assert _sha(out[name]) == _sha(f), name
    # sharded like the fine-tune: the same shard names and weight map, an index beside them
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(tmp_path / "out" / "model-00001-of-00002.safetensors"), "pt") as p:
        assert p.metadata() == SHARD_META
    assert applied.nbytes == sum(t.numel() * t.element_size() for t in want.values())
    assert patch_verify(str(base), [str(patch)], str(ft), progress=False).same
    assert not list(tmp_path.glob(".*"))  # no scratch or temporary file left


def test_the_plain_torch_recipe_of_the_docs_rebuilds_the_fine_tune(
    pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    base, ft, want = pair
    patch = tmp_path / "p.safetensors"
    patch_create(str(base), str(ft), patch, progress=False)
    text = (ROOT / "docs" / "patches.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    scope: dict[str, object] = {}
    exec(code.group(1), scope)  # the documented lines, run as a reader would (no ckptdiff import in them)
    assert "ckptdiff" not in code.group(1).replace('"ckptdiff.ft"', "")
    out = scope["apply_patch"](str(base), str(patch))  # type: ignore[operator]
    assert set(out) == set(want)
    for name, f in want.items():
        assert _sha(out[name]) == _sha(f) and out[name].shape == f.shape, name


def test_metadata_records_identity_and_layout(pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    base, ft, want = pair
    patch = tmp_path / "p.safetensors"
    patch_create(str(base), str(ft), patch, progress=False)
    with safe_open(str(patch), "pt") as p:
        meta = p.metadata()
    assert meta["ckptdiff.patch"] == "1"
    b, _ = zoo()
    assert json.loads(meta["ckptdiff.base"])["tensors"] == {n: _sha(t) for n, t in b.items()}
    doc = json.loads(meta["ckptdiff.ft"])
    raw = (ft / "model-00001-of-00002.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    first = sorted(header, key=lambda n: header[n]["data_offsets"])  # the order of the shard's bytes
    assert [t["name"] for t in doc["tensors"]][: len(first)] == first  # the fine-tune's order
    assert {t["name"]: t["sha256"] for t in doc["tensors"]} == {n: _sha(t) for n, t in want.items()}
    assert doc["metadata"]["model-00001-of-00002.safetensors"] == SHARD_META


def test_patch_file_is_within_one_percent_of_the_analytic_size(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    b = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 1024, generator=g).bfloat16() for i in range(3)}
    f = {n: t.clone() for n, t in b.items()}
    rates = [0.01, 0.2, 0.97]  # sparse, bitmask, dense
    for t, rate in zip(f.values(), rates, strict=True):
        pick = torch.rand(t.numel(), generator=g) < rate
        t.view(-1).view(torch.int16)[pick] ^= 1
    save_single(b, tmp_path / "b.safetensors")
    save_single(f, tmp_path / "f.safetensors")
    res = patch_create(
        str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), tmp_path / "p.safetensors", progress=False
    )
    analytic = sum(_expected_choice(b[n], f[n])[1] for n in b)
    assert sorted(res.to_frame()["encoding"]) == ["bitmask", "dense", "sparse"]
    size = (tmp_path / "p.safetensors").stat().st_size
    assert analytic <= size <= analytic * 1.01
    assert res.overall()["patch_bytes"] == analytic
    sized = patch_size(str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), progress=False)
    assert sized.overall()["patch_bytes"] == analytic and sized.path is None


def _stored_run(base: Path, ft: Path, chunk_bytes: int) -> Run:
    srcs = tuple(open_ckpt(str(p), stored=True) for p in (base, ft))
    items = align(srcs, labels=["base", "ft"])
    return Run(srcs, ("base", "ft"), tuple(items), torch.device("cpu"), 2 * 1024**3, chunk_bytes=chunk_bytes)


def test_small_chunks_and_two_ranks_write_the_same_patch(
    pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    base, ft, _ = pair
    one = tmp_path / "one.safetensors"
    patch_create(str(base), str(ft), one, progress=False)
    chunked = tmp_path / "chunked.safetensors"
    run = _stored_run(base, ft, chunk_bytes=8 * 37)  # 37 fp64-widths: pieces cut through every tensor
    execute(run, [PatchAnalysis(standalone(chunked, "--out"))], progress=False)
    assert chunked.read_bytes().replace(b"chunked", b"one") != b""  # written
    two = tmp_path / "two.safetensors"
    out = standalone(two, "--out")
    run = _stored_run(base, ft, chunk_bytes=8 * 37)
    as_two_ranks(run, lambda: [PatchAnalysis(out, folder=tmp_path)])
    for path in (chunked, two):
        with safe_open(str(path), "pt") as p, safe_open(str(one), "pt") as q:
            assert p.metadata()["ckptdiff.ft"] == q.metadata()["ckptdiff.ft"]
            assert sorted(p.keys()) == sorted(q.keys())
            for key in sorted(q.keys()):
                assert _sha(p.get_tensor(key)) == _sha(q.get_tensor(key)), key
    assert not list(tmp_path.glob(".*"))


def test_gap_escapes_across_chunks(tmp_path: Path) -> None:
    b = torch.zeros(300_000, dtype=torch.bfloat16)
    f = b.clone()
    changed = [0, 70_000, 70_001, 200_000, 265_536]  # gaps-1: 0, 69_999 (escape), 0, 129_998 (escape), 65_535 (escape)
    f[changed] = 1.0
    save_single({"w": b}, tmp_path / "b.safetensors")
    save_single({"w": f}, tmp_path / "f.safetensors")
    for chunk in (2 * 1000, 2 * 70_000, 2 * 10**6):
        run = _stored_run(tmp_path / "b.safetensors", tmp_path / "f.safetensors", chunk)
        (res,) = execute(run, [PatchAnalysis()], progress=False)
        row = res.to_frame().iloc[0]
        assert row["changed"] == 5 and row["gaps_bytes"] == 5 * 2 + 3 * 4 + 5 * 2, chunk


def test_verify_says_which_tensor_differs(pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    base, ft, want = pair
    patch = tmp_path / "p.safetensors"
    patch_create(str(base), str(ft), patch, progress=False)
    other = dict(want)
    other["model.position_ids"] = want["model.position_ids"].clone()
    other["model.position_ids"][0] = 99
    save_single(other, tmp_path / "other.safetensors")
    res = patch_verify(str(base), [str(patch)], str(tmp_path / "other.safetensors"), progress=False)
    assert not res.same and res.first == "model.position_ids"


def test_a_chain_applies_in_order_and_refuses_a_reordering(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    s0 = {"a.weight": torch.randn(40, generator=g).bfloat16(), "b.weight": torch.randn(8, generator=g)}
    s1 = {"a.weight": s0["a.weight"].clone(), "b.weight": s0["b.weight"] + 1}
    s1["a.weight"][3] = 5
    s2 = {"a.weight": s1["a.weight"].clone(), "b.weight": s1["b.weight"].clone(), "c.weight": torch.ones(2)}
    s2["a.weight"][9] = -5
    for i, sd in enumerate((s0, s1, s2)):
        save_single(sd, tmp_path / f"s{i}.safetensors")
    p1, p2 = tmp_path / "p1.safetensors", tmp_path / "p2.safetensors"
    patch_create(str(tmp_path / "s0.safetensors"), str(tmp_path / "s1.safetensors"), p1, progress=False)
    patch_create(str(tmp_path / "s1.safetensors"), str(tmp_path / "s2.safetensors"), p2, progress=False)
    patch_apply(str(tmp_path / "s0.safetensors"), [str(p1), str(p2)], tmp_path / "out.safetensors", progress=False)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert {n: _sha(t) for n, t in out.items()} == {n: _sha(t) for n, t in s2.items()}
    with pytest.raises(InputError, match="does not follow"):
        patch_apply(str(tmp_path / "s0.safetensors"), [str(p2), str(p1)], tmp_path / "bad", progress=False)
    with pytest.raises(InputError, match="is not the base"):  # a gap: the second patch alone on the first base
        patch_apply(str(tmp_path / "s0.safetensors"), [str(p2)], tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------------
# metrics/patch.py: the stored-bits mask and the gap encoding, against plain loops


def test_changed_mask_sees_nan_payloads_and_signed_zero() -> None:
    a = _f32_bits(0x7FC00001, 0x00000000, 0x7FC00003, 0x3F800000)
    b = _f32_bits(0x7FC00002, 0x80000000, 0x7FC00003, 0x3F800000)
    assert changed_mask(a, b).tolist() == [True, True, False, False]
    assert changed_mask(torch.tensor([True, False]), torch.tensor([True, True])).tolist() == [False, True]


def test_gap_escapes_equal_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.unique(torch.randint(0, 2_000_000, (30,), generator=g))  # mean gap ~66k: some escape
    prev, want = -1, 0
    for i in idx.tolist():
        want += (i - prev - 1) >= 0xFFFF
        prev = i
    assert gap_escapes(idx) == want and want > 0
    assert gap_escapes(idx[5:], previous=int(idx[4])) == sum(
        (int(b) - int(a) - 1) >= 0xFFFF for a, b in itertools.pairwise(idx[4:])
    )
    c = patch_cost(1000, 10, 2, escapes=3)
    assert c.gaps == 10 * 2 + 3 * 4 + 10 * 2 and c.choice == "sparse"


def test_header_is_padded_to_eight_bytes(tmp_path: Path) -> None:
    save_single({"w": torch.ones(3)}, tmp_path / "b.safetensors")
    save_single({"w": torch.zeros(3)}, tmp_path / "f.safetensors")
    patch_create(
        str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), tmp_path / "p.safetensors", progress=False
    )
    raw = (tmp_path / "p.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert (8 + hlen) % 8 == 0


def test_the_hub_commit_is_read_from_the_resolved_source(tmp_path: Path) -> None:
    save_single({"w": torch.ones(3)}, tmp_path / "b.safetensors")
    src = open_ckpt(str(tmp_path / "b.safetensors"), stored=True)
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert hub_commit(src) == ""
    src.resolved = f"hub:org/model@{sha} (streamed by byte range, 1 safetensors file)"
    assert hub_commit(src) == sha
    src.resolved = f"/home/u/.cache/huggingface/hub/models--org--model/snapshots/{sha}/model.safetensors"
    assert hub_commit(src) == sha
    src.close()


def test_a_hub_streamed_pair_gives_the_local_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hub_server import serve

    b, f = zoo()
    save_sharded(b, tmp_path / "base", [7, len(b) - 7])
    save_sharded(f, tmp_path / "ft", [5, len(f) - 5])
    local = tmp_path / "local.safetensors"
    patch_create(str(tmp_path / "base"), str(tmp_path / "ft"), local, progress=False)
    sha = "f" * 40
    with serve(tmp_path, monkeypatch) as hub:
        monkeypatch.setenv("CKPTDIFF_HUB_STREAM", "1")
        hub.add("acme/base", tmp_path / "base", "b" * 40)
        hub.add("acme/ft", tmp_path / "ft", sha)
        streamed = tmp_path / "out" / "streamed.safetensors"
        streamed.parent.mkdir()
        patch_create("acme/base", "acme/ft", streamed, progress=False)
    with safe_open(str(streamed), "pt") as p, safe_open(str(local), "pt") as q:
        got, want = json.loads(p.metadata()["ckptdiff.ft"]), json.loads(q.metadata()["ckptdiff.ft"])
        assert got["commit"] == sha and want["commit"] == ""
        assert got["tensors"] == want["tensors"] and got["shards"] == want["shards"]
        assert sorted(p.keys()) == sorted(q.keys())
        for key in sorted(q.keys()):
            assert _sha(p.get_tensor(key)) == _sha(q.get_tensor(key)), key


def test_a_sharded_patch_round_trips_and_its_shards_stay_within_the_size(
    pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    base, ft, want = pair
    folder = tmp_path / "sharded"
    most = 4_000
    patch_create(str(base), str(ft), folder, max_shard_bytes=most, progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(str(shard), "pt") as s:
            sizes = [s.get_tensor(k).numel() * s.get_tensor(k).element_size() for k in s.keys()]  # noqa: SIM118
            assert sum(sizes) <= most or len(sizes) == 1, shard.name  # a larger tensor gets a shard of its own
            assert s.metadata()["ckptdiff.patch"] == "1"  # every shard carries the whole metadata
    patch_apply(str(base), [str(folder)], tmp_path / "out", progress=False)
    out = _ft_tensors(tmp_path / "out")
    assert {n: _sha(t) for n, t in out.items()} == {n: _sha(t) for n, t in want.items()}
    # a shard of another patch in its place is refused
    other = tmp_path / "other.safetensors"  # a patch of another fine-tune (the base itself)
    patch_create(str(base), str(base), other, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(other, mixed / shards[0].name)
    with pytest.raises(InputError, match="model-00001-of"):  # the index or the metadata give it away
        patch_apply(str(base), [str(mixed)], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
    relabelled = tmp_path / "relabelled"  # the same tensors, one shard's metadata from another patch
    shutil.copytree(folder, relabelled)
    with safe_open(str(other), "pt") as p:
        foreign = p.metadata()
    save_file(load_file(str(shards[0])), str(relabelled / shards[0].name), metadata=foreign)
    with pytest.raises(InputError, match="mixes shards"):
        patch_apply(str(base), [str(relabelled)], tmp_path / "out3", progress=False)


def test_int64_indices_past_the_int32_limit(
    pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors of 2**31 entries or more take int64 indices; the limit is lowered here so that a small tensor does."""
    import ckptdiff.metrics.patch as metrics

    base, ft, want = pair
    monkeypatch.setattr(metrics, "INT32_LIMIT", 1000)
    patch = tmp_path / "p.safetensors"
    res = patch_create(str(base), str(ft), patch, progress=False)
    q = "model.layers.0.self_attn.q_proj.weight"  # 4096 entries, sparse
    row = res.to_frame().set_index("tensor").loc[q]
    assert row["encoding"] == "sparse" and row["sparse_bytes"] == len(range(5, 4096, 409)) * (8 + 2)
    with safe_open(str(patch), "pt") as p:
        assert p.get_tensor(f"{q}:indices").dtype == torch.int64
    patch_apply(str(base), [str(patch)], tmp_path / "out", progress=False)
    out = _ft_tensors(tmp_path / "out")
    assert {n: _sha(t) for n, t in out.items()} == {n: _sha(t) for n, t in want.items()}


def test_a_failure_mid_pass_leaves_no_scratch_file_and_no_patch(
    pair: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft, _ = pair
    seen: list[str] = []
    real = PatchAnalysis.on_chunk

    def fail_third(self: PatchAnalysis, item: object, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        seen.append(getattr(item, "name", ""))
        if len(seen) == 3:
            assert list(tmp_path.glob(".p.safetensors.*.scratch"))  # the scratch files exist meanwhile
            raise KeyboardInterrupt
        real(self, item, start, tensors)  # type: ignore[arg-type]

    monkeypatch.setattr(PatchAnalysis, "on_chunk", fail_third)
    with pytest.raises(KeyboardInterrupt):
        patch_create(str(base), str(ft), tmp_path / "p.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []
