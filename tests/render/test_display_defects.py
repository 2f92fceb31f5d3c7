"""Display defects found on quantized and mixed-dtype pairs (issue 20 item 6): notes in brackets dropped by the
terminal, a bf16 gap between two different populations, counts printed as fractions, ``nan`` for an empty scope."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from safetensors.torch import save_file

import ckptdiff
from ckptdiff.analyses.base import Report, Table
from ckptdiff.render.terminal import print_tables
from ckptdiff.render.text import to_markdown


def _printed(report: Report) -> str:
    buf = io.StringIO()
    print_tables(report, Console(file=buf, width=120, color_system=None))
    return buf.getvalue()


def _save(root: Path, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> tuple[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    save_file(ft, str(root / "ft.safetensors"))
    return str(root / "base.safetensors"), str(root / "ft.safetensors")


def test_bracketed_notes_reach_the_terminal() -> None:
    """rich read ``[fp8: ...]`` as a style tag and printed nothing of it: the header's FP8 / MoE notes vanished."""
    header = {
        "base": "/ckpt/base [fp8: 12 weights dequantized (f8_e4m3, 128x128 blocks)]",
        "ft": "/ckpt/ft [moe: 3 fused expert tensors split into 24 per-expert tensors]",
    }
    table = Table("Findings", pd.DataFrame({"tensor": ["w"], "detail": ["[bold]not a style[/bold] [fp8: raw]"]}))
    out = _printed(Report("t", header, ["A sentence [fp8: kept]."], [table], pd.DataFrame()))
    assert "[fp8: 12 weights dequantized (f8_e4m3, 128x128 blocks)]" in out
    assert "[moe: 3 fused expert tensors split into 24 per-expert tensors]" in out
    assert "[bold]not a style[/bold] [fp8: raw]" in out
    assert "A sentence [fp8: kept]." in out


def test_bf16_view_is_compared_with_the_same_tensors(tmp_path: Path) -> None:
    """A mixed pair: fp32 tensors heavily changed (and seen by bf16), bf16 tensors barely. The bf16 figure covers the
    fp32 tensors only, so its native counterpart must cover them too (the overall figure gave a negative "gap")."""
    g = torch.Generator().manual_seed(0)
    wide = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    narrow = {
        f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).bfloat16() for i in range(2)
    }
    base = {**wide, **narrow}
    ft = {k: v.clone() for k, v in base.items()}
    for name in wide:  # 40 of 64 entries doubled (seen in bf16 too), 10 more moved by one fp32 ULP (mostly not)
        flat = ft[name].reshape(-1)
        flat[:40] *= 2.0
        flat[40:50] = torch.nextafter(flat[40:50], torch.full((10,), torch.inf))
    ft["model.layers.0.self_attn.q_proj.weight"].reshape(-1)[:1] *= 2.0
    res = ckptdiff.sparsity(*_save(tmp_path, base, ft), progress=False)
    native_fp32 = 1.0 - (2 * 50) / (2 * 64)  # a plain count over the two fp32 tensors
    seen_in_bf16 = sum(int((base[n].bfloat16() != ft[n].bfloat16()).sum()) for n in wide)
    as_bf16 = 1.0 - seen_in_bf16 / (2 * 64)
    overall = 1.0 - (2 * 50 + 1) / (2 * 64 + 2 * 256)
    assert as_bf16 > native_fp32  # the fp32 ULP moves are what bf16 hides
    o = res.overall()
    assert o["sparsity_fp32"] == native_fp32 and o["sparsity_bf16"] == as_bf16 and o["sparsity"] == overall
    sentence = next(s for s in res.report().summary if s.startswith("As bf16 would store them"))
    assert f"sparsity {as_bf16:.4f} over the 2 fp32/fp64 tensors, against {native_fp32:.4f} natively" in sentence
    assert f"{overall:.4f}" not in sentence  # the old sentence set the bf16 figure against every tensor's


def test_counts_print_as_integers(tmp_path: Path) -> None:
    """One changed entry is ``1``, not ``1.0000``; a tensor count is ``7``, not ``7.0000``."""
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.self_attn.o_proj.weight": torch.randn(8, 8, generator=g) for i in range(3)}
    ft = {k: v.clone() for k, v in base.items()}
    ft["model.layers.2.self_attn.o_proj.weight"][0, 0] += 1.0
    report = ckptdiff.sparsity(*_save(tmp_path, base, ft), progress=False).report()
    md = to_markdown(report)
    assert "| changed | 1 | 1 |" in md and "| tensors | 3 | 3 |" in md
    overall = _printed(report).split("Overall (parameter-weighted)")[1].split("Per module type")[0]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in overall.splitlines() if "│" in line}
    assert (rows["tensors"], rows["changed"], rows["ulp_1"], rows["sparsity"]) == ("3", "1", "0", "0.9948")
    principal = ckptdiff.principal_overlap(*_save(tmp_path / "p", base, ft), k=2, progress=False).report()
    assert "| changed | 1 | 1 |" in to_markdown(principal)


def test_no_nan_where_there_is_nothing_to_measure(tmp_path: Path) -> None:
    """An all-int8 pair has no float tensor; a pair of 1-D tensors has no linear layer: say so, never ``nan``."""
    ints = {
        f"model.layers.{i}.mlp.down_proj.weight": torch.arange(64, dtype=torch.int8).reshape(8, 8) for i in range(2)
    }
    moved = {k: v.clone() for k, v in ints.items()}
    moved["model.layers.1.mlp.down_proj.weight"][0, 0] += 1
    summary = ckptdiff.sparsity(*_save(tmp_path / "i", ints, moved), progress=False).report().summary
    assert not any("nan" in s for s in summary), summary
    assert summary[0].startswith("No floating-point tensor was compared")
    assert any("integer/bool tensors compared exactly" in s for s in summary)
    norms = {"model.layers.0.input_layernorm.weight": torch.ones(8), "model.norm.weight": torch.ones(8)}
    bumped = {k: v.clone() for k, v in norms.items()}
    bumped["model.norm.weight"][0] = 2.0
    first = ckptdiff.sparsity(*_save(tmp_path / "n", norms, bumped), progress=False).report().summary[0]
    assert "nan" not in first and "no linear layer" in first and "1 of 16 entries changed" in first
