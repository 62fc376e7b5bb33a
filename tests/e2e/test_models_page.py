"""The dashboard's models page in a real headless Chromium (the API as `dicom-fusion api` runs it, its CSP
included): a signed-in viewer sees the two shipped model cards of the implicit routes with their documents.
With DICOM_FUSION_SCREENSHOTS=1 the page goes to docs/images/dashboard-models.png (the README shows it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import Browser
from PIL import Image

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.server import wait_for_port

pytestmark = [pytest.mark.e2e]

SHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard-models.png"
PASSWORD = "a long enough password"


def _cli(env: dict[str, str], cwd: Path, *args: str, stdin: str = "") -> None:
    res = subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", *args], env=env, input=stdin, cwd=cwd,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_viewer_reads_the_model_cards_in_the_browser(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DICOM_FUSION_CONFIG"}
    env.update({"DICOM_FUSION_DATA_DIR": str(tmp_path / "var"), "DICOM_FUSION_API__PORT": str(port),
                "DICOM_FUSION_API__TOKEN": "service-token-e2e"})
    _cli(env, tmp_path, "db", "upgrade")
    _cli(env, tmp_path, "users", "add", "vera", "--role", "viewer", "--name", "Vera Viewer", "--password-stdin",
         stdin=PASSWORD + "\n")
    with (tmp_path / "api.log").open("wb") as fh:
        api = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "api"], env=env, stdout=fh,
                               stderr=subprocess.STDOUT, cwd=tmp_path)
    browser = None
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        browser = Browser(tmp_path / "chromium")
        base = f"http://127.0.0.1:{port}"
        browser.goto(f"{base}/models")
        assert "/login" in browser.url
        browser.eval("document.getElementById('username').value = 'vera';"
                     f"document.getElementById('password').value = {json.dumps(PASSWORD)};")
        browser.submit_and_wait("document.getElementById('login').submit()")
        assert browser.url == f"{base}/models"
        models = browser.eval("[...document.querySelectorAll('section.model')].map(s => [s.dataset.model, "
                              "[...s.querySelectorAll('[data-route]')].map(r => r.dataset.route)])")
        assert models == [["dfusion-hybrid-demo", ["default"]], ["dfusion-ct-demo", ["chest-ct"]]]
        text = browser.eval("document.body.innerText")
        assert text.count("Not for clinical use.") == 2 and "Platt scaling" in text
        # the stylesheet applied under the CSP (an inline <style> allowed by hash): the two cards side by side
        tops = browser.eval("[...document.querySelectorAll('section.model')].map(s => s.getBoundingClientRect().top)")
        assert tops[0] == tops[1]
        if os.environ.get("DICOM_FUSION_SCREENSHOTS"):
            browser.screenshot(SHOT)  # 128 colours: the page is text on flat colours, a quarter of the bytes
            Image.open(SHOT).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(SHOT, optimize=True)
    finally:
        if browser is not None:
            browser.close()
        api.terminate()
        api.wait(timeout=30)
