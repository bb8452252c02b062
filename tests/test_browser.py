"""The book as a reader's browser shows it: formulas typeset offline, nothing fetched remotely.

Headless Chromium renders pages of the built book (the session fixture ``html``) with every
host name unresolvable and a proxy on a dead local port, so no request can leave the machine,
and writes its network log. The test reads the DOM after MathJax ran: its output elements must
be there and no TeX delimiter may be left in the visible text; the log must show no request of
the page to anything but local files. A second check (tests/layout_check.js) reads every page
of the book at 1280 px and names each table, figure or display equation that is cut or runs
out of the text column: a wide table may scroll in a box of its own, an equation must fit.
Where Chromium is not installed (scripts/setup.sh installs it with apt-get where it can), the
tests are skipped with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from test_book import toc_files

from kalm.config import REPO_ROOT

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (scripts/setup.sh installs it with apt-get where available)",
)

PAGES = ("intro", "method")
BOOK_PAGES = tuple(toc_files(yaml.safe_load((REPO_ROOT / "book" / "_toc.yml").read_text())))
"""Every page of the book, as its table of contents lists it (``experiments/kgc`` …)."""
LAYOUT_WIDTH = 1280  # a laptop's browser window: the column is narrowest beside both sidebars
LAYOUT_CHECK = Path(__file__).with_name("layout_check.js")
PIXEL = "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"  # a 1x1 GIF
VIRTUAL_TIME_MS = 10_000  # page time granted to MathJax before the DOM is dumped


def dead_port() -> int:
    """A local TCP port with nothing listening on it (the proxy every request would go to)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(url: str, workdir: Path, *, width: int = 1280) -> tuple[str, list[str]]:
    """The DOM of `url` in a window `width` pixels wide after the virtual-time budget, and the
    URLs the page itself requested."""
    netlog = workdir / "netlog.json"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={workdir / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--proxy-server=http://127.0.0.1:{dead_port()}",
        f"--log-net-log={netlog}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        f"--window-size={width},1000",
        "--dump-dom",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and "<html" in proc.stdout, (
        f"chromium failed on {url} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    return proc.stdout, page_requests(netlog)


def page_requests(netlog: Path) -> list[str]:
    """URLs of the network requests a page made (the browser's own housekeeping excluded).

    Requests that Chromium starts for itself (update checks, account probes) carry the
    initiator "not an origin"; everything a page asks for carries the page's origin.
    """
    text = netlog.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    assert log["events"], f"{netlog}: the network log is empty"
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start_job
        and "url" in e.get("params", {})
        and e["params"].get("initiator") != "not an origin"
    ]


def off_machine(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file:", "data:", "blob:", "about:"))]


def visible_text(dom: str) -> str:
    """Text a reader sees: no scripts, styles, or MathJax's hidden accessibility copy."""
    for tag in ("script", "style", "mjx-assistive-mml"):
        dom = re.sub(rf"<{tag}\b.*?</{tag}>", " ", dom, flags=re.DOTALL | re.IGNORECASE)
    return re.sub(r"<[^>]+>", " ", dom)


@pytest.mark.parametrize("name", PAGES)
def test_page_typesets_its_formulas_offline(html: Path, name: str, tmp_path: Path) -> None:
    source = (html / f"{name}.html").read_text(encoding="utf-8")
    formulas = source.count('class="math notranslate nohighlight"')
    assert formulas > 0, f"{name}.html has no formula to check"
    dom, requests = render((html / f"{name}.html").as_uri(), tmp_path)
    typeset = dom.count("<mjx-container")
    assert typeset >= formulas, (
        f"{name}: MathJax typeset {typeset} of {formulas} formulas (is the local copy loaded?)"
    )
    text = visible_text(dom)
    raw = [m.group(0) for m in re.finditer(r"\\[(\[]|\$\$", text)]
    assert not raw, f"{name}: raw TeX delimiters left in the visible text: {raw[:5]}"
    assert not off_machine(requests), f"{name}: requests off the machine: {off_machine(requests)}"


def test_network_log_catches_a_remote_script(tmp_path: Path) -> None:
    """The request check can fail: a page with a CDN script is caught."""
    page = tmp_path / "remote.html"
    page.write_text(
        '<!DOCTYPE html><html><head><script src="https://cdn.example.org/x.js"></script>'
        "</head><body>remote</body></html>"
    )
    _, requests = render(page.as_uri(), tmp_path)
    assert off_machine(requests) == ["https://cdn.example.org/x.js"], requests


def layout_problems(page: Path, workdir: Path) -> list[str]:
    """What tests/layout_check.js finds on `page` at :data:`LAYOUT_WIDTH` pixels: tables,
    figures and display equations that are cut or run out of the content column.

    The script is put into a copy of the page beside it (so that its relative links still
    resolve), and reports in the DOM once MathJax has typeset the page.
    """
    copy = page.with_name(f".layout-{page.name}")
    script = f"<script>{LAYOUT_CHECK.read_text(encoding='utf-8')}</script>"
    html = page.read_text(encoding="utf-8")
    copy.write_text(html.replace("</body>", f"{script}</body>", 1), encoding="utf-8")
    try:
        dom, _ = render(copy.as_uri(), workdir, width=LAYOUT_WIDTH)
    finally:
        copy.unlink()
    found = re.search(r'<script type="application/json" id="kalm-layout">(.*?)</script>', dom)
    assert found, f"{page.name}: the layout check did not report (did the page load?)"
    report = json.loads(found.group(1))
    assert report["checked"] > 0 or "<table" not in html, f"{page.name}: nothing was checked"
    return list(report["found"])


@pytest.mark.parametrize("name", BOOK_PAGES)
def test_every_table_figure_and_equation_fits_its_column(
    html: Path, name: str, tmp_path: Path
) -> None:
    """At 1280 px no table, figure or display equation is cut or runs out of the text column;
    a wide one may scroll inside a box of its own that stays in the column."""
    found = layout_problems(html / f"{name}.html", tmp_path)
    assert not found, f"{name}.html at {LAYOUT_WIDTH} px:\n" + "\n".join(found)


def test_layout_check_finds_cut_and_overflowing_elements(tmp_path: Path) -> None:
    """The check can fail: a table cut by a box that hides overflow, equations wider than their
    box (hiding or scrolling) and an image out of the column are named; a wide table in a
    scrolling box is accepted."""
    wide = "<tr>" + "<td>a wide cell of text</td>" * 40 + "</tr>"
    page = tmp_path / "layout.html"
    page.write_text(
        "<!DOCTYPE html><html><body><article class='bd-article' style='width:600px'>"
        f"<section id='cut'><div style='overflow:hidden'><table id='t1'>{wide}</table></div>"
        "</section><section id='scrolls'><div style='overflow-x:auto'>"
        f"<table id='t2'>{wide}</table></div></section>"
        "<section id='eq'><div class='math' id='m1' style='overflow:hidden;white-space:nowrap'>"
        f"{'x + ' * 400}y</div>"
        "<div class='math' id='m2' style='overflow-x:auto;white-space:nowrap'>"
        f"{'x + ' * 400}y</div></section>"
        "<section id='img'><img id='i1' style='width:900px;height:10px' alt='a plot' "
        f"src='data:image/gif;base64,{PIXEL}'></section>"
        "</article></body></html>",
        encoding="utf-8",
    )
    found = layout_problems(page, tmp_path)
    named = sorted(re.match(r"\w+#(\w+)", line).group(1) for line in found)  # type: ignore[union-attr]
    assert named == ["i1", "m1", "m2", "t1"], found  # an equation may not scroll
    assert any("section #cut" in line and "cut at" in line for line in found), found
