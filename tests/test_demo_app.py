"""The served demo (issue 15): launched in this process on 127.0.0.1 (a free port), driven over its API with
``gradio_client`` and in a real headless Chromium with Playwright, which clicks generate, waits for both images,
reads the speedup as a number, checks the mask panel and saves a screenshot under ``outputs/test-artifacts/``.

Chromium is Debian's (``/usr/bin/chromium``; ``.ci/run`` installs it when missing); Playwright never downloads a
browser. The browser test is skipped, saying why, only where that executable is absent.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
"""Headless flags: without the background-networking ones Chromium's connections are refused on a closed network."""
SIDE_B = {"kernel_size": 5, "block_size": 64, "backend": "reference"}
"""A sparse 5x5 GNA window on tiny-flux's 16x16 grid, on the PyTorch reference (fast on a CPU)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    from demo_support import shared_comparer
    from diffaccel.demo.ui import build_app

    comparer = shared_comparer()
    loads = comparer.pipelines.loads
    app = build_app("tiny-flux", params_b=SIDE_B, comparer=comparer)
    app.loads_before = loads  # type: ignore[attr-defined]
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
               ssr_mode=False)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_api_with_gradio_client_errors_then_serves(served):
    from gradio_client import Client

    app, url = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="prompt must not be empty"):
        client.predict(model="tiny-flux", prompt="", api_name="/compare")
    with pytest.raises(Exception, match="tile: attention tiles need a video grid"):
        client.predict(model="tiny-flux", prompt="a fox", method_b="tile", steps=2, warmup=0, api_name="/compare")
    result = client.predict(model="tiny-flux", prompt="a fox", method_a="dense", params_a="{}", method_b="gna",
                            params_b='{"kernel_size": 5, "block_size": 64, "backend": "reference"}', seed=3, steps=2,
                            warmup=0, repeats=1, api_name="/compare")
    assert result["speedup"] > 0 and 10 < result["psnr"] < 80 and result["overheads_only"]
    assert result["b"]["method"] == "gna" and len(result["b"]["mask_layers"]) == 4
    assert all(0 < d < 1 for d in result["b"]["mask_layers"].values())
    assert app.handlers.comparer.pipelines.loads <= app.loads_before + 1  # loaded once at most, never per request


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's Chromium is not installed at {CHROMIUM} "
                    "(apt-get install -y chromium; .ci/run does it)")
def test_browser_generates_both_images_speedup_and_mask_panel(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, url = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo-tiny-flux.png"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#prompt textarea").fill("a red fox in the snow")
            page.locator("#generate").click()
            speedup = page.locator("#speedup textarea")
            expect(speedup).to_have_value(re.compile(r"^\d+\.\d+x"), timeout=180_000)
            value = float(speedup.input_value().split("x")[0])
            assert value > 0
            images = page.locator("#slider img")
            expect(images.first).to_be_visible(timeout=30_000)
            assert images.count() >= 2
            widths = images.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert len([w for w in widths if w > 0]) >= 2, widths
            expect(page.locator("#mask img").first).to_be_visible(timeout=30_000)
            expect(page.locator("#mask-density")).to_contain_text("density kept", timeout=30_000)
            assert page.locator("#heat img").first.is_visible()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert shot.stat().st_size > 10_000


def module_level_imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_demo_app_entry_and_cli_command():
    spec = importlib.util.spec_from_file_location("demo_app_entry", ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from diffaccel.demo.ui import build_app

    assert module.build_app is build_app
    # cli.py imports the command at import time: it must not pull gradio, torch or diffusers in (issue 16).
    heavy = {"gradio", "torch", "diffusers", "diffaccel.demo.ui", "diffaccel.demo.compare"}
    assert not module_level_imports(ROOT / "diffaccel" / "demo" / "command.py") & heavy
    assert not module_level_imports(ROOT / "diffaccel" / "demo" / "__init__.py")
    from typer.testing import CliRunner

    from diffaccel.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--model", "--port", "--host", "--share"):
        assert option in result.output
    bad = CliRunner().invoke(app, ["demo", "--port", "0"])
    assert bad.exit_code == 2
