"""Make docs/img/report.png: a screenshot of the HTML report that `ckptdiff report` writes for the shipped examples.

Usage, from anywhere (needs the package installed, and Chromium: `apt-get install chromium`)::

    python docs/make_screenshot.py

It runs ``ckptdiff report examples/checkpoints/base examples/checkpoints/rl_seed1 examples/checkpoints/rl_seed2
--k 16`` into a temporary folder, hides the settings table (a page-long list of paths and versions) in a copy of
``index.html``, takes a headless Chromium screenshot of the top of that page (title, contents, the first sparsity
section with its figures) and stores it as a 256-colour PNG. Nothing else on the page is changed.
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
CHECKPOINTS = ("examples/checkpoints/base", "examples/checkpoints/rl_seed1", "examples/checkpoints/rl_seed2")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
HIDE_SETTINGS = "<style>#inputs { display: none; }</style>\n</head>"
WINDOW = "1280,1200"


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
    cmd = [sys.executable, "-m", "ckptdiff", "report", *CHECKPOINTS, "-o", str(out), "--k", "16", "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out / "index.html"


def page_to_shoot(index: Path) -> Path:
    """A copy of the report page with the settings table hidden, beside it (so relative links still resolve)."""
    html = index.read_text(encoding="utf-8")
    if 'id="inputs"' not in html or "</head>" not in html:
        sys.exit("make_screenshot: the report page has no settings section (id=inputs) to hide: update this script")
    shot = index.with_name("screenshot.html")
    shot.write_text(html.replace("</head>", HIDE_SETTINGS, 1), encoding="utf-8")
    return shot


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
        page = page_to_shoot(write_report(Path(tmp)))
        raw = Path(tmp) / "raw.png"
        screenshot(browser, page, raw)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        compress(raw, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
