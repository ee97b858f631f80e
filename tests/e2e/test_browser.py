"""End to end in a real browser: Playwright drives Debian's Chromium against ``streamlit run app.py`` on 127.0.0.1.

The journey a user takes on the bundled SmolLM2: load it, compute one criterion, click a heatmap cell and see the
plan change, build the pruned model, chat with both, evaluate, export. A screenshot of every page is saved under
``test-output/screenshots/`` (the README shows copies from ``assets/screenshots/``).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
LONG = 420_000  # ms: work on 2 CPU cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get)")
    port = _free_port()
    env = {**os.environ, "PRUNEVIZ_MODEL": "bundled", "HF_HUB_OFFLINE": "1",
           "PRUNEVIZ_EXPORT_DIR": str(tmp_path_factory.mktemp("exports"))}
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not become healthy in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1800})
        pg.set_default_timeout(LONG)
        pg.goto(server)
        idle(pg)
        yield pg
        browser.close()


def idle(page) -> None:
    """Wait until Streamlit's script run is over (its own e2e tests wait on this attribute)."""
    page.wait_for_timeout(600)
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(state="attached",
                                                                                       timeout=LONG)
    page.wait_for_timeout(400)


def nav(page, name: str) -> None:
    page.locator("[data-testid='stTopNavLink']", has_text=name).first.click()
    idle(page)


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def no_exceptions(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.locator("body").inner_text()[:2000]


def plan_text(page) -> str:
    return page.get_by_text(re.compile(r"^Plan:")).first.inner_text()


def test_user_journey(page):
    page.get_by_text("Prunable units").first.wait_for(timeout=LONG)  # the model page shows the unit summary
    body = page.locator("body").inner_text()
    assert "SmolLM2" in body and "30 blocks, 9 query heads (3 KV groups of 3)" in body
    shot(page, "1-model")
    no_exceptions(page)

    nav(page, "Importance")
    page.get_by_role("button", name="Compute importance").click()  # the default criterion
    idle(page)
    page.locator("[data-testid='stPlotlyChart']").first.wait_for()
    shot(page, "2-importance")
    no_exceptions(page)

    nav(page, "Prune")
    before = plan_text(page)
    plot = page.locator("[data-testid='stPlotlyChart']").first
    box = plot.locator(".nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * (5 / 6), box["y"] + box["height"] * (10.5 / 30))  # a KV-group cell
    idle(page)
    after = plan_text(page)
    assert after != before, (before, after)
    shot(page, "3-prune")
    page.get_by_role("button", name="Build the pruned model").click()
    idle(page)
    no_exceptions(page)

    nav(page, "Chat")
    page.get_by_placeholder("Ask both models…").fill("What is a Python list?")
    page.keyboard.press("Enter")
    idle(page)
    replies = page.locator("[data-testid='stChatMessage']")
    assert replies.count() >= 2
    assert "tokens/s" in page.locator("body").inner_text()
    shot(page, "4-chat")
    no_exceptions(page)

    nav(page, "Evaluate")
    page.get_by_role("button", name="Evaluate dense and pruned").click()
    idle(page)
    assert "PPL protocol" in page.locator("body").inner_text()
    shot(page, "5-evaluate")
    no_exceptions(page)

    nav(page, "Export")
    page.get_by_role("button", name="Export checkpoint").click()
    idle(page)
    body = page.locator("body").inner_text()
    assert re.search(r"Verified: reloaded in \w+ format, max \|Δ logit\| 0\b", body), body[:2000]
    shot(page, "6-export")
    no_exceptions(page)
