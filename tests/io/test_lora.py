"""PEFT LoRA adapters as fine-tunes (ckptdiff.io.views.lora).

Each adapter is written here with PEFT's file layout (``adapter_config.json``, ``adapter_model.safetensors``, keys
``base_model.model.P.lora_A.weight`` ...). The merged reference is an independent fp64 formula in this file
(numpy einsum), rounded to the merged dtype and written to disk as a full checkpoint; every analysis run on
(base, adapter) must equal the same analysis run on (base, merged checkpoint). For those comparisons the factors
are multiples of 1/16 and the scalings powers of two, so W + s·B·A is exact in fp32 and fp64 alike and the two
merges agree bit for bit; DoRA (a square root) is compared with a tolerance.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from factory import CountingSource, llama_like, save_single, save_tied_hf
from hostile import assert_refused, invoke
from safetensors.torch import save_file

from ckptdiff.analyses.consistency import consistency
from ckptdiff.analyses.full import full_report
from ckptdiff.analyses.principal import principal_overlap
from ckptdiff.analyses.sparsity import sparsity
from ckptdiff.analyses.spectral import spectral
from ckptdiff.io import resolve
from ckptdiff.io.formats.safetensors import SafetensorsSource

PREFIX = "base_model.model."
ATTN = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in ("q", "v")]


def dyadic(shape: tuple[int, ...], g: torch.Generator, scale: int = 16) -> torch.Tensor:
    """Entries k/scale, |k| < scale/2: exact in every float dtype, products exact in fp32."""
    return torch.randint(-scale // 2, scale // 2, shape, generator=g).to(torch.float32) / scale


def write_adapter(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    full = {"peft_type": "LORA", "base_model_name_or_path": "org/tiny-base", **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    return folder


def lora_factors(
    base: dict[str, torch.Tensor], modules: list[str], r: int, seed: int, *, fifo: bool = False
) -> dict[str, torch.Tensor]:
    """lora_A (r, in) and lora_B (out, r) for each module, as PEFT names them in a saved adapter."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for path in modules:
        rows, cols = base[f"{path}.weight"].shape
        fan_out, fan_in = (cols, rows) if fifo else (rows, cols)
        out[f"{PREFIX}{path}.lora_A.weight"] = dyadic((r, fan_in), g)
        b = dyadic((fan_out, r), g)
        b[:3] = 0  # three output features the adapter leaves alone: their entries are unchanged
        out[f"{PREFIX}{path}.lora_B.weight"] = b
    return out


