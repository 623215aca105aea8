"""The report in a real browser: headless Chromium renders it with no console messages."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from flipsearch import RunConfig, run

pytestmark = pytest.mark.slow

# Flags needed on a closed network: no background connections, no sandbox (root), no GPU.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1280,900",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def open_in_chromium(page: Path, screenshot: Path) -> tuple[list[str], str]:
    """Screenshot a page and dump its DOM; return the console messages and the DOM."""
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        shot = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={screenshot}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    console = [line for line in (shot.stderr + dom.stderr).splitlines() if ":CONSOLE" in line]
    return console, dom.stdout


def test_console_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>notAFunction();</script></body></html>")
    console, _ = open_in_chromium(page, tmp_path / "broken.png")
    assert any("notAFunction" in line for line in console)


def test_report_renders_in_chromium(tiny_model_dir, tmp_path):
    config = RunConfig(
        out=str(tmp_path / "run"),
        model=str(tiny_model_dir),
        limit=8,
        max_new_tokens=8,
        dtype="fp32",
        analysis_prompts=4,
    )
    result = run(config)
    screenshot = tmp_path / "report.png"
    console, dom = open_in_chromium(result.report_path, screenshot)
    assert console == []
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    assert 'id="leaderboard"' in dom and dom.count("<tr") > 10
    assert 'id="winner"' in dom and 'id="tokens"' in dom
    for csv in ("leaderboard.csv", "examples.csv", "categories.csv"):
        assert (result.out / csv).is_file()
