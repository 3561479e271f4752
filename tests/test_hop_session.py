"""One hop session of the client (node/client/hop.py) against a scripted server on an in-process
stream: its state is the client's session machine, its work the tally and the client's counters,
and a server's message out of turn is that server's fault (a StageFailure; the session FAILED)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from idlefleet.node.client.config import ClientConfig
from idlefleet.node.client.hop import HopEnv, HopSession, StageFailure
from idlefleet.node.client.stats import ClientCounters
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.loopback import loopback_pair
from idlefleet.protocols import session as S
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden

ME = "12D3KooWclient"  # the hop is our own stage (a loopback hop): its replies carry no signature
HIDDEN = 4
C = S.ClientState
Script = Callable[[FramedStream], Awaitable[None]]


def opened(relay: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"session": 7, "start": 0, "end": 2, "hidden": HIDDEN}
    if relay is not None:
        body["relay"] = relay
    return body


def result(step: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A server's reply to ``step``: its rows doubled."""
    x = decode_hidden(S.Step.from_body(step).hidden, TensorLimits())
    return {**S.StepResult(step["position"], encode_hidden(2 * x)).to_body(), **extra}


@asynccontextmanager
async def hop_with(script: Script) -> AsyncIterator[tuple[HopSession, ClientCounters]]:
    """A hop session whose server is ``script`` (run on the other end of the stream)."""
    counters = ClientCounters()
    async with trio.open_nursery() as nursery:
        async def connect(peer: str) -> FramedStream:
            ours, theirs = loopback_pair(peer)
            nursery.start_soon(script, theirs)
            return ours

        env = HopEnv(me=ME, model_id="gguf-sha256:test", config=ClientConfig(),
                     limits=TensorLimits(hidden_size=HIDDEN), hidden_size=HIDDEN,
                     flops_per_token_block=1.0, desk=None, counters=counters, connect=connect,
                     spawn=nursery.start_soon)
        yield HopSession(env, ME, 0, 2, held=True), counters
        nursery.cancel_scope.cancel()


def rows(n: int) -> np.ndarray:
    return np.arange(n * HIDDEN, dtype=np.float32).reshape(n, HIDDEN)


async def test_a_session_opens_steps_drains_and_closes_through_its_states() -> None:
    async def server(fs: FramedStream) -> None:
        assert (await fs.receive(timeout=5)).kind == "session_open"
        await fs.send("session_opened", opened(), timeout=5)
        step = await fs.receive(timeout=5)
        await fs.send("chain_failed", {"position": 0, "seq": 1, "message": "stale"}, timeout=5)  # skipped
        await fs.send("step_result", result(step.body), timeout=5)
        step = await fs.receive(timeout=5)
        await fs.send("step_result", result(step.body, draining=True), timeout=5)
        assert (await fs.receive(timeout=5)).kind == "session_close"
        await fs.send("session_closed", {}, timeout=5)

    async with hop_with(server) as (hop, counters):
        assert hop.state is C.IDLE and counters.snapshot().open_sessions[ME] == 1
        await hop.open(16)
        assert hop.state is C.OPEN and hop.session == 7 and hop.relay is None and not hop.chainable
        ex = await hop.step(rows(3), 0)
        assert hop.state is C.OPEN and np.array_equal(ex.out, 2 * rows(3)) and ex.commitment is None
        await hop.step(rows(1), 3)
        assert hop.state is C.DRAINING and hop.tally.tokens == 4
        hop.keep()  # nowhere to move it
        assert hop.state is C.OPEN
        await hop.close()
        assert hop.state is C.CLOSED and hop.stream is None
        stats = counters.snapshot()
        assert (stats.sessions_opened[ME], stats.positions_computed[ME], stats.open_sessions[ME]) == (1, 4, 0)


async def test_a_reply_out_of_turn_is_the_servers_fault_and_fails_the_session() -> None:
    async def server(fs: FramedStream) -> None:
        await fs.receive(timeout=5)
        await fs.send("session_opened", opened(), timeout=5)
        await fs.receive(timeout=5)
        await fs.send("receipt", {"receipt": b"x"}, timeout=5)  # no receipt was proposed
        await trio.sleep_forever()

    async with hop_with(server) as (hop, counters):
        await hop.open(16)
        with pytest.raises(StageFailure, match="unexpected 'receipt'") as caught:
            await hop.step(rows(1), 0)
        assert caught.value.ban and hop.state is C.FAILED and hop.tally.tokens == 0
        with pytest.raises(StageFailure, match="no session"):
            await hop.step(rows(1), 0)  # a failed session takes no more steps
        await hop.abandon()
        assert hop.state is C.CLOSED and counters.snapshot().positions_computed[ME] == 0


async def test_a_refused_open_is_no_fault_and_leaves_no_session() -> None:
    async def server(fs: FramedStream) -> None:
        await fs.receive(timeout=5)
        await fs.send_error(S.ERR_BUSY, "session limit")
        await trio.sleep_forever()

    async with hop_with(server) as (hop, counters):
        with pytest.raises(StageFailure, match="refused") as caught:
            await hop.open(16)
        assert not caught.value.ban and hop.state is C.IDLE  # not opened: the stream could retry
        await hop.abandon()
        assert hop.state is C.CLOSED and counters.snapshot().open_sessions[ME] == 0


async def test_a_chained_step_given_up_is_credited_when_a_redo_says_the_server_had_it() -> None:
    async def server(fs: FramedStream) -> None:
        await fs.receive(timeout=5)
        await fs.send("session_opened", opened(relay=bytes(16)), timeout=5)
        await fs.send("chain_failed", {"position": 0, "seq": 1, "message": "next hop gone"}, timeout=5)
        step = await fs.receive(timeout=5)  # the redo, hop by hop
        await fs.send("step_result", result(step.body, ahead=1), timeout=5)
        await trio.sleep_forever()

    async with hop_with(server) as (hop, _counters):
        await hop.open(16)
        assert hop.relay == bytes(16)
        hop.join_chain()
        assert hop.state is C.CHAINED
        with pytest.raises(Exception, match="next hop gone"):
            await hop.chain_reply(1, 5.0)
        hop.chain_broken(1)
        assert hop.state is C.OPEN
        await hop.step(rows(1), 0, fence=1)
        assert hop.tally.tokens == 2  # the redo and the chained step the server computed too
