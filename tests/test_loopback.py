"""A stream to ourselves: framing, end of stream, reset, and a stage session over it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio

from idlefleet.node.serve.server import StageServer
from idlefleet.p2p.errors import NetworkError, RemoteError, StreamClosed
from idlefleet.p2p.loopback import loopback_pair
from idlefleet.protocols import session as S
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden


async def test_frames_travel_both_ways_and_close_is_a_clean_end() -> None:
    a, b = loopback_pair("12D3KooWself")
    assert a.peer_id == b.peer_id == "12D3KooWself"
    await a.send("status_request", {}, timeout=1)
    assert (await b.receive(timeout=1)).kind == "status_request"
    await b.send_error("busy", "try later")
    with pytest.raises(RemoteError, match="busy"):
        await a.receive_reply(timeout=1)
    assert a.bytes_sent == b.bytes_received > 0
    await a.aclose()
    with pytest.raises(StreamClosed):
        await b.receive(timeout=1)


async def test_reset_breaks_the_other_side() -> None:
    a, b = loopback_pair("12D3KooWself")
    await b.reset()
    with pytest.raises(NetworkError):
        await a.send("status_request", {}, timeout=1)


async def test_stage_session_over_loopback_equals_local_forward(whole_model: Any, head: Any) -> None:
    stage = whole_model.sub_stage(0, 2)
    server = StageServer(stage)
    ours, theirs = loopback_pair("12D3KooWself")
    hidden = head.embed([1, 2, 3])
    expected = stage.forward(hidden, stage.new_cache(), 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        request = S.OpenRequest(stage.model_id, 0, 2, 8, "float32")
        await ours.send("session_open", request.to_body(), timeout=5)
        assert (await ours.receive_reply(timeout=5)).kind == "session_opened"
        assert server.active_sessions == 1
        await ours.send("step", S.Step(0, encode_hidden(hidden, "float32")).to_body(), timeout=5)
        reply = await ours.receive_reply(timeout=60)
        result = S.StepResult.from_body(reply.body)
        out = decode_hidden(result.hidden, TensorLimits(max_tokens=8, hidden_size=hidden.shape[1]))
        np.testing.assert_array_equal(out, expected)
        await ours.send("session_close", {}, timeout=5)
        assert (await ours.receive(timeout=5)).kind == "session_closed"
    assert server.active_sessions == 0
    assert server.stats.bytes_received == ours.bytes_sent
