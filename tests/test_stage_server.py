"""The stage server over real libp2p streams: sessions, and every kind of bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.model.stage import Stage, load_stage
from idlefleet.node.serve.server import ServerConfig, StageServer
from idlefleet.p2p.errors import NetworkError, RemoteError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.policy import Decision
from idlefleet.protocols.serving import Serving, serving_decision
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden

MAX_LEN = 64


@pytest.fixture(scope="module")
def two_blocks(model_file: Any) -> Stage:
    return load_stage(model_file, 4, 6)


@asynccontextmanager
async def served(stage: Stage, config: ServerConfig,
                 gate: Callable[[], Serving] | None = None) -> AsyncIterator[tuple[StageServer, Host, str]]:
    server = StageServer(stage, config, gate=gate)
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await client.connect(host.multiaddrs()[0])
        yield server, client, peer


async def open_session(client: Host, peer: str, stage: Stage, **changes: Any) -> FramedStream:
    fs = await client.open_stream(peer, S.STAGE_PROTOCOL)
    body = S.OpenRequest(stage.model_id, stage.start, stage.end, MAX_LEN).to_body() | changes
    await fs.send("session_open", body, timeout=5)
    reply = await fs.receive_reply(timeout=5)
    assert reply.kind == "session_opened"
    assert reply.body["hidden"] == stage.config.hidden_size  # a client learns the size here (§6.3)
    return fs


async def step(fs: FramedStream, x: np.ndarray, position: int) -> np.ndarray:
    await fs.send("step", S.Step(position, encode_hidden(x)).to_body(), timeout=5)
    reply = await fs.receive_reply(timeout=10)
    result = S.StepResult.from_body(reply.body)
    return decode_hidden(result.hidden, TensorLimits())


def hidden(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, 576)).astype(np.float32)


async def test_session_steps_match_local_forward_and_sessions_run_concurrently(two_blocks: Stage) -> None:
    async with served(two_blocks, ServerConfig()) as (server, client, peer):
        x0, x1 = hidden(5, 1), hidden(1, 2)
        cache = two_blocks.new_cache()
        want0 = two_blocks.forward(x0, cache, 0)
        want1 = two_blocks.forward(x1, cache, 5)
        a = await open_session(client, peer, two_blocks)
        b = await open_session(client, peer, two_blocks)
        assert server.active_sessions == 2
        got: dict[str, np.ndarray] = {}

        async def run(name: str, fs: FramedStream) -> None:
            await step(fs, x0, 0)
            got[name] = await step(fs, x1, 5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "a", a)
            nursery.start_soon(run, "b", b)
        # The two sessions' steps may be computed together (stacked): equal up to float32
        # rounding (docs/MODEL.md, tests/test_batching.py).
        for name in "ab":
            np.testing.assert_allclose(got[name], want1, rtol=0, atol=2e-5 * np.abs(want1).max())
        # A retried step (same position) is idempotent: the cache is truncated first.
        np.testing.assert_array_equal(await step(a, x0, 0), want0)
        await a.send("session_close", {}, timeout=5)
        assert (await a.receive(timeout=5)).kind == "session_closed"
        await b.aclose()
        with trio.fail_after(5):
            await server.wait_idle()
        assert server.reserved_bytes == 0


async def test_a_sub_range_is_served_with_shared_weights(two_blocks: Stage) -> None:
    async with served(two_blocks, ServerConfig()) as (_server, client, peer):
        sub = two_blocks.sub_stage(5, 6)
        fs = await open_session(client, peer, sub)
        x = hidden(3)
        np.testing.assert_array_equal(await step(fs, x, 0), sub.forward(x, sub.new_cache(), 0))


@pytest.mark.parametrize(("changes", "code"), [
    ({"model_id": "gguf-sha256:" + "0" * 64}, S.ERR_WRONG_MODEL),
    ({"start": 0, "end": 5}, S.ERR_WRONG_BLOCKS),
    ({"start": 5, "end": 9}, S.ERR_WRONG_BLOCKS),
    ({"max_length": 100_000}, S.ERR_BAD_POSITION),
    ({"start": 6, "end": 5}, S.ERR_BAD_REQUEST),
    ({"dtype": "float64"}, S.ERR_BAD_REQUEST),
    ({"max_length": "64"}, S.ERR_BAD_REQUEST),
])
async def test_bad_session_open_gets_a_clear_error(two_blocks: Stage, changes: dict[str, Any],
                                                  code: str) -> None:
    async with served(two_blocks, ServerConfig()) as (server, client, peer):
        with pytest.raises(RemoteError) as err:
            await open_session(client, peer, two_blocks, **changes)
        assert err.value.code == code
        assert server.active_sessions == 0
        await open_session(client, peer, two_blocks)  # everyone else is still served


@pytest.mark.parametrize(("body", "code"), [
    ({"position": 0, "hidden": {"dtype": "float32", "shape": [2, 100], "data": b"\0" * 800}},
     S.ERR_BAD_TENSOR),  # wrong hidden size
    ({"position": 0, "hidden": {"dtype": "float64", "shape": [1, 576], "data": b"\0" * 4608}},
     S.ERR_BAD_TENSOR),  # dtype not allowed
    ({"position": 0, "hidden": {"dtype": "float32", "shape": [1, 576], "data": b"\0" * 10}},
     S.ERR_BAD_TENSOR),  # byte length mismatch
    ({"position": 0, "hidden": {"dtype": "float32", "shape": [5000, 576], "data": b"\0" * 4}},
     S.ERR_BAD_TENSOR),  # oversized shape claim
    ({"position": 7, "hidden": encode_hidden(np.zeros((1, 576), np.float32)).to_dict()},
     S.ERR_BAD_POSITION),  # skips ahead of the cache
    ({"position": 60, "hidden": encode_hidden(np.zeros((10, 576), np.float32)).to_dict()},
     S.ERR_BAD_POSITION),  # past max_length
    ({"hidden": {}}, S.ERR_BAD_TENSOR),
])
async def test_bad_steps_get_errors_and_the_session_survives(two_blocks: Stage, body: dict[str, Any],
                                                            code: str) -> None:
    async with served(two_blocks, ServerConfig()) as (_server, client, peer):
        fs = await open_session(client, peer, two_blocks)
        await fs.send("step", body, timeout=5)
        with pytest.raises(RemoteError) as err:
            await fs.receive_reply(timeout=5)
        assert err.value.code in (code, S.ERR_BAD_REQUEST)
        x = hidden(2)
        np.testing.assert_array_equal(await step(fs, x, 0),
                                      two_blocks.forward(x, two_blocks.new_cache(), 0))


async def test_out_of_order_messages_and_garbage_end_only_that_session(two_blocks: Stage) -> None:
    async with served(two_blocks, ServerConfig()) as (server, client, peer):
        fs = await client.open_stream(peer, S.STAGE_PROTOCOL)
        await fs.send("step", S.Step(0, encode_hidden(hidden(1))).to_body(), timeout=5)
        with pytest.raises(RemoteError, match="unexpected 'step'"):
            await fs.receive_reply(timeout=5)
        raw = await client.open_stream(peer, S.STAGE_PROTOCOL)
        await raw._stream.write(wire.frame(b"\xc1garbage"))
        with pytest.raises(RemoteError):
            await raw.receive_reply(timeout=5)
        closed = await open_session(client, peer, two_blocks)
        await closed.send("session_close", {}, timeout=5)
        await closed.receive(timeout=5)
        assert server.active_sessions == 0
        assert server.stats.bad_requests == 2
        await open_session(client, peer, two_blocks)


async def test_session_limit_and_kv_budget_refuse_with_busy(two_blocks: Stage) -> None:
    per_session = MAX_LEN * 2 * 2 * 3 * 64 * 4  # blocks x K/V x kv heads x head dim x float32
    config = ServerConfig(max_sessions=2, kv_budget_bytes=per_session * 3, peer_share=1.0)
    async with served(two_blocks, config) as (server, client, peer):
        await open_session(client, peer, two_blocks)
        await open_session(client, peer, two_blocks)
        with pytest.raises(RemoteError) as err:
            await open_session(client, peer, two_blocks)
        assert err.value.code == S.ERR_BUSY
    config = ServerConfig(max_sessions=10, kv_budget_bytes=per_session * 2, peer_share=1.0)
    async with served(two_blocks, config) as (server, client, peer):
        await open_session(client, peer, two_blocks)
        await open_session(client, peer, two_blocks)
        with pytest.raises(RemoteError, match="memory budget") as err:
            await open_session(client, peer, two_blocks)
        assert server.reserved_bytes <= config.kv_budget_bytes


async def test_idle_sessions_are_closed_and_freed(two_blocks: Stage) -> None:
    async with served(two_blocks, ServerConfig(idle_timeout_s=0.5)) as (server, client, peer):
        fs = await open_session(client, peer, two_blocks)
        assert server.active_sessions == 1
        with pytest.raises(RemoteError) as err:
            await fs.receive_reply(timeout=5)
        assert err.value.code == S.ERR_IDLE
        assert server.active_sessions == 0
        assert server.stats.idle_closed == 1


async def test_draining_server_refuses_new_sessions_and_flags_steps(two_blocks: Stage) -> None:
    lifecycle = ["running"]
    serve = Decision("serve", "ok", 0.0)
    def gate() -> Serving:
        return serving_decision(lifecycle[0], serve, "ready")

    async with served(two_blocks, ServerConfig(), gate=gate) as (server, client, peer):
        fs = await open_session(client, peer, two_blocks)
        assert not server.draining
        lifecycle[0] = "draining"  # the node drains: its gate says so, the server only asks
        assert server.draining
        with pytest.raises(RemoteError) as err:
            await open_session(client, peer, two_blocks)
        assert err.value.code == S.ERR_DRAINING and "draining" in str(err.value)
        await fs.send("step", S.Step(0, encode_hidden(hidden(1))).to_body(), timeout=5)
        reply = await fs.receive_reply(timeout=5)
        assert S.StepResult.from_body(reply.body).draining is True


async def test_every_session_is_in_the_owners_audit_log(two_blocks: Stage) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    server = StageServer(two_blocks, ServerConfig(), on_event=lambda e, **f: events.append((e, f)))
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await client.connect(host.multiaddrs()[0])
        fs = await open_session(client, peer, two_blocks)
        await step(fs, hidden(4), 0)
        await step(fs, hidden(1), 4)
        await fs.send("session_close", {}, timeout=5)
        await fs.receive(timeout=5)
        with trio.fail_after(5):
            await server.wait_idle()
    assert [e for e, _ in events] == ["session_opened", "session_closed"]
    assert events[0][1]["client"] == client.peer_id
    assert events[0][1]["blocks"] == [4, 6]
    closed = events[1][1]
    assert closed["busy_s"] > 0
    assert closed | {"session": 0, "busy_s": 0} == {"session": 0, "client": client.peer_id, "steps": 2,
                                                    "tokens": 5, "blocks": [4, 6], "busy_s": 0}


PER_SESSION = MAX_LEN * 2 * 2 * 3 * 64 * 4  # two blocks x K/V x kv heads x head dim x float32


@pytest.mark.parametrize(("config", "why"), [
    (ServerConfig(max_sessions=4), "per-peer share of 2 sessions"),
    (ServerConfig(kv_budget_bytes=PER_SESSION * 4), "per-peer share of the KV memory budget"),
])
async def test_one_peer_cannot_take_every_session(two_blocks: Stage, config: ServerConfig, why: str) -> None:
    # Issue 8, finding 4: 16 tiny or 6 big sessions from one peer locked out every honest client.
    server = StageServer(two_blocks, config)
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as greedy,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as honest,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await greedy.connect(host.multiaddrs()[0])
        await honest.connect(host.multiaddrs()[0])
        await open_session(greedy, peer, two_blocks)
        await open_session(greedy, peer, two_blocks)
        with pytest.raises(RemoteError, match=why) as err:
            await open_session(greedy, peer, two_blocks)
        assert err.value.code == S.ERR_BUSY
        await open_session(honest, peer, two_blocks)  # another peer is still served
        await open_session(honest, peer, two_blocks)
        assert server.active_sessions == 4


async def test_a_session_sending_invalid_steps_is_closed(two_blocks: Stage) -> None:
    bad = {"position": 7, "hidden": encode_hidden(np.zeros((1, 576), np.float32)).to_dict()}
    async with served(two_blocks, ServerConfig(max_invalid_steps=3)) as (server, client, peer):
        fs = await open_session(client, peer, two_blocks)
        await step(fs, hidden(2), 0)  # a valid step resets the count
        for _ in range(3):
            await fs.send("step", bad, timeout=5)
            with pytest.raises(RemoteError):
                await fs.receive_reply(timeout=5)
        with pytest.raises(NetworkError):  # ended: the stream is closed
            await fs.receive(timeout=5)
        with trio.fail_after(5):
            await server.wait_idle()
        assert server.stats.invalid_closed == 1
        assert server.reserved_bytes == 0


async def test_invalid_steps_do_not_keep_a_session_past_its_idle_timeout(two_blocks: Stage) -> None:
    bad = {"position": 0, "hidden": {}}
    config = ServerConfig(idle_timeout_s=1.0, max_invalid_steps=1000)
    async with served(two_blocks, config) as (server, client, peer):
        fs = await open_session(client, peer, two_blocks)
        codes = []
        for _ in range(20):  # 20 x 0.25 s: five times the idle timeout
            try:
                await fs.send("step", bad, timeout=5)
                await fs.receive_reply(timeout=5)
            except RemoteError as e:
                codes.append(e.code)
                if e.code == S.ERR_IDLE:
                    break
            except NetworkError:
                break
            await trio.sleep(0.25)
        assert S.ERR_IDLE in codes
        assert server.active_sessions == 0


async def test_a_long_prefill_runs_in_chunks_and_other_sessions_step_in_between(two_blocks: Stage) -> None:
    config = ServerConfig(prefill_chunk_tokens=16)
    probe = StageServer(two_blocks, ServerConfig())
    assert (probe._chunk_tokens(0, 5), probe._chunk_tokens(0, 2048)) == (5, 128)
    assert probe._chunk_tokens(8000, 2048) < 128  # attention over 8000 cached keys: smaller chunks
    long_x, short_x = hidden(480, 3), hidden(1, 4)
    async with served(two_blocks, config) as (server, client, peer):
        a = await open_session(client, peer, two_blocks, max_length=512)
        b = await open_session(client, peer, two_blocks)
        await step(b, hidden(3, 5), 0)
        done: list[str] = []
        got: dict[str, np.ndarray] = {}

        async def run(name: str, fs: FramedStream, x: np.ndarray, position: int) -> None:
            got[name] = await step(fs, x, position)
            done.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "prefill", a, long_x, 0)
            await trio.sleep(0.01)
            nursery.start_soon(run, "decode", b, short_x, 3)
        assert done == ["decode", "prefill"]  # it did not wait behind the whole prefill
        assert server.stats.chunks >= 480 // 16
        want = two_blocks.forward(long_x, two_blocks.new_cache(), 0)
        np.testing.assert_allclose(got["prefill"], want, rtol=1e-4, atol=1e-2)
