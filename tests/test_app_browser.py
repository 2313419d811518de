"""The web app in a real headless Chromium: upload a photo, wait for the caption, rate and
correct it, and check the feedback reached SQLite. Saves a screenshot (to docs/app.png when
CAPTIONER_SCREENSHOT=docs/app.png is set)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium browser installed (Debian: apt-get install "
                                                          "chromium); .ci/run installs it")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    pytest.importorskip("streamlit")
    port = free_port()
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"db": "feedback.db", "experiment": {"name": "web", "variants": [
        {"name": "default", "checkpoint": "default"}]}}))
    proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "app", "--port", str(port), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the app did not start: " + proc.stdout.read().decode()[-2000:]) from None
                time.sleep(0.5)
        yield url, tmp_path / "feedback.db"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the streamlit process it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 10
        while time.time() < deadline:  # wait for the whole group (streamlit too) to be gone
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(proc.pid, signal.SIGKILL)


def test_upload_caption_attention_and_feedback_in_a_real_browser(app_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    url, db = app_url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.locator('input[type="file"]').wait_for(state="attached", timeout=60_000)
            page.locator('input[type="file"]').set_input_files(str(REPO / "examples" / "cat.jpg"))
            caption = page.locator("#caption-text")
            caption.wait_for(timeout=90_000)
            text = caption.inner_text().strip()
            assert len(text.split()) >= 3 and text == text.lower()
            # one attention overlay per word, each captioned "word (peak)"
            words = text.split()
            images = page.locator('[data-testid="stImage"]')
            deadline = time.time() + 30
            while images.count() < len(words) + 1 and time.time() < deadline:
                page.wait_for_timeout(250)
            assert images.count() == len(words) + 1  # the photo, then one overlay per word
            for word in set(words):
                assert page.get_by_text(f"{word} (0.").count() >= 1
            page.locator('[data-testid="stRadio"]').get_by_text("4", exact=True).click()  # rating 4
            page.get_by_label("Corrected caption").fill("a cat sitting on a chair")
            page.get_by_role("button", name="Send feedback").click()
            page.get_by_text("feedback stored").wait_for(timeout=30_000)
            shot = os.environ.get("CAPTIONER_SCREENSHOT") or str(tmp_path / "app.png")
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
    assert os.path.getsize(shot) > 20_000
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT c.caption, c.source, f.rating, f.correction FROM feedback f "
                           "JOIN captions c ON c.id = f.caption_id").fetchall()
    assert rows == [(text, "app", 4, "a cat sitting on a chair")]
