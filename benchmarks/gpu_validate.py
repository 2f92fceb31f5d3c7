"""Validate the GPU path against the CPU (fp64 where it matters) and time both, in one short run.

    python benchmarks/gpu_validate.py --gib 1 --out results.md

Checks, each PASS/FAIL with its tolerance:
1. sparsity: per-tensor changed counts and ULP buckets on cuda equal the CPU's exactly (bitwise and rtol);
2. principal-overlap: masks-derived overlaps on cuda equal the CPU's (exact SVD, fp64): |diff| <= 1e-9
   for count ratios, energies to 1e-6 relative;
3. spectral: NSS and angles on cuda fp64 equal CPU fp64 (rel 1e-6 / abs 1e-6 degrees);
4. the shared decompositions and the checked top-k path (``report --svd randomized`` on the device) against the
   single commands on the CPU with exact fp64 SVDs (see shared_checks).
Also times sparsity on cpu vs cuda on a synthetic bf16 pair. Exits 1 if any check fails. Without CUDA it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _frames_equal(a, b, cols, rtol, atol) -> tuple[bool, float]:  # type: ignore[no-untyped-def]
    worst = 0.0
    ok = True
    for c in cols:
        for x, y in zip(a[c].tolist(), b[c].tolist(), strict=True):
            if x is None or y is None or (isinstance(x, float) and math.isnan(x)):
                ok &= (x is None or (isinstance(x, float) and math.isnan(x))) == (
                    y is None or (isinstance(y, float) and math.isnan(y))
                )
                continue
            diff = abs(float(x) - float(y))
            worst = max(worst, diff / max(abs(float(y)), 1e-300) if rtol else diff)
            if diff > atol + rtol * abs(float(y)):
                ok = False
    return ok, worst


def _small_model(folder: Path, d: int, ff: int, layers: int, rel: float, seed: int) -> tuple[Path, Path]:
    """fp32 base with a decaying spectrum and a small fine-tune, saved as bf16 (like a released pair)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    shapes = {"self_attn.q_proj": (d, d), "self_attn.o_proj": (d, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}
    for i in range(layers):
        for name, (m, n) in shapes.items():
            p = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
            s = torch.arange(1, p + 1, dtype=torch.float64) ** -0.6
            w0 = (u * s) @ v.T + 0.01 * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
            dw = rel * w0.norm() * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(m * n)
            key = f"model.layers.{i}.{name}.weight"
            base[key] = w0.to(torch.bfloat16)
            ft[key] = (w0 + dw).to(torch.bfloat16)
    save_file(base, str(folder / "base.safetensors"))
    save_file(ft, str(folder / "ft.safetensors"))
    return folder / "base.safetensors", folder / "ft.safetensors"


def shared_checks(b: Path, f: Path, gpu: str, report) -> None:  # type: ignore[no-untyped-def]
    """4. The shared decompositions and the checked top-k path (issue 26) on the device against CPU fp64 singles.

    ``report`` on the device (one decomposition per matrix and side, shared by principal-overlap and spectral,
    ``--svd randomized`` so every matrix takes the checked fast path or its exact fallback) against the single
    commands on the CPU with ``--svd exact`` in fp64: spectral NSS within 1e-6 relative, angles within 1e-5 degrees
    (the fast path's stated bound is 1.2e-6), intruder counts and the angles column identical; principal overlaps
    within 1e-3 (its masks come from a different SVD route, so a few tied entries may change sides).
    """
    from ckptdiff.analyses.full import full_report
    from ckptdiff.analyses.principal import principal_overlap
    from ckptdiff.analyses.spectral import spectral

    rep = full_report(str(b), [str(f)], k=16, svd="randomized", device=gpu, progress=False)
    (sp_dev,) = rep.spectral.values()
    (po_dev,) = rep.principal.values()
    sp_cpu = spectral(str(b), str(f), k=16, svd="exact", device="cpu", progress=False).to_frame()
    po_cpu = principal_overlap(str(b), str(f), k=16, svd="exact", device="cpu", progress=False).to_frame()
    d = sp_dev.to_frame()
    ok, worst = _frames_equal(d, sp_cpu, ["nss"], 1e-6, 0.0)
    report("shared report: spectral NSS vs cpu exact fp64", ok, f"max rel diff {worst:.2e} (tol 1e-6)")
    ok, worst = _frames_equal(d, sp_cpu, ["angle_u_max_deg", "angle_v_max_deg"], 0.0, 1e-5)
    report("shared report: spectral angles vs cpu exact", ok, f"max |diff| {worst:.2e} deg (tol 1e-5)")
    same = d["angles"].tolist() == sp_cpu["angles"].tolist() and d["intruders"].tolist() == sp_cpu["intruders"].tolist()
    report("shared report: angles verdicts and intruder counts", same, "identical" if same else "differ")
    ok, worst = _frames_equal(po_dev.to_frame(), po_cpu, ["overlap_principal", "ratio_principal"], 0.0, 1e-3)
    report("shared report: principal overlaps vs cpu exact", ok, f"max |diff| {worst:.2e} (tol 1e-3)")
    report("shared report: routes", True, sp_dev.header.get("svd_routes", "none"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="size per side of the synthetic sparsity pair")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run-cpu", action="store_true", help="compare cpu against cpu (checks the script)")
    args = ap.parse_args()
    gpu = "cpu" if args.dry_run_cpu else "cuda"
    if gpu == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to validate")
        return 0
    from ckptdiff.analyses.consistency import consistency
    from ckptdiff.analyses.principal import principal_overlap
    from ckptdiff.analyses.sparsity import sparsity
    from ckptdiff.analyses.spectral import spectral
    from ckptdiff.metrics.mask import CompareMode

    name = torch.cuda.get_device_name(0) if gpu == "cuda" else "cpu (dry run)"
    lines = [f"device: {name}, torch {torch.__version__}", ""]
    failed = False

    def report(name: str, ok: bool, detail: str) -> None:
        nonlocal failed
        failed |= not ok
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")

    lines += ["| check | result | detail |", "|---|---|---|"]
    tmp = Path(tempfile.mkdtemp())
    # 1. sparsity at scale: exact agreement and timing.
    from bench_sparsity import make_pair

    base_dir, ft_dir = make_pair(tmp / "pair", args.gib)
    times = {}
    frames = {}
    for dev in ("cpu", gpu):
        sparsity(str(base_dir), str(ft_dir), device=dev, progress=False)  # warm the page cache / CUDA context
        t0 = time.perf_counter()
        r = sparsity(str(base_dir), str(ft_dir), device=dev, progress=False)
        times[dev] = time.perf_counter() - t0
        frames[dev] = r.to_frame()
    cols = ["changed", "ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16", "ulp_gt16", "changed_nonfinite"]
    same = all(frames["cpu"][c].tolist() == frames[gpu][c].tolist() for c in cols)
    nbytes = sum(f.stat().st_size for d in (base_dir, ft_dir) for f in d.glob("*.safetensors"))
    report(
        f"sparsity bitwise, {args.gib:g} GiB/side",
        same,
        f"counts identical: {same}; cpu {nbytes / times['cpu'] / 1e9:.2f} GB/s, "
        f"cuda {nbytes / times[gpu] / 1e9:.2f} GB/s",
    )
    rt = {
        dev: sparsity(str(base_dir), str(ft_dir), mode=CompareMode("rtol", 1e-3), device=dev, progress=False)
        for dev in ("cpu", gpu)
    }
    same_rt = rt["cpu"].to_frame()["changed"].tolist() == rt[gpu].to_frame()["changed"].tolist()
    report("sparsity rtol=1e-3", same_rt, "per-tensor changed counts identical")

    # 2/3. SVD analyses on a small realistic model.
    small = tmp / "small"
    small.mkdir()
    b, f = _small_model(small, d=512, ff=1376, layers=2, rel=1e-3, seed=0)
    from safetensors.torch import load_file, save_file

    g2 = torch.Generator().manual_seed(1)  # a second fine-tune of the same base, with its own update draw
    ft2 = {}
    for key, w in load_file(str(b)).items():
        x = w.double()
        noise = torch.randn(x.shape, generator=g2, dtype=torch.float64) / math.sqrt(x.numel())
        ft2[key] = (x + 1e-3 * x.norm() * noise).to(torch.bfloat16)
    f2 = small / "ft2.safetensors"
    save_file(ft2, str(f2))
    cons = {dev: consistency(str(b), [str(f), str(f2)], device=dev, progress=False).to_frame() for dev in ("cpu", gpu)}
    cols_c = ["n_a", "n_b", "n_both", "n_union", "n_same_sign"]
    same_c = all(cons["cpu"][c].tolist() == cons[gpu][c].tolist() for c in cols_c)
    ok_c, worst_c = _frames_equal(cons[gpu], cons["cpu"], ["jaccard_magnitude"], 0.0, 1e-9)
    report(
        "consistency counts and magnitude baseline",
        same_c and ok_c,
        f"counts identical: {same_c}; max |diff| jaccard_magnitude {worst_c:.2e} (tol 1e-9)",
    )
    po = {
        dev: principal_overlap(str(b), str(f), svd="exact", precision="fp64", device=dev, progress=False).to_frame()
        for dev in ("cpu", gpu)
    }
    ok, worst = _frames_equal(
        po[gpu], po["cpu"], ["overlap_principal", "overlap_low", "ratio_principal", "ratio_low"], 0.0, 1e-9
    )
    report("principal-overlap fp64 overlaps/ratios", ok, f"max |diff| {worst:.2e} (tol 1e-9)")
    ok, worst = _frames_equal(po[gpu], po["cpu"], ["energy_principal"], 1e-6, 0.0)
    report("principal-overlap fp64 energy E_k", ok, f"max rel diff {worst:.2e} (tol 1e-6)")
    sp = {
        (dev, prec): spectral(str(b), str(f), precision=prec, device=dev, progress=False).to_frame()
        for dev, prec in (("cpu", "fp64"), (gpu, "fp64"), (gpu, "fp32"))
    }
    ok, worst = _frames_equal(sp[(gpu, "fp64")], sp[("cpu", "fp64")], ["nss"], 1e-6, 0.0)
    report("spectral NSS cuda fp64 vs cpu fp64", ok, f"max rel diff {worst:.2e} (tol 1e-6)")
    ok, worst = _frames_equal(sp[(gpu, "fp64")], sp[("cpu", "fp64")], ["angle_u_max_deg", "angle_v_max_deg"], 0.0, 1e-6)
    report("spectral angles cuda fp64 vs cpu fp64", ok, f"max |diff| {worst:.2e} deg (tol 1e-6)")
    _, worst32 = _frames_equal(sp[(gpu, "fp32")], sp[("cpu", "fp64")], ["nss"], 1e-6, 0.0)
    lines.append(f"| spectral NSS cuda fp32 vs cpu fp64 | info | max rel diff {worst32:.2e} (fp32 is not for drift) |")
    shared_checks(b, f, gpu, report)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
