"""The HTTP API and the dashboard on the first node of a real 3-process swarm (slow).

The OpenAI client gets exactly the tokens of ``idlefleet generate --bootstrap ... --chat``; the
dashboard, in Debian's headless Chromium driven by Playwright, loads without console errors, lists
every peer, and drops a peer that leaves.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from idlefleet.node.cli.swarm import Swarm
from tests.test_swarm_pipeline import wait_coverage

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
TOKENS = 12
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Three node processes; the first serves the API on a free port (its status file says which)."""
    swarm = Swarm(3, tmp_path_factory.mktemp("swarm"), first_args=("--api-port", "0"),
                  vehicles=[f"sim:parked:seed={i}" for i in range(3)])
    try:
        swarm.start()
        wait_coverage(swarm, 1)
        yield swarm
    finally:
        codes = swarm.stop()
        assert all(swarm.nodes[i].proc.poll() is not None for i in codes)


def api_url(swarm: Swarm) -> str:
    url: str = (swarm.nodes[0].status() or {})["api_url"]
    return url


def wait_api_ready(url: str, timeout: float = 60.0) -> None:
    """Until a generation can start: the client's model is loaded and the fleet covers it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = httpx.post(f"{url}/v1/completions", timeout=30,
                           json={"model": "default", "prompt": "Hi", "max_tokens": 1})
        if reply.status_code == 200:
            return
        assert reply.status_code == 503, reply.text
        time.sleep(0.5)
    raise AssertionError(f"the API never became ready: {reply.text}")


async def test_openai_client_on_a_swarm_equals_generate_chat(swarm: Swarm) -> None:
    boot = (swarm.nodes[0].status() or {})["multiaddr"]
    proc = await trio.run_process(
        [sys.executable, "-m", "idlefleet.node.cli", "generate", "--bootstrap", boot, QUESTION, "--chat",
         "--json", "--max-new-tokens", str(TOKENS)], capture_stdout=True, env=swarm.env)
    expected = json.loads(proc.stdout)
    url = api_url(swarm)
    await trio.to_thread.run_sync(wait_api_ready, url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": QUESTION}]

    def whole() -> Any:
        return client.chat.completions.create(model="default", messages=messages, max_tokens=TOKENS,
                                              temperature=0, extra_body={"return_token_ids": True})

    def stream() -> tuple[list[int], str]:
        ids: list[int] = []
        text = ""
        for chunk in client.chat.completions.create(model="default", messages=messages, max_tokens=TOKENS,
                                                    temperature=0, stream=True,
                                                    extra_body={"return_token_ids": True}):
            for c in chunk.choices:
                ids += c.model_extra.get("token_ids") or []
                text += c.delta.content or ""
        return ids, text

    done = await trio.to_thread.run_sync(whole)
    assert done.choices[0].model_extra["token_ids"] == expected["new_ids"]
    assert done.choices[0].message.content == expected["text"]
    assert await trio.to_thread.run_sync(stream) == (expected["new_ids"], expected["text"])


def drive_dashboard(url: str, swarm: Swarm, profile: Path, screenshot: Path) -> list[str]:
    """Open the dashboard; check it lists every peer; stop node 2; check its row goes. Returns the
    console errors seen."""
    from playwright.sync_api import sync_playwright

    peers = {(n.status() or {})["peer_id"] for n in swarm.nodes}
    errors: list[str] = []
    rows = "Array.from(document.querySelectorAll('#peers tbody tr')).map(r => r.dataset.peerId)"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/", wait_until="load")
            page.wait_for_function(f"{rows}.length === 3", timeout=60_000)
            assert set(page.evaluate(rows)) == peers
            assert page.locator("#coverage > div").count() == 30
            assert page.text_content("#link") == "live"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"dashboard screenshot: {screenshot}")

            leaving = (swarm.nodes[2].status() or {})["peer_id"]
            swarm.nodes[2].proc.terminate()  # drains, publishes offline, exits
            page.wait_for_function(f"{rows}.length === 2", timeout=60_000)
            assert set(page.evaluate(rows)) == peers - {leaving}
            page.screenshot(path=str(screenshot.with_name("dashboard-after-leave.png")), full_page=True)
        finally:
            context.close()
    return errors


async def test_dashboard_in_headless_chromium_lists_peers_and_drops_one_that_leaves(
        swarm: Swarm, tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)")
    errors = await trio.to_thread.run_sync(
        drive_dashboard, api_url(swarm), swarm, tmp_path / "chromium-profile", tmp_path / "dashboard.png")
    assert errors == []
    assert (tmp_path / "dashboard.png").stat().st_size > 0
