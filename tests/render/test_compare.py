"""The fine-tunes side by side: the comparison table equals the single commands' figures, the verdict says what
happened first, heatmaps share one colour scale, and the page shows all of it on its first screen in Chromium.

Run on the shipped examples (base, two GRPO seeds, SFT: 858k parameters, bf16), k = 4 so that some matrices have
stable principal angles, with the equal-norm random null.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from factory import bump_ulps, llama_like, save_single

pytest.importorskip("matplotlib")

from safetensors.torch import load_file

from ckptdiff.analyses.compare import (
    ANGLE,
    ENERGY,
    NSS,
    PRINCIPAL_MAGNITUDE,
    PRINCIPAL_RANDOM,
    SPARSITY,
    SPARSITY_BF16,
)
from ckptdiff.analyses.consistency import consistency
from ckptdiff.analyses.full import FullReportResult, full_report
from ckptdiff.analyses.principal import principal_overlap
from ckptdiff.analyses.sparsity import sparsity
from ckptdiff.analyses.spectral import spectral
from ckptdiff.render.figures import (
    MIN_SPAN,
    MIN_SPAN_RATIO,
    Figure,
    _per_layer_lines,
    _spectral_drift,
    colour_scale,
    figures,
    principal_grid,
)
from ckptdiff.render.html import to_html
from ckptdiff.render.report_dir import to_markdown_dir

ROOT = Path(__file__).resolve().parents[2]
CK = ROOT / "examples" / "checkpoints"
RUNS = ("rl_seed1", "rl_seed2", "sft")
K = 4


@dataclass(frozen=True)
class Shipped:
    report: FullReportResult
    base: str
    fts: dict[str, str]
    figs: list[Figure]


@pytest.fixture(scope="module")
def shipped() -> Iterator[Shipped]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as examples.analyze runs: two LAPACK threads on a loaded machine are far slower
    try:
        base = str(CK / "base")
        fts = {r: str(CK / r) for r in RUNS}
        rep = full_report(base, list(fts.values()), labels=list(RUNS), k=K, null="random", progress=False)
        yield Shipped(rep, base, fts, figures(rep))
    finally:
        torch.set_num_threads(threads)


def _bits(path: str) -> dict[str, torch.Tensor]:
    return {k: v.view(torch.int16) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}


def _word(ratio: float, band: float, words: tuple[str, str, str]) -> str:
    """The verdict word written out here: below 1 - band, within, above 1 + band."""
    return words[0] if ratio < 1 - band else words[2] if ratio > 1 + band else words[1]


def test_comparison_table_equals_the_single_commands(shipped: Shipped) -> None:
    rep, base = shipped.report, shipped.base
    side = rep.comparison()
    values, controls, words = side.values(), side.controls(), side.words()
    assert list(values.columns) == list(RUNS)
    base_bits = _bits(base)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for run, ft in shipped.fts.items():
        # sparsity: from the stored bits, entry by entry (every tensor is bf16: bitwise comparison)
        ft_bits = _bits(ft)
        masks[run] = {k: base_bits[k] != ft_bits[k] for k in base_bits}
        changed = sum(int(m.sum()) for m in masks[run].values())
        numel = sum(m.numel() for m in masks[run].values())
        assert values.loc[SPARSITY, run] == pytest.approx(1 - changed / numel, abs=1e-12)
        single = sparsity(base, ft, progress=False).overall()
        assert values.loc[SPARSITY, run] == single["sparsity"]
        assert values.loc[SPARSITY_BF16, run] == single["sparsity"] and words.loc[SPARSITY_BF16, run] == "as stored"
        # principal overlap and energy, as principal-overlap prints them
        p = principal_overlap(base, ft, k=K, progress=False).overall()
        assert values.loc[PRINCIPAL_RANDOM, run] == p["ratio_principal"]
        assert values.loc[PRINCIPAL_MAGNITUDE, run] == p["ratio_principal_magnitude"]
        assert values.loc[ENERGY, run] == pytest.approx(p["energy_principal"] / p["energy_principal_random"])
        words3 = ("avoids", "no effect", "targets")
        assert words.loc[PRINCIPAL_RANDOM, run] == _word(p["ratio_principal"], 0.02, words3)
        assert words.loc[PRINCIPAL_MAGNITUDE, run] == _word(p["ratio_principal_magnitude"], 0.02, words3)
        # spectral: NSS median and the largest stable angle, each beside the null over the same matrices
        s = spectral(base, ft, k=K, null="random", progress=False)
        o, df = s.overall(), s.analysed()
        assert values.loc[NSS, run] == o["nss_median"]
        assert controls.loc[NSS, run] == float(df["nss_null"].median())
        stable = df[df["angles"] == "ok"]
        assert len(stable), "k = 4 leaves some matrices with stable angles on the examples"
        worst = max(float(stable["angle_u_max_deg"].max()), float(stable["angle_v_max_deg"].max()))
        null = max(float(stable["angle_u_max_deg_null"].max()), float(stable["angle_v_max_deg_null"].max()))
        assert values.loc[ANGLE, run] == pytest.approx(worst) and controls.loc[ANGLE, run] == pytest.approx(null)
        assert words.loc[ANGLE, run] == _word(worst / null, 0.02, ("below null", "as null", "above null"))
    # sparsest / densest: the largest and smallest sparsity, the fine-tunes far apart (16.9% against 2.7%)
    dense = {r: values.loc[SPARSITY, r] for r in RUNS}
    assert words.loc[SPARSITY, max(dense, key=dense.__getitem__)] == "sparsest"
    assert words.loc[SPARSITY, min(dense, key=dense.__getitem__)] == "densest"
    # Jaccard of each pair: from the masks above, and its magnitude-matched control as consistency prints it
    pairs = consistency(base, list(shipped.fts.values()), labels=list(RUNS), progress=False).pairs()
    for a, b in (("rl_seed1", "rl_seed2"), ("rl_seed1", "sft"), ("rl_seed2", "sft")):
        inter = sum(int((masks[a][k] & masks[b][k]).sum()) for k in base_bits)
        union = sum(int((masks[a][k] | masks[b][k]).sum()) for k in base_bits)
        row = pairs[(pairs["run_a"] == a) & (pairs["run_b"] == b)].iloc[0]
        for x, y in ((a, b), (b, a)):
            label = f"Jaccard with {y} (magnitude-matched)"
            assert values.loc[label, x] == pytest.approx(inter / union, abs=1e-12)
            assert controls.loc[label, x] == row["jaccard_magnitude"]
            ratio = (inter / union) / float(row["jaccard_magnitude"])
            assert words.loc[label, x] == _word(ratio, 0.05, ("avoided", "as chance", "shared"))
        assert math.isnan(values.loc[f"Jaccard with {a} (magnitude-matched)", a])
    # the text cells say the same: the value, its control in brackets, the word
    text = side.table().frame
    assert text.loc["Jaccard with rl_seed2 (magnitude-matched)", "rl_seed1"].startswith(
        f"{values.loc['Jaccard with rl_seed2 (magnitude-matched)', 'rl_seed1']:.3f} ("
    )
    assert text.loc[SPARSITY, "sft"] == f"{values.loc[SPARSITY, 'sft']:.1%} densest"


def test_verdict_says_what_happened_with_controls(shipped: Shipped) -> None:
    rep = shipped.report
    sentences = rep.verdict()
    assert 2 <= len(sentences) <= 4
    first = sentences[0]
    for run in RUNS:  # every fine-tune's sparsity, as the table has it
        assert f"{run} {rep.comparison().values().loc[SPARSITY, run]:.1%}" in first or first.startswith(
            f"{run} left {rep.comparison().values().loc[SPARSITY, run]:.1%}"
        )
    assert "bit-identical in bf16" in first
    text = " ".join(sentences)
    assert "magnitude" in text  # the principal and the Jaccard claims stand beside their magnitude-matched control
    assert "null" in text and "seed 0" in text  # the spectral claim: its random null, and that it is one draw
    assert "docs/" not in text


def test_report_pages_open_with_the_verdict_and_define_their_terms(shipped: Shipped) -> None:
    rep, figs = shipped.report, shipped.figs
    md = to_markdown_dir(rep, figs)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[0] == "## What happened" and heads[-2:] == ["## Inputs and settings", "## Glossary"]
    assert md.index(rep.verdict()[0]) < md.index("### Side by side") < md.index("## Sparsity")
    page = to_html(rep, figs)
    assert page.index('id="verdict"') < page.index('class="side"') < page.index('id="inputs"')
    assert page.index('id="inputs"') < page.index('id="glossary"')
    for text in (md, page):
        assert "docs/metrics.md" not in text and "§2b" not in text
    assert "magnitude-matched baseline</dt>" in page and "<abbr title=" in page


def test_colour_scales_have_a_minimum_span_and_a_centre() -> None:
    _, norm = colour_scale((0.341, 0.343), "sequential", bounds=(0.0, 1.0))
    assert norm.vmax - norm.vmin == pytest.approx(MIN_SPAN)
    assert norm.vmin <= 0.341 and norm.vmax >= 0.343
    # 0.341 and 0.343 end up close on the colour map, not at its two ends
    assert abs(float(norm(0.343)) - float(norm(0.341))) == pytest.approx(0.002 / MIN_SPAN)
    _, edge = colour_scale((0.999, 1.0), "sequential", bounds=(0.0, 1.0))
    assert (edge.vmin, edge.vmax) == pytest.approx((1.0 - MIN_SPAN, 1.0))  # kept inside [0, 1]
    _, wide = colour_scale((0.006, 0.26), "sequential", bounds=(0.0, 1.0))
    assert (wide.vmin, wide.vmax) == (0.006, 0.26)
    _, div = colour_scale((0.97, 1.01), "diverging")
    assert float(div(1.0)) == pytest.approx(0.5)
    assert (div.vmin, div.vmax) == pytest.approx((1 - MIN_SPAN_RATIO, 1 + MIN_SPAN_RATIO))
    _, div2 = colour_scale((0.5, 1.2), "diverging")
    assert (div2.vmin, div2.vmax) == pytest.approx((0.5, 1.5))


def test_heatmaps_share_one_colour_scale_and_runs_are_drawn_together(shipped: Shipped) -> None:
    rep, figs = shipped.report, shipped.figs
    heat = [f for f in figs if f.name.startswith("sparsity_heatmap")]
    assert [f.run for f in heat] == list(RUNS)
    scales = {f.scale for f in heat}
    assert len(scales) == 1
    lo, hi = scales.pop() or (math.nan, math.nan)
    cells = [v for r in rep.sparsity.values() for v in r.grid().to_numpy(dtype="float64").ravel().tolist()]
    assert lo == pytest.approx(min(cells)) and hi == pytest.approx(max(cells))
    for f in heat:
        assert "the same for every fine-tune" in f.caption
    # the principal-overlap ratio heatmaps: one diverging scale, centred on 1, shared by every fine-tune
    ratios = [f for f in figs if f.name.startswith("principal_heatmap")]
    assert [f.run for f in ratios] == list(RUNS)
    assert len({f.scale for f in ratios}) == 1
    rlo, rhi = ratios[0].scale or (math.nan, math.nan)
    assert (rlo + rhi) / 2 == pytest.approx(1.0) and rhi - 1 >= MIN_SPAN_RATIO
    for res in rep.principal.values():
        grid = principal_grid(res)
        rows = res.analysed()
        for (layer, module), value in grid.stack().items():  # one matrix per cell here: its own row's ratio
            row = rows[(rows["layer"] == layer) & (rows["module"] == module) & rows["linear"].astype(bool)]
            assert len(row) == 1
            assert value == pytest.approx(float(row["ratio_principal_magnitude"].iloc[0]))
            assert rlo <= value <= rhi
    together = [f for f in figs if f.analysis == "comparison"]
    assert [f.name for f in together] == ["compare_sparsity", "compare_ulp", "compare_principal", "compare_spectral"]
    for f in together:
        assert ("one bar per fine-tune" if f.name == "compare_ulp" else "one line per fine-tune") in f.caption
    # the lines drawn: each fine-tune's per-layer figure, on the layers of all of them
    layers, lines = _per_layer_lines({r: res.by("layer") for r, res in rep.sparsity.items()}, "sparsity") or ([], {})
    assert list(lines) == list(RUNS) and layers == [0, 1, 2, 3]
    for run, ys in lines.items():
        assert ys == rep.sparsity[run].by("layer")["sparsity"].tolist()


def test_the_page_in_headless_chromium(shipped: Shipped, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH to render the page with")
    rep = shipped.report
    out = tmp_path / "report"
    out.mkdir()
    page = to_html(rep, shipped.figs)
    assert "<script" not in page
    # A copy of the page with a probe: what the browser laid out, written into the DOM that Chromium dumps.
    probe = """<script>
