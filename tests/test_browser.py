"""The book as a reader's browser shows it: formulas typeset offline, nothing fetched remotely.

Headless Chromium renders pages of the built book (the session fixture ``html``) with every
host name unresolvable and a proxy on a dead local port, so no request can leave the machine,
and writes its network log. The test reads the DOM after MathJax ran: its output elements must
be there and no TeX delimiter may be left in the visible text; the log must show no request of
the page to anything but local files. Where Chromium is not installed (scripts/setup.sh
installs it with apt-get where it can), the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (scripts/setup.sh installs it with apt-get where available)",
)

PAGES = ("intro", "method")
VIRTUAL_TIME_MS = 10_000  # page time granted to MathJax before the DOM is dumped


def dead_port() -> int:
    """A local TCP port with nothing listening on it (the proxy every request would go to)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(url: str, workdir: Path) -> tuple[str, list[str]]:
    """The DOM of `url` after the virtual-time budget, and the URLs the page itself requested."""
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
