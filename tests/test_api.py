"""The OpenAI-compatible HTTP API, its errors, metrics and dashboard data, over real HTTP.

The client is the official ``openai`` package (or raw ``httpx`` for bad requests), run in a worker
thread against Hypercorn serving the app on 127.0.0.1 in the test's trio loop.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from idlefleet.node.api.server import ApiConfig, ApiServer, FleetBackend, LocalBackend, serve_api
from idlefleet.node.cli.main import main
from idlefleet.node.client.config import ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.model import local
from idlefleet.node.runtime.node import open_node
from tests.test_pipeline import serving_fleet

QUESTION = "What is the capital of France?"
TOKENS = 12  # the answer ends with <|im_end|> after 8
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def chat_cli(tokenizer: Any, head: Any, whole_model: Any) -> dict[str, Any]:
    """What ``idlefleet generate --local QUESTION --chat --json`` prints (with the session's model)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(local, "load_local", lambda model: (tokenizer, head, whole_model))
        argv = ["generate", "--local", QUESTION, "--chat", "--json", "--max-new-tokens", str(TOKENS)]
        assert main(argv) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def local_url(nursery: trio.Nursery, client_model: ClientModel, whole_model: Any) -> str:
    server = ApiServer(LocalBackend(client_model, whole_model), ApiConfig(port=0))
    url: str = await nursery.start(serve_api, server)
    return url


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_openai_chat_equals_generate_chat_streaming_and_not(
        local_url: str, client_model: ClientModel, chat_cli: dict[str, Any], tokenizer: Any) -> None:
    expected = chat_cli
    client = openai_client(local_url)
    models = await in_thread(lambda: client.models.list())
    assert [m.id for m in models.data] == [client_model.model_id]
    messages = [{"role": "user", "content": QUESTION}]

    done = await in_thread(lambda: client.chat.completions.create(
        model=client_model.model_id, messages=messages, max_tokens=TOKENS, temperature=0,
        extra_body={"return_token_ids": True}))
    choice = done.choices[0]
    assert choice.model_extra["token_ids"] == expected["new_ids"]
    assert done.model_extra["prompt_token_ids"] == expected["prompt_ids"]
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == ("stop" if expected["new_ids"][-1] in tokenizer.stop_ids else "length")
    assert done.usage.prompt_tokens == len(expected["prompt_ids"])
    assert done.usage.completion_tokens == len(expected["new_ids"])

    def stream() -> tuple[list[int], str, list[Any]]:
        ids: list[int] = []
        text = ""
        finishes = []
        for chunk in client.chat.completions.create(
                model="default", messages=messages, max_tokens=TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"return_token_ids": True}):
            for c in chunk.choices:
                ids += c.model_extra.get("token_ids") or []
                text += c.delta.content or ""
                finishes.append(c.finish_reason)
            if chunk.usage is not None:
                finishes.append(chunk.usage.completion_tokens)
        return ids, text, finishes

    ids, text, finishes = await in_thread(stream)
    assert ids == expected["new_ids"]
    assert text == expected["text"]
    assert finishes[-2:] == [choice.finish_reason, len(expected["new_ids"])]


async def test_completions_stop_strings_and_usage(local_url: str, client_model: ClientModel) -> None:
    client = openai_client(local_url)
    plain = await in_thread(lambda: client.completions.create(
        model="default", prompt=PROMPT, max_tokens=5, temperature=0))
    assert plain.choices[0].text == " Paris.\n\nThe"  # as `idlefleet generate --local` prints
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 5

    stopped = await in_thread(lambda: client.completions.create(
        model="default", prompt=PROMPT, max_tokens=5, temperature=0, stop=["\n"]))
    assert stopped.choices[0].text == " Paris."
    assert stopped.choices[0].finish_reason == "stop"

    def stream() -> str:
        return "".join(c.choices[0].text for c in client.completions.create(
            model="default", prompt=PROMPT, max_tokens=5, temperature=0, stop=[".\n"], stream=True)
            if c.choices)

    assert await in_thread(stream) == " Paris"  # a stop string split over two tokens is never shown

    seeded = [await in_thread(lambda: client.completions.create(
        model="default", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=7)) for _ in range(2)]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text


def chat_body(**fields: Any) -> bytes:
    """A chat request body: a valid one, with ``fields`` replaced (None removes a field)."""
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (chat_body(model=None), 400, "missing_required_parameter"),
    (chat_body(model="gpt-4"), 404, "model_not_found"),
    (chat_body(messages=[]), 400, "invalid_value"),
    (chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value"),
    (chat_body(messages=[{"role": "user", "content": 5}]), 400, "invalid_type"),
    (chat_body(temperature=3), 400, "invalid_value"),
    (chat_body(temperature="hot"), 400, "invalid_type"),
    (chat_body(n=2), 400, "invalid_value"),
    (chat_body(max_tokens=10**6), 400, "context_length_exceeded"),
    (chat_body(messages=[{"role": "user", "content": "hi " * 9000}]), 400, "context_length_exceeded"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    (b"{" + b" " * (2 << 20) + b"}", 413, "body_too_large"),
])
async def test_bad_requests_get_openai_errors(local_url: str, body: bytes, status: int, code: str) -> None:
    reply = await in_thread(lambda: httpx.post(f"{local_url}/v1/chat/completions", content=body, timeout=30))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_unknown_paths_and_methods(local_url: str) -> None:
    async def get(path: str) -> httpx.Response:
        return await in_thread(lambda: httpx.get(f"{local_url}{path}", timeout=30))

    assert (await get("/v1/nothing")).status_code == 404
    wrong = await get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.NotFoundError):
        await in_thread(lambda: openai_client(local_url).completions.create(model="gpt-4", prompt="hi"))


