"""Figures (SVG) and the self-contained HTML page of ``ckptdiff report``, on tiny checkpoints with known changes."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from factory import bump_ulps, llama_like, save_single

from ckptdiff.analyses.full import FullReportResult, full_report
from ckptdiff.render.figures import Figure, figures
from ckptdiff.render.html import to_html

HOSTILE_TENSOR = "model.layers.1.mlp.<script>alert('tensor')</script>.weight"
EXTRA_TENSOR = 'extra.<img src=x onerror="alert(1)">'
LABELS = ["<script>alert(1)</script>", "two & <b>bold</b> $\\frac{1$"]  # $…$ must not parse as mathtext
PER_RUN = ("sparsity_heatmap", "sparsity_ulp", "principal_overlap", "spectral_drift")
CROSS_RUN = ("consistency_jaccard", "consistency_consensus")
SVG = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


def _fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every matrix: a quarter of its entries 1 ULP up, some further; the hostile matrix replaced outright."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if t.ndim != 2:
            out[name] = t
            continue
        n = t.numel()
        shared = torch.arange(0, n // 4)  # both runs change these: consistency above chance
        own = torch.randperm(n, generator=g)[: n // 8]
        moved = bump_ulps(t, torch.cat([shared, own]).unique(), 1)
        out[name] = bump_ulps(moved, torch.arange(n // 4, n // 4 + n // 16), 20 + seed)
    out[HOSTILE_TENSOR] = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("html")
    base = llama_like(layers=2, d=16, ff=32, vocab=50)
    base[HOSTILE_TENSOR] = torch.randn(16, 16, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    ft1, ft2 = _fine_tune(base, 1), _fine_tune(base, 2)
    ft1[EXTRA_TENSOR] = torch.ones(4, dtype=torch.bfloat16)  # only in one fine-tune: a structural finding
    base_path = save_single(base, root / "b<i>x<i>" / "model.safetensors")
    return base_path, [save_single(ft1, root / "ft1.safetensors"), save_single(ft2, root / "ft2.safetensors")]


@dataclass(frozen=True)
class Built:
    report: FullReportResult
    figs: list[Figure]
    page: str
    sections: list[tuple[str, str]]  # (heading, report title)


@pytest.fixture(scope="module")
def full(ckpts: tuple[Path, list[Path]]) -> Built:
    base, fts = ckpts
    report = full_report(base, fts, labels=LABELS, k=4, svd="exact", progress=False)
    figs = figures(report)
    sections = [(heading, rep.title) for heading, rep in report.sections()]
    return Built(report, figs, to_html(report, figs), sections)


class _Page(HTMLParser):
    """Start tags with their attributes, and the text of each h2."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2[-1] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _check_svg(fig: Figure) -> None:
    """Parseable, standalone, nothing outside itself referenced, every internal reference resolved."""
    root = ET.fromstring(fig.svg.encode("utf-8"))
    assert root.tag == f"{SVG}svg"
    assert "<!DOCTYPE" not in fig.svg and "<metadata" not in fig.svg and "<script" not in fig.svg.lower()
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    assert all(i.startswith(f"{fig.name}-") for i in ids), "ids are prefixed with the figure's name"
    for el in root.iter():
        for key, value in el.attrib.items():
            if key in (XLINK_HREF, "href"):
                assert value.startswith(("#", "data:image/png;base64,")), (fig.name, value)
                if value.startswith("#"):
                    assert value[1:] in ids, (fig.name, value)
            assert "http:" not in value and "https:" not in value, (fig.name, key, value)
            for ref in re.findall(r"url\(([^)]*)\)", value):
                assert ref.startswith("#") and ref[1:] in ids, (fig.name, ref)


def test_every_expected_figure_is_present_and_valid_svg(full: Built) -> None:
    report, figs = full.report, full.figs
    names = [f.name for f in figs]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name), name
    for run in report.runs:
        for kind in PER_RUN:
            mine = [f for f in figs if f.run == run and f.name.startswith(kind)]
            assert len(mine) == 1, (run, kind, names)
    assert [f.name for f in figs if f.analysis == "consistency"] == list(CROSS_RUN)
    for fig in figs:
        assert fig.title and fig.caption
        _check_svg(fig)
    heatmap = next(f for f in figs if f.name.startswith("sparsity_heatmap"))
    assert "baseline" in next(f for f in figs if f.name.startswith("principal_overlap")).caption
    assert "magnitude-matched" in next(f for f in figs if f.name == "consistency_jaccard").caption
    assert "independent" in next(f for f in figs if f.name == "consistency_consensus").caption
    assert "layer" in heatmap.caption