def pattern_match(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", path):
            return value
    return default


def reference_merge(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: dict[str, Any], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The merged checkpoint by the formula of PEFT's docs, in fp64 numpy, each merged tensor rounded to ``dtype``
    (None: the base tensor's dtype)."""
    merged = dict(base)
    stored = {k.removeprefix(PREFIX): v.to(torch.float64).numpy() for k, v in adapter.items()}
    fifo = bool(config.get("fan_in_fan_out"))
    for key in stored:
        emb = key.endswith(".lora_embedding_A")
        if not (key.endswith(".lora_A.weight") or emb):
            continue
        path = key.removesuffix(".lora_A.weight").removesuffix(".lora_embedding_A")
        a = stored[key]
        b = stored[f"{path}.lora_embedding_B" if emb else f"{path}.lora_B.weight"]
        r = pattern_match(config.get("rank_pattern", {}), path, config["r"])
        alpha = pattern_match(config.get("alpha_pattern", {}), path, config["lora_alpha"])
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        w = base[f"{path}.weight"].to(torch.float64).numpy()
        product = np.einsum("ok,kn->on", b, a)  # (out, in): sum over the rank, in fp64
        delta = s * (product.T if (emb or fifo) else product)
        new = w + delta
        if config.get("use_dora"):
            m = stored[f"{path}.lora_magnitude_vector"]
            if emb or fifo:  # output features along columns
                new = new * (m / np.sqrt((new**2).sum(axis=0)))[None, :]
            else:
                new = new * (m / np.sqrt((new**2).sum(axis=1)))[:, None]
        target = dtype or base[f"{path}.weight"].dtype
        merged[f"{path}.weight"] = torch.from_numpy(new).to(target)
        if f"{path}.lora_B.bias" in stored:
            bias = base[f"{path}.bias"].to(torch.float64).numpy() + s * stored[f"{path}.lora_B.bias"]
            merged[f"{path}.bias"] = torch.from_numpy(bias).to(dtype or base[f"{path}.bias"].dtype)
    for key, value in adapter.items():
        name = key.removeprefix(PREFIX)
        if "lora_" not in name:  # modules_to_save: the adapter's tensor replaces the base's
            merged[name] = value
    return merged


def opened(base: Path, adapter: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    b = resolve.open(base)
    view = resolve.open(adapter, base=b, merged_dtype=dtype)
    try:
        return {name: view.read_full(name) for name in view.infos}
    finally:
        view.close()
        b.close()


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        if exact:
            assert torch.equal(got[name], t), name
        else:
            torch.testing.assert_close(got[name].double(), t.double(), rtol=2e-6, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------------------------
# values


@pytest.fixture
def base_sd() -> dict[str, torch.Tensor]:
    return llama_like(layers=2, d=16, ff=32, vocab=40)


def test_plain_lora_is_base_plus_scaled_product(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ATTN, r=4, seed=1)
    config = {"r": 4, "lora_alpha": 8}
    adapter = write_adapter(tmp_path / "adapter", factors, config)
    got = opened(base, adapter)
    assert_same_tensors(got, reference_merge(base_sd, factors, config, None))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], base_sd[q])  # the adapter moved it
    assert torch.equal(got[q][:3], base_sd[q][:3])  # rows whose B is zero did not move
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], base_sd["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merged_dtype_rounds_the_merged_weights(tmp_path: Path, base_sd: dict[str, torch.Tensor], dtype: Any) -> None:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ATTN, r=4, seed=2)
    config = {"r": 4, "lora_alpha": 8}
    adapter = write_adapter(tmp_path / "adapter", factors, config, dtype=torch.float32)
    got = opened(base, adapter, dtype)
    assert_same_tensors(got, reference_merge(base_sd, factors, config, dtype))
    assert got[f"{ATTN[0]}.weight"].dtype == dtype
    assert got["model.norm.weight"].dtype == torch.bfloat16  # untouched tensors stay the base's


def test_rslora_patterns_embedding_bias_and_modules_to_save(tmp_path: Path) -> None:
    base_sd = llama_like(layers=2, d=16, ff=32, vocab=40)
    base_sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(16, dtype=torch.bfloat16) + 0.25
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    g = torch.Generator().manual_seed(3)
    factors = lora_factors(base_sd, ATTN, r=4, seed=3)
    factors.update(lora_factors(base_sd, ["model.layers.1.mlp.up_proj"], r=16, seed=4))  # rank_pattern: 16
    o = "model.layers.0.self_attn.o_proj"
    factors.update(lora_factors(base_sd, [o], r=4, seed=5))
    factors[f"{PREFIX}{o}.lora_B.bias"] = dyadic((16,), g)  # lora_bias
    factors[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = dyadic((4, 40), g)  # (r, vocab)
    factors[f"{PREFIX}model.embed_tokens.lora_embedding_B"] = dyadic((16, 4), g)  # (dim, r)
    factors[f"{PREFIX}lm_head.weight"] = dyadic((40, 16), g)  # modules_to_save, saved under its own name
    config = {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "rank_pattern": {"up_proj": 16},
        "alpha_pattern": {"layers.0.self_attn.q_proj": 32, r"v_\w+": 2},
        "modules_to_save": ["lm_head"],
    }
    adapter = write_adapter(tmp_path / "adapter", factors, config)
    want = reference_merge(base_sd, factors, config, None)
    got = opened(base, adapter)
    assert_same_tensors(got, {k: v.to(got[k].dtype) for k, v in want.items()})
    assert torch.equal(got["lm_head.weight"], factors[f"{PREFIX}lm_head.weight"].to(torch.bfloat16))
    assert not torch.equal(got[f"{o}.bias"], base_sd[f"{o}.bias"])


def test_fan_in_fan_out_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (in, out); PEFT's factors are still A (r, in), B (out, r), ΔW transposed."""
    g = torch.Generator().manual_seed(6)
    base_sd = {f"transformer.h.{i}.attn.c_attn.weight": dyadic((8, 24), g, 64) for i in range(2)}
    base_sd["transformer.wte.weight"] = dyadic((30, 8), g, 64)
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    paths = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    factors = lora_factors(base_sd, paths, r=2, seed=7, fifo=True)
    assert factors[f"{PREFIX}{paths[0]}.lora_B.weight"].shape == (24, 2)
    config = {"r": 2, "lora_alpha": 4, "fan_in_fan_out": True}
    adapter = write_adapter(tmp_path / "adapter", factors, config, dtype=torch.float32)
    assert_same_tensors(opened(base, adapter), reference_merge(base_sd, factors, config, None))


@pytest.mark.parametrize("fifo", [False, True])
def test_dora_renormalises_per_output_feature(tmp_path: Path, fifo: bool) -> None:
    g = torch.Generator().manual_seed(8)
    base_sd = {f"m.layers.{i}.proj.weight": torch.randn(12, 20, generator=g) for i in range(2)}
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    paths = [f"m.layers.{i}.proj" for i in range(2)]
    factors = lora_factors(base_sd, paths, r=3, seed=9, fifo=fifo)
    for p in paths:
        out_features = factors[f"{PREFIX}{p}.lora_B.weight"].shape[0]
        factors[f"{PREFIX}{p}.lora_magnitude_vector"] = torch.rand(out_features, generator=g) + 0.5
    config = {"r": 3, "lora_alpha": 6, "use_dora": True, "fan_in_fan_out": fifo}
    adapter = write_adapter(tmp_path / "adapter", factors, config, dtype=torch.float32)
    want = reference_merge(base_sd, factors, config, None)
    got = opened(base, adapter)
    assert_same_tensors(got, want, exact=False)
    w = got[f"{paths[0]}.weight"].double()
    norms = w.norm(dim=0 if fifo else 1)  # DoRA: each output feature's norm is its magnitude
    torch.testing.assert_close(norms, factors[f"{PREFIX}{paths[0]}.lora_magnitude_vector"].double(), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# every analysis: (base, adapter) == (base, merged checkpoint on disk)


@pytest.fixture
def pair(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> dict[str, Path]:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    out: dict[str, Path] = {"base": base}
    for seed in (11, 12):
        factors = lora_factors(base_sd, [*ATTN, "model.layers.1.mlp.down_proj"], r=4, seed=seed)
        factors[f"{PREFIX}lm_head.weight"] = base_sd["lm_head.weight"] * 0.5  # modules_to_save
        config = {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}
        out[f"adapter{seed}"] = write_adapter(tmp_path / f"adapter{seed}", factors, config)
        merged = reference_merge(base_sd, factors, config, None)
        out[f"merged{seed}"] = save_single(merged, tmp_path / f"merged{seed}" / "model.safetensors").parent
    return out


def frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_sparsity_principal_spectral_equal_merged_checkpoint(pair: dict[str, Path]) -> None:
    base, adapter, merged = pair["base"], pair["adapter11"], pair["merged11"]
    opts: dict[str, Any] = {"progress": False, "device": "cpu"}
    a, m = sparsity(base, adapter, **opts), sparsity(base, merged, **opts)
    frames_equal(a.to_frame(), m.to_frame())
    assert 0 < a.overall()["changed"] < a.overall()["numel"]  # something moved, not everything
    a2, m2 = principal_overlap(base, adapter, k=4, **opts), principal_overlap(base, merged, k=4, **opts)
    frames_equal(a2.to_frame(), m2.to_frame())
    a3 = spectral(base, adapter, k=4, null="random", **opts)
    m3 = spectral(base, merged, k=4, null="random", **opts)
    frames_equal(a3.to_frame(), m3.to_frame())
    assert a3.header["ft"].startswith("adapter ")
    assert "r=4, alpha=8, 5 modules, merged as W + (alpha/r) B A" in a3.header["ft"]
    assert "1 full tensors replaced (modules_to_save)" in a3.header["ft"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_sparsity_follows_merged_dtype(tmp_path: Path, base_sd: dict[str, torch.Tensor], dtype: str) -> None:
    """The merged checkpoint's precision decides which entries changed: equal to the reference rounded the same."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    fp32 = {k: v.float() for k, v in base_sd.items()}  # an fp32 base (values exact in bf16)
    base = save_single(fp32, tmp_path / "base" / "model.safetensors").parent
    g = torch.Generator().manual_seed(13)
    factors = {}
    for path in ATTN:  # small updates: some vanish when the merged weight is rounded to 16 bits, none in fp32
        rows, cols = fp32[f"{path}.weight"].shape
        factors[f"{PREFIX}{path}.lora_A.weight"] = dyadic((4, cols), g) / 4
        factors[f"{PREFIX}{path}.lora_B.weight"] = dyadic((rows, 4), g) / 4
    config = {"r": 4, "lora_alpha": 8}
    adapter = write_adapter(tmp_path / "adapter", factors, config, dtype=torch.float32)
    merged = reference_merge(fp32, factors, config, torch_dtype)
    disk = save_single(merged, tmp_path / "merged" / "model.safetensors").parent
    a = sparsity(base, adapter, merged_dtype=dtype, progress=False)
    m = sparsity(base, disk, progress=False)
    frames_equal(a.to_frame(), m.to_frame())
    native = sparsity(base, adapter, progress=False)  # merged weights kept in the base's fp32
    assert 0 < a.overall()["changed"] < native.overall()["changed"]


def test_consistency_and_report_equal_merged_checkpoints(pair: dict[str, Path]) -> None:
    base = pair["base"]
    opts: dict[str, Any] = {"progress": False, "device": "cpu", "labels": ["one", "two"]}
    a = consistency(base, [pair["adapter11"], pair["adapter12"]], **opts)
    m = consistency(base, [pair["merged11"], pair["merged12"]], **opts)
    frames_equal(a.to_frame(), m.to_frame())
    ra = full_report(base, [pair["adapter11"], pair["adapter12"]], k=4, **opts)
    rm = full_report(base, [pair["merged11"], pair["merged12"]], k=4, **opts)
    frames_equal(ra.tensors(), rm.tensors())
    assert set(ra.analyses) == {"sparsity", "principal", "spectral", "consistency"}


def test_check_equals_merged_checkpoint(pair: dict[str, Path], tmp_path: Path) -> None:
    rules = ["--rule", "sparsity >= 0.5", "--rule", "overlap_principal@*q_proj* <= 0.5", "--rule", "nss <= 1"]
    rules += ["--k", "4", "-f", "json"]
    results = []
    for ft in (pair["adapter11"], pair["merged11"]):
        code, _, output, _ = invoke(["check", str(pair["base"]), str(ft), "-q", *rules])
        body = json.loads(output)
        results.append((code, body["rules"]))
    assert results[0] == results[1]
    assert results[0][0] in (0, 1)


def test_untouched_tensors_are_read_once(pair: dict[str, Path], base_sd: dict[str, torch.Tensor]) -> None:
    """The adapter's untouched tensors and the base weights its matrices add to come from the base's one read."""
    inner = SafetensorsSource("base", [pair["base"] / "model.safetensors"], "base")
    counting = CountingSource(inner)
    sparsity(counting, pair["adapter11"], progress=False)
    spectral(counting, pair["adapter11"], k=4, progress=False)
    # once per run: sparsity reads every tensor, spectral the matrices (nothing more for the adapter's side)
    expected = {n: (1 + (t.dim() == 2)) * t.numel() * t.element_size() for n, t in base_sd.items()}
    assert dict(counting.bytes) == expected


# ------------------------------------------------------------------------------------------------------------------
# bad input


def out_args(tmp_path: Path) -> list[str]:
    return ["--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json"), "-q"]


def test_wrong_base_names_module_and_base_model(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    factors = lora_factors(base_sd, ATTN, r=4, seed=1)
    adapter = write_adapter(tmp_path / "adapter", factors, {"r": 4, "lora_alpha": 8})
    wider = llama_like(layers=2, d=24, ff=32, vocab=40)
    other = save_single(wider, tmp_path / "other" / "model.safetensors").parent
    assert_refused(
        ["sparsity", str(other), str(adapter), *out_args(tmp_path)],
        tmp_path,
        ["model.layers.0.self_attn.q_proj", "org/tiny-base"],
        "does not fit base",
    )
    shallow = save_single(llama_like(layers=1, d=16, ff=32, vocab=40), tmp_path / "one" / "model.safetensors").parent
    assert_refused(
        ["spectral", str(shallow), str(adapter), *out_args(tmp_path)],
        tmp_path,
        ["model.layers.1.self_attn.q_proj.weight", "org/tiny-base"],
        "the base has no tensor",
    )


@pytest.mark.parametrize("kind", ["IA3", "LOHA", "LOKR", "VERA"])
def test_unknown_peft_type_is_named(tmp_path: Path, base_sd: dict[str, torch.Tensor], kind: str) -> None:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ATTN, r=4, seed=1)
    adapter = write_adapter(tmp_path / "adapter", factors, {"r": 4, "lora_alpha": 8, "peft_type": kind})
    assert_refused(["sparsity", str(base), str(adapter), *out_args(tmp_path)], tmp_path, [kind], "not supported")


@pytest.mark.parametrize(
    ("config", "extra", "expect"),
    [
        ({"r": 8, "lora_alpha": 8}, {}, "config contradicts the tensors"),
        ({"r": 4, "lora_alpha": 8, "use_dora": True}, {}, "no lora_magnitude_vector"),
        ({"r": 4, "lora_alpha": 8}, {"magnitude": True}, "does not say use_dora"),
        ({"r": 4, "lora_alpha": 8}, {"drop_b": True}, "not both lora_A and lora_B"),
        ({"r": 4, "lora_alpha": 8}, {"stray": True}, "no part of the LoRA layout"),
        ({"r": "four", "lora_alpha": 8}, {}, "not what PEFT writes"),
        ({"r": 4, "lora_alpha": 8}, {"whole": True}, "holds both LoRA factors"),
    ],
)
def test_config_contradicting_tensors_is_refused(
    tmp_path: Path, base_sd: dict[str, torch.Tensor], config: dict[str, Any], extra: dict[str, bool], expect: str
) -> None:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ATTN, r=4, seed=1)
    q = f"{PREFIX}{ATTN[0]}"
    if extra.get("magnitude"):
        factors[f"{q}.lora_magnitude_vector"] = torch.ones(16)
    if extra.get("drop_b"):
        del factors[f"{q}.lora_B.weight"]
    if extra.get("stray"):
        factors[f"{q}.lora_C.weight"] = torch.ones(2, 2)
    if extra.get("whole"):
        factors[f"{q}.weight"] = torch.ones(16, 16)
    adapter = write_adapter(tmp_path / "adapter", factors, config)
    assert_refused(["principal-overlap", str(base), str(adapter), *out_args(tmp_path)], tmp_path, ["adapter"], expect)


def test_lora_on_a_tied_head_is_refused(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    base = save_tied_hf(base_sd, tmp_path / "base", {"tie_word_embeddings": True})
    factors = lora_factors(base_sd, ["lm_head"], r=4, seed=1)
    adapter = write_adapter(tmp_path / "adapter", factors, {"r": 4, "lora_alpha": 8})
    assert_refused(
        ["sparsity", str(base), str(adapter), *out_args(tmp_path)],
        tmp_path,
        ["lm_head.weight", "model.embed_tokens.weight"],
        "does not merge a LoRA into a tied tensor",
    )


def test_adapter_needs_a_base_and_a_valid_merged_dtype(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    adapter = write_adapter(tmp_path / "adapter", lora_factors(base_sd, ATTN, r=4, seed=1), {"r": 4, "lora_alpha": 8})
    assert_refused(
        ["sparsity", str(adapter), str(base), *out_args(tmp_path)], tmp_path, [str(adapter)], "is a PEFT adapter"
    )
    assert_refused(
        ["sparsity", str(base), str(adapter), "--merged-dtype", "fp8", *out_args(tmp_path)],
        tmp_path,
        ["--merged-dtype", "fp8"],
        "must be one of bf16, fp16, fp32",
    )
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    assert_refused(
        ["sparsity", str(base), str(adapter), *out_args(tmp_path)],
        tmp_path,
        ["adapter_model.safetensors"],
        "incomplete",
    )


def test_check_header_only_sees_the_merged_names_and_dtypes(pair: dict[str, Path]) -> None:
    """--header-only reads no tensor data: the adapter's headers and config give the merged checkpoint's names."""
    args = ["check", str(pair["base"]), str(pair["adapter11"]), "--header-only", "-q", "-f", "json"]
    code, _, output, _ = invoke([*args, "--same-keys", "--same-shapes", "--same-dtypes"])
    assert code == 0, output
    code, _, output, _ = invoke([*args, "--same-dtypes", "--merged-dtype", "fp32"])
    assert code == 1
    rule = json.loads(output)["rules"][0]
    assert rule["value"] == 5  # the five adapted matrices are stored as fp32, the rest as the base's bf16


def test_dora_through_the_pass_reads_the_base_once(tmp_path: Path) -> None:
    """DoRA's norms need whole matrices: spectral's whole reads hand the base weight over, read once, and the
    result is the reference merge's (within fp32 rounding: the norm is a square root)."""
    g = torch.Generator().manual_seed(21)
    base_sd = {f"m.layers.{i}.proj.weight": torch.randn(12, 20, generator=g) for i in range(3)}
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    paths = [f"m.layers.{i}.proj" for i in range(2)]
    factors = lora_factors(base_sd, paths, r=3, seed=22)
    for p in paths:
        factors[f"{PREFIX}{p}.lora_magnitude_vector"] = torch.rand(12, generator=g) + 0.5
    config = {"r": 3, "lora_alpha": 6, "use_dora": True}
    adapter = write_adapter(tmp_path / "adapter", factors, config, dtype=torch.float32)
    merged = save_single(reference_merge(base_sd, factors, config, None), tmp_path / "merged" / "model.safetensors")
    counting = CountingSource(SafetensorsSource("base", [base / "model.safetensors"], "base"))
    got = spectral(counting, adapter, k=4, progress=False).to_frame()
    assert dict(counting.bytes) == {n: t.numel() * 4 for n, t in base_sd.items()}
    want = spectral(base, merged.parent, k=4, progress=False).to_frame()
    numeric = [c for c in want.columns if want[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(got[numeric], want[numeric], rtol=1e-4, atol=1e-6)
    assert (got["nss"] > 0).sum() == 2  # the two adapted matrices moved, the third did not


@pytest.mark.parametrize("stream", ["0", "1"])
def test_adapter_from_the_hub_downloads_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_sd: dict[str, torch.Tensor], stream: str
) -> None:
    """A Hub adapter repo is downloaded with adapter_config.json (streaming would leave the config behind), beside a
    base downloaded or streamed as usual; the result is the local folder's."""
    from hub_server import serve

    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    (tmp_path / "adapter" / "README.md").parent.mkdir()
    (tmp_path / "adapter" / "README.md").write_text("an adapter card, not downloaded")
    adapter = write_adapter(tmp_path / "adapter", lora_factors(base_sd, ATTN, r=4, seed=1), {"r": 4, "lora_alpha": 8})
    local = sparsity(base, adapter, progress=False).to_frame()
    with serve(tmp_path, monkeypatch) as fake:
        monkeypatch.setenv("CKPTDIFF_HUB_STREAM", stream)
        fake.add("acme/base", base, "b" * 40)
        fake.add("acme/lora", adapter, "a" * 40)
        remote = sparsity("acme/base", "acme/lora", progress=False)
        fetched = {s.path.rsplit("/", 1)[-1] for s in fake.data_requests() if "acme/lora" in s.path}
    frames_equal(remote.to_frame(), local)
    assert remote.header["ft"].startswith("adapter acme/lora, r=4, alpha=8, 4 modules")
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}


def test_fp64_base_is_summed_in_fp64(tmp_path: Path) -> None:
    """An fp64 base weight is not rounded to fp32 on the way: entries whose update is zero stay bit-identical."""
    g = torch.Generator().manual_seed(31)
    base_sd = {"m.proj.weight": torch.randn(8, 6, generator=g, dtype=torch.float64)}
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ["m.proj"], r=2, seed=32)
    config = {"r": 2, "lora_alpha": 4}
    adapter = write_adapter(tmp_path / "adapter", factors, config, dtype=torch.float32)
    got = opened(base, adapter)["m.proj.weight"]
    assert got.dtype == torch.float64
    assert torch.equal(got[:3], base_sd["m.proj.weight"][:3])  # B's zero rows: W exactly, not W rounded to fp32
    assert torch.equal(got, reference_merge(base_sd, factors, config, None)["m.proj.weight"])


def test_adapter_model_bin_reads_as_the_safetensors_file(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    """Older PEFT releases wrote adapter_model.bin (a torch.save state dict): the same merge."""
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ATTN, r=4, seed=41)
    config = {"r": 4, "lora_alpha": 8}
    st = write_adapter(tmp_path / "st", factors, config)
    legacy = tmp_path / "bin"
    legacy.mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in factors.items()}, legacy / "adapter_model.bin")
    (legacy / "adapter_config.json").write_text((st / "adapter_config.json").read_text())
    assert_same_tensors(opened(base, legacy), opened(base, st))
    assert_same_tensors(opened(base, legacy), reference_merge(base_sd, factors, config, None))


def test_the_factor_file_alone_points_to_its_folder(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    adapter = write_adapter(tmp_path / "adapter", lora_factors(base_sd, ATTN, r=4, seed=1), {"r": 4, "lora_alpha": 8})
    assert_refused(
        ["sparsity", str(base), str(adapter / "adapter_model.safetensors"), *out_args(tmp_path)],
        tmp_path,
        ["adapter_config.json"],
        "pass its folder",
    )


@pytest.mark.parametrize(
    ("config", "names", "expect"),
    [
        ('"lora_alpha": null', ["lora_alpha", "None"], "not what PEFT writes"),
        ('"r": null', ["r is None"], "not what PEFT writes"),
        ('"alpha_pattern": {"q_proj": Infinity}', ["alpha_pattern['q_proj']", "inf"], "not a finite positive number"),
        ('"alpha_pattern": {"q_proj(": 2}', ["alpha_pattern", "'q_proj('"], "not a regular expression"),
        ('"rank_pattern": {"[v": 4}', ["rank_pattern", "'[v'"], "not a regular expression"),
    ],
)
def test_config_values_peft_cannot_load_are_refused(
    tmp_path: Path, base_sd: dict[str, torch.Tensor], config: str, names: list[str], expect: str
) -> None:
    """A value PEFT would fail on (a null rank or alpha, an infinite alpha, a pattern that is no regex) is refused,
    never replaced by a default or skipped: any of these would change the scaling silently."""
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    adapter = write_adapter(tmp_path / "adapter", lora_factors(base_sd, ATTN, r=4, seed=1), {})
    fields = {"r": "4", "lora_alpha": "8"}
    key = config.split(":", 1)[0].strip('"')
    fields.pop(key, None)
    body = ", ".join([f'"{k}": {v}' for k, v in fields.items()] + [config])
    (adapter / "adapter_config.json").write_text(f'{{"peft_type": "LORA", {body}}}')
    assert_refused(["sparsity", str(base), str(adapter), *out_args(tmp_path)], tmp_path, names, expect)


@pytest.mark.parametrize(
    ("stored", "shape", "expect"),
    [
        ("lora_B.bias", (8,), "has shape [8], not [16]"),  # was an internal error (a broadcast in the merge)
        ("lora_B.bias", (16, 1), "has shape [16, 1], not [16]"),
        ("lora_A.bias", (4,), "no part of the LoRA layout"),  # was read as lora_B.bias
        ("lora_A.bias", (16,), "no part of the LoRA layout"),  # was merged into the bias, silently
    ],
)
def test_a_bias_not_of_lora_bias_layout_is_refused(
    tmp_path: Path, base_sd: dict[str, torch.Tensor], stored: str, shape: tuple[int, ...], expect: str
) -> None:
    """lora_bias adds one lora_B.bias entry per output feature; PEFT's lora_A has no bias."""
    q = ATTN[0]
    base_sd = {**base_sd, f"{q}.bias": torch.zeros(16, dtype=torch.bfloat16)}
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ATTN, r=4, seed=1)
    factors[f"{PREFIX}{q}.{stored}"] = torch.ones(shape)
    adapter = write_adapter(tmp_path / "adapter", factors, {"r": 4, "lora_alpha": 8})
    for command in ("sparsity", "spectral"):
        assert_refused([command, str(base), str(adapter), *out_args(tmp_path)], tmp_path, [stored], expect)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, "int8"])
def test_the_library_refuses_the_merged_dtypes_the_cli_refuses(
    tmp_path: Path, base_sd: dict[str, torch.Tensor], dtype: Any
) -> None:
    """ckptdiff.open(adapter, base=..., merged_dtype=...) takes bf16, fp16 or fp32 as --merged-dtype does: an int8
    merge rounded every merged weight to an integer silently, a name was an AssertionError."""
    from ckptdiff.errors import InputError

    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    adapter = write_adapter(tmp_path / "adapter", lora_factors(base_sd, ATTN, r=4, seed=1), {"r": 4, "lora_alpha": 8})
    b = resolve.open(base)
    try:
        with pytest.raises(InputError, match=r"merged.dtype must be one of bf16, fp16, fp32"):
            resolve.open(adapter, base=b, merged_dtype=dtype)
    finally:
        b.close()


def test_a_fan_in_fan_out_the_base_contradicts_is_named(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    """fan_in_fan_out: true on a Llama (Linear, W stored out × in): the factors fit the base the other way round, and
    the message says so instead of only blaming the base."""
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    factors = lora_factors(base_sd, ["model.layers.0.mlp.up_proj"], r=4, seed=1)
    adapter = write_adapter(tmp_path / "adapter", factors, {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True})
    assert_refused(
        ["sparsity", str(base), str(adapter), *out_args(tmp_path)],
        tmp_path,
        ["model.layers.0.mlp.up_proj", "fan_in_fan_out"],
        "they fit it with fan_in_fan_out false",
    )
