"""Make docs/img/report.png: a screenshot of the HTML report that `ckptdiff report` writes for the shipped examples.

Usage, from anywhere (needs the package installed, and Chromium: `apt-get install chromium`)::

    python docs/make_screenshot.py

It runs ``ckptdiff report examples/checkpoints/base examples/checkpoints/rl_seed1 examples/checkpoints/rl_seed2
examples/checkpoints/sft --k 4 --null random`` into a temporary folder, takes a headless Chromium screenshot of the
top of ``index.html`` (the title, the verdict sentences, the comparison table of the three fine-tunes) and stores it
as a 256-colour PNG. The page is shot as written (the settings are at its end since the verdict came first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "report.png"
CHECKPOINTS = (
    "examples/checkpoints/base",
    "examples/checkpoints/rl_seed1",
    "examples/checkpoints/rl_seed2",
    "examples/checkpoints/sft",
)
SETTINGS = ("--k", "4", "--null", "random")  # k = 4: the examples' 128-wide matrices have stable angles there
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1280,1000"


def find_browser(given: str | None) -> str:
    """The Chromium executable: the one given, else the first of BROWSERS on PATH."""
    for name in (given,) if given else BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"make_screenshot: no Chromium found (tried {given or ', '.join(BROWSERS)}): apt-get install chromium")


def write_report(folder: Path) -> Path:
    """Run `ckptdiff report` on the shipped checkpoints (paths relative to the repo, as the header shows them)."""
    out = folder / "report"
    cmd = [sys.executable, "-m", "ckptdiff", "report", *CHECKPOINTS, "-o", str(out), *SETTINGS, "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out / "index.html"


def screenshot(browser: str, page: Path, png: Path) -> None:
    """Headless Chromium screenshot of the page's first WINDOW pixels."""
    cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", f"--window-size={WINDOW}"]
    if os.geteuid() == 0:
        cmd.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    cmd += [f"--screenshot={png}", page.as_uri()]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not png.is_file():
        sys.exit(f"make_screenshot: {browser} wrote no screenshot")


def compress(raw: Path, out: Path) -> None:
    """Store the screenshot as a 256-colour PNG (a page of text and flat plots loses nothing visible)."""
    from PIL import Image  # Pillow comes with matplotlib, a ckptdiff dependency

    with Image.open(raw) as im:
        im.convert("RGB").quantize(colors=256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    browsers = ", ".join(BROWSERS)
    parser.add_argument("--browser", help=f"Chromium executable (default: the first of {browsers} on PATH)")
    parser.add_argument("-o", "--output", type=Path, default=OUT, help="PNG to write (default: docs/img/report.png)")
    args = parser.parse_args()
    browser = find_browser(args.browser)
    with tempfile.TemporaryDirectory(prefix="ckptdiff-shot-") as tmp:
        page = write_report(Path(tmp))
        raw = Path(tmp) / "raw.png"
        screenshot(browser, page, raw)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        compress(raw, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