def test_html_is_self_contained_and_has_every_section(full: Built) -> None:
    report, figs, page = full.report, full.figs, full.page
    parsed = _parse(page)
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags and "img" not in tags
    for _, attrs in parsed.tags:
        for key in ("src", "href", "xlink:href", "action", "srcset"):
            value = attrs.get(key)
            if value is not None:
                assert not re.search(r"https?://", value), (key, value)
                assert value.startswith(("#", "data:")), (key, value)
    assert "@import" not in page and "url(http" not in page
    headings = [h for h, _ in full.sections]
    assert len(headings) == 3 * len(report.runs) + 1
    for heading in headings:
        assert heading in parsed.h2
    assert "Inputs and settings" in parsed.h2
    assert tags.count("svg") == len(figs)
    for fig in figs:
        assert f'id="fig-{fig.name}"' in page
    # each figure sits in its own section: between that section's heading and the next one
    starts = [page.index(f"<h2>{html.escape(h)}</h2>") for h in headings] + [len(page)]
    for i, key in enumerate(report.section_keys()):
        chunk = page[starts[i] : starts[i + 1]]
        mine = [f for f in figs if (f.analysis, f.run) == key]
        assert mine, key
        assert all(f'id="fig-{f.name}"' in chunk for f in mine), key
    assert {f.analysis for f in figs} == {"comparison", "sparsity", "principal", "spectral", "consistency"}
    # the figures that draw every fine-tune together sit with the comparison table, before the first section
    assert all(page.index(f'id="fig-{f.name}"') < starts[0] for f in figs if f.analysis == "comparison")
    assert 'id="fig-consistency_jaccard"' in page[starts[-2] :]
    # numbers formatted as the Markdown tables format them
    assert "0.5000" in page and "<details>" in page


def test_hostile_labels_and_names_are_escaped(full: Built) -> None:
    figs, page = full.figs, full.page
    assert "<script" not in page.lower()
    assert "<img" not in page.lower() and "<b>bold" not in page and "<i>x" not in page
    assert html.escape(LABELS[0]) in page and html.escape(LABELS[1]) in page
    assert html.escape(HOSTILE_TENSOR) in page
    assert html.escape(EXTRA_TENSOR) in page
    assert html.escape("b<i>x<i>") in page  # the base's path, in the header
    parsed = _parse(page)
    assert not any(t in ("script", "img", "b", "i") for t, _ in parsed.tags)
    for fig in figs:
        assert "<script" not in fig.svg.lower()
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", fig.name)


def test_only_what_ran_is_drawn_and_output_is_deterministic(ckpts: tuple[Path, list[Path]]) -> None:
    base, fts = ckpts
    report = full_report(base, fts[:1], analyses=["sparsity"], progress=False)
    figs = figures(report)
    assert [f.name for f in figs] == ["sparsity_heatmap", "sparsity_ulp"]  # one fine-tune: no run suffix
    assert [f.svg for f in figures(report)] == [f.svg for f in figs]
    assert "dc:date" not in figs[0].svg
    page = to_html(report, figs)
    parsed = _parse(page)
    assert parsed.h2 == ["What happened", "Contents", "Sparsity", "Inputs and settings", "Glossary"]


def test_layerless_and_unchanged_checkpoints_omit_figures(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = {
        "encoder.weight": torch.randn(24, 16, generator=g).to(torch.bfloat16),
        "decoder.weight": torch.randn(16, 24, generator=g).to(torch.bfloat16),
        "head.bias": torch.randn(16, generator=g).to(torch.bfloat16),
    }
    ft = dict(base, **{"encoder.weight": bump_ulps(base["encoder.weight"], torch.arange(0, 200), 1)})
    b = save_single(base, tmp_path / "base.safetensors")
    same = save_single(base, tmp_path / "same.safetensors")
    moved = save_single(ft, tmp_path / "moved.safetensors")
    report = full_report(b, [moved, same], k=4, svd="exact", progress=False)
    figs = figures(report)
    names = {f.name for f in figs}
    # no layers: no heatmap, no per-layer lines; the unchanged run has no ULP histogram
    assert names == {"sparsity_ulp_moved", "consistency_jaccard", "consistency_consensus"}
    for fig in figs:
        _check_svg(fig)
    page = to_html(report, figs)
    parsed = _parse(page)
    for heading, _ in report.sections():
        assert heading in parsed.h2


def test_page_renders_in_a_headless_browser(full: Built, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH to render the page with")
    page = full.page
    index = tmp_path / "index.html"
    index.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--screenshot={shot}"]
    cmd += ["--window-size=1280,2000", f"--user-data-dir={tmp_path / 'profile'}", index.as_uri()]
    try:
        subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("the headless browser did not finish within 90 s")
    assert shot.exists()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a blank 1280x2000 page compresses to a few KB


def test_wide_tables_break_headers_at_underscores_with_the_name_in_a_tooltip(full: Built) -> None:
    """Principal-overlap's and spectral's per-module tables fit the 70 rem page instead of scrolling: long column
    names break after each underscore, and the whole name is the header's tooltip (issue 23 item 19)."""
    page = full.page
    heads = re.findall(r'<th scope="col"[^>]*>.*?</th>', page)
    assert heads and all(' title="' in h for h in heads)
    wanted = '<th scope="col" class="num" title="ratio_principal_magnitude">ratio_<wbr>principal_<wbr>magnitude</th>'
    assert wanted in heads or wanted.replace(' class="num"', "") in heads
    assert re.search(r"thead th \{[^}]*white-space: normal", page)