window.addEventListener('load', () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.top + window.scrollY, r.height, r.width]; };
  const table = document.querySelector('table.side');
  const out = {
    table: table ? box(table) : null,
    heads: table ? [...table.querySelectorAll('thead th')].map((th) => th.textContent) : [],
    rows: table ? [...table.querySelectorAll('tbody tr')].map((tr) => [...tr.children].map((c) => c.innerText)) : [],
    verdict: [...document.querySelectorAll('p.verdict')].map((p) => [p.innerText, ...box(p)]),
    inputs: box(document.getElementById('inputs')),
    heatmaps: [...document.querySelectorAll('figure[id^="fig-sparsity_heatmap"]')].map(
      (f) => [f.dataset.scale, ...box(f.querySelector('svg'))]),
  };
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
</body>"""
    shot = out / "probe.html"
    shot.write_text(page.replace("</body>", probe, 1), encoding="utf-8")
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--window-size=1280,1200"]
    cmd += [f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", shot.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=90, check=False, text=True)
    except subprocess.TimeoutExpired:
        pytest.skip("the headless browser did not finish within 90 s")
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    import html as _html

    seen = json.loads(_html.unescape(found.group(1)))
    side = rep.comparison()
    assert seen["heads"] == ["figure", *RUNS]
    assert [r[0] for r in seen["rows"]] == list(side.rows)
    assert seen["rows"][0][3] == side.table().frame.iloc[0]["sft"]  # cells read as the Markdown has them
    top, height, width = seen["table"]
    assert height > 100 and width > 400
    assert top + height < 1200 * 1.5, "the comparison table starts on the first screen"
    assert top < 1200
    verdict = seen["verdict"]
    assert [v[0] for v in verdict] == rep.verdict()
    assert all(v[1] < top for v in verdict), "the verdict sentences come before the table"
    assert seen["inputs"][0] > top + height, "the settings come after the comparison"
    scales = {h[0] for h in seen["heatmaps"]}
    assert len(seen["heatmaps"]) == len(RUNS) and len(scales) == 1, seen["heatmaps"]
    assert all(h[2] > 0 and h[3] > 0 for h in seen["heatmaps"])  # drawn with a size


def test_spectral_figure_says_when_it_has_no_max_line(shipped: Shipped) -> None:
    # k = 64 on the examples' 128-wide matrices: no matrix has a stable angle (every gap too narrow), so there is no
    # maximum to draw, and the caption must not promise one.
    wide = spectral(shipped.base, shipped.fts["sft"], k=64, progress=False)
    assert not (wide.analysed()["angles"] == "ok").any()
    drawn = _spectral_drift(wide, "")
    assert drawn is not None
    assert "only the median" in drawn.caption and "no matrix has a stable angle at k = 64" in drawn.caption
    narrow = _spectral_drift(shipped.report.spectral["sft"], "")  # k = 4: some stable angles, the max line is there
    assert narrow is not None and "the maximum over the layer's matrices whose angles are stable" in narrow.caption


def test_a_fine_tune_that_changed_nothing_is_said_so_and_judged_on_nothing(tmp_path: Path) -> None:
    base = {k: v.float() for k, v in llama_like(layers=2, d=16, ff=32, seed=3).items()}
    g = torch.Generator().manual_seed(5)
    moved = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in base.items()}
    paths = [save_single(sd, tmp_path / f"{n}.safetensors") for n, sd in (("b", base), ("m", moved), ("s", base))]
    rep = full_report(paths[0], paths[1:], labels=["moved", "same"], k=4, null="random", progress=False)
    side = rep.comparison()
    words, values = side.words(), side.values()
    assert values.loc[SPARSITY, "same"] == 1.0 and words.loc[SPARSITY, "same"] == "sparsest"
    assert words.loc[NSS, "same"] == "unchanged" and words.loc[ANGLE, "same"] == "unchanged"
    assert math.isnan(values.loc[PRINCIPAL_RANDOM, "same"])  # no update: no overlap to judge
    # fp32 checkpoints: the bf16 view is its own figure, no longer "as stored"
    assert (
        words.loc[SPARSITY_BF16, "moved"] == "" and values.loc[SPARSITY_BF16, "moved"] > values.loc[SPARSITY, "moved"]
    )
    sentences = rep.verdict()
    assert sentences[0].startswith("moved left") and "same 100.0%" in sentences[0]
    spectral_claim = next(s for s in sentences if "top-k subspaces" in s)
    assert "same" not in spectral_claim and "seed 0" in spectral_claim


def test_consistency_opens_with_the_fine_tunes_side_by_side(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ckptdiff.cli import app

    name = "model.layers.0.mlp.up_proj.weight"
    base = llama_like(layers=1, d=16, ff=32, seed=3)
    a, b = dict(base), dict(base)
    a[name] = bump_ulps(base[name], torch.arange(0, 100))
    b[name] = bump_ulps(base[name], torch.arange(0, 200, 2))
    paths = [str(save_single(sd, tmp_path / f"{n}.safetensors")) for n, sd in (("base", base), ("a", a), ("b", b))]
    res = CliRunner().invoke(app, ["consistency", *paths, "-q", "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.index("Side by side") < out.index("Overall (counts summed over tensors)")
    side = json.loads((tmp_path / "c.json").read_text())["tables"]["Side by side"]
    cell = next(r for r in side if r["figure"] == "Jaccard with b (magnitude-matched)")["a"]
    assert cell.startswith(f"{50 / 150:.3f} (")  # |A∩B| = 50 even entries below 100, |A∪B| = 100 + 100 - 50
    rollups = tmp_path / "r.csv"
    res = CliRunner().invoke(app, ["consistency", *paths, "-q", "--rollups-csv", str(rollups)])
    assert res.exit_code == 0, res.output
    text = rollups.read_text()
    assert "Side by side" not in text and "Pairs, overall" in text  # text cells stay out of the numbers' CSV


def test_a_null_drawn_several_times_says_how_many_draws_support_the_verdict() -> None:
    """--null-draws 3: each draw d is the null of a single-draw run with --seed d (recomputed here by three separate
    spectral runs); the control is the median of the three draws' figures, the word is read against it, and the
    support counts the draws whose own figure gives that word. The sentence says it."""
    base, ft = str(CK / "base"), str(CK / "sft")
    rep = full_report(
        base, [ft], labels=["sft"], k=K, null="random", null_draws=3, analyses=["spectral"], progress=False
    )
    side = rep.comparison()
    nulls_nss, nulls_angle = [], []
    for d in range(3):
        s = spectral(base, ft, k=K, null="random", seed=d, progress=False)
        df = s.analysed()
        stable = df[df["angles"] == "ok"]
        nulls_nss.append(float(df["nss_null"].median()))
        nulls_angle.append(
            max(float(stable["angle_u_max_deg_null"].max()), float(stable["angle_v_max_deg_null"].max()))
        )
        if d == 0:  # the CSV's null columns are the first draw's, as in a one-draw run
            mine = rep.spectral["sft"].analysed()
            assert mine["nss_null"].tolist() == pytest.approx(df["nss_null"].tolist(), rel=1e-12)
    null_words = ("below null", "as null", "above null")
    for label, nulls in ((NSS, nulls_nss), (ANGLE, nulls_angle)):
        row = side.rows[label]["sft"]
        control = sorted(nulls)[1]  # the median of three
        assert row.control == pytest.approx(control, rel=1e-12)
        word = _word(row.value / control, 0.02, null_words)
        assert row.word == word
        agree = sum(_word(row.value / n, 0.02, null_words) == word for n in nulls)
        assert row.support == (agree, 3)
        assert side.table().frame.loc[label, "sft"].endswith(f"{word} in {agree}/3 draws")
    text = " ".join(rep.verdict())
    assert "3 random draws per matrix, seeds 0 to 2" in text and "of 3 draws" in text
    assert rep.header["null_draws"] == "3 (seeds 0 to 2)"


def test_null_draws_without_a_random_null_is_refused() -> None:
    from ckptdiff.errors import InputError

    with pytest.raises(InputError, match=r"--null-draws .* add --null random"):
        spectral(str(CK / "base"), str(CK / "sft"), null_draws=2, progress=False)


def test_spectral_says_in_how_many_draws_its_reading_holds() -> None:
    """The spectral command's own summary: one draw says another seed can move it; three draws count the draws
    whose median ratios fall on the same sides of 1 as the first draw's (recounted here from the per-draw nulls)."""
    base, ft = str(CK / "base"), str(CK / "sft")
    one = spectral(base, ft, null="random", progress=False)
    assert any("another --seed can move it" in line for line in one.report().summary)
    three = spectral(base, ft, null="random", null_draws=3, progress=False)
    df = three.analysed().set_index("tensor")
    sides = []
    for d in range(3):
        drawn = spectral(base, ft, null="random", seed=d, progress=False).analysed().set_index("tensor")
        nss = float((df["nss"] / drawn["nss_null"]).dropna().median())
        u = float((df["angle_u_max_deg"] / drawn["angle_u_max_deg_null"]).dropna().median())
        v = float((df["angle_v_max_deg"] / drawn["angle_v_max_deg_null"]).dropna().median())
        sides.append((nss < 1, u < 1 and v < 1))
    agree = sum(s == sides[0] for s in sides)
    assert any(
        f"The same reading in {agree} of 3 draws of the null (seeds 0 to 2)." in line for line in three.report().summary
    )