async def test_fleet_not_ready_is_503_with_retry_after(
        tmp_path: Path, nursery: trio.Nursery, client_model: ClientModel) -> None:
    config = NodeConfig(key_file=tmp_path / "alone.key", vehicle="sim:parked", consent=False)
    async with open_node(config) as node:  # nobody hosts any block
        server = ApiServer(FleetBackend(node, FleetClient(node, client_model)), ApiConfig(port=0))
        url = await nursery.start(serve_api, server)
        reply = await in_thread(lambda: httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "default", "prompt": PROMPT, "max_tokens": 3}))
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "5"
        assert reply.json()["error"]["code"] == "fleet_not_ready"
        with pytest.raises(openai.APIStatusError) as raised:
            await in_thread(lambda: openai_client(url).chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}]))
        assert raised.value.status_code == 503
        nursery.cancel_scope.cancel()


async def test_fleet_api_on_a_serving_node_metrics_and_disconnect(
        tmp_path: Path, nursery: trio.Nursery, client_model: ClientModel, local_greedy: Any) -> None:
    """The API on a node that hosts blocks [0, 10) itself (a loopback hop) generates like local
    greedy decoding; /metrics moves; a streaming client that hangs up frees every session. (Short
    prompts: three serving nodes share this process. The chat template is checked above and
    across real processes in test_api_swarm.py.)"""
    expected_ids = list(local_greedy(PROMPT, TOKENS))
    prompt_ids = client_model.tokenizer.encode(PROMPT)
    async with serving_fleet(tmp_path, 3) as nodes:
        server = ApiServer(FleetBackend(nodes[0], FleetClient(nodes[0], client_model)), ApiConfig(port=0))
        url = await nursery.start(serve_api, server)
        await FleetClient(nodes[0], client_model).wait_ready(timeout=60)
        before = metric_values(await in_thread(lambda: httpx.get(f"{url}/metrics", timeout=30).text))
        assert before["idlefleet_peers_known", ()] == 2
        assert before["idlefleet_hosted_blocks", (("end", "10"), ("model", client_model.model_id),
                                                  ("start", "0"))] == 10

        done = await in_thread(lambda: openai_client(url).completions.create(
            model="default", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
            extra_body={"return_token_ids": True}))
        assert done.choices[0].model_extra["token_ids"] == expected_ids
        assert done.choices[0].text == client_model.tokenizer.decode(expected_ids, skip_special=True)

        after = metric_values(await in_thread(lambda: httpx.get(f"{url}/metrics", timeout=30).text))
        steps = len(expected_ids)  # one prefill step + one per further token
        for name in ("idlefleet_steps_served_total", "idlefleet_step_latency_seconds_count"):
            assert after[name, ()] - before.get((name, ()), 0) == steps, name
        assert (after["idlefleet_tokens_served_total", ()] - before["idlefleet_tokens_served_total", ()]
                == len(prompt_ids) + steps - 1)
        assert after["idlefleet_api_completion_tokens_total", ()] == steps
        for role in ("client", "server"):
            assert after["idlefleet_stage_bytes_total", (("direction", "sent"), ("role", role))] > 0
        assert after["idlefleet_sessions_open", ()] == 0
        assert after["idlefleet_gossip_accepted_total", ()] > 0  # the other nodes' records
        assert after["idlefleet_node_state", (("reason", ""), ("state", "online"))] == 1

        fleet = await in_thread(lambda: httpx.get(f"{url}/api/fleet", timeout=30).json())
        assert sorted(p["peer_id"] for p in fleet["peers"]) == sorted(n.peer_id for n in nodes)
        assert fleet["coverage"] == [1] * 30

        # A streaming client reads two pieces of text, then hangs up.
        servers = [n.hosting.server for n in nodes]

        def read_then_hang_up() -> float:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                    "model": "default", "prompt": "Once upon a time,", "max_tokens": 200, "temperature": 0,
                    "stream": True}) as reply:
                pieces = 0
                for line in reply.iter_lines():
                    pieces += line.startswith("data: {")
                    if pieces == 3:
                        assert sum(s.active_sessions for s in servers) == 3  # one per hop
                        break
            return time.monotonic()

        hung_up = await in_thread(read_then_hang_up)
        while sum(s.active_sessions for s in servers) and time.monotonic() - hung_up < 5:
            await trio.sleep(0.02)
        freed_s = time.monotonic() - hung_up
        print(f"sessions freed {freed_s:.2f}s after the client hung up")
        assert sum(s.active_sessions for s in servers) == 0
        assert freed_s < 2.0
        final = metric_values(await in_thread(lambda: httpx.get(f"{url}/metrics", timeout=30).text))
        assert final["idlefleet_api_generations_total", (("outcome", "cancelled"),)] == 1
        nursery.cancel_scope.cancel()
