"""Framed streams over real libp2p hosts: a small message costs one yamux frame each way (window
credit goes back in batches, as go-yamux does), and messages larger than the window still flow."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from idlefleet.protocols import session as S
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden
from tests.factories import ECHO, echo_hosts


async def test_small_messages_send_no_window_update_each_and_big_ones_still_flow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    updates = 0
    real = YamuxStream.send_window_update

    async def counted(self: Any, increment: int, skip_lock: bool = False) -> None:
        nonlocal updates
        updates += 1
        await real(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    limits = TensorLimits(hidden_size=576)
    rng = np.random.default_rng(0)
    async with echo_hosts() as (client, peer):
        fs = await client.open_stream(peer, ECHO)
        with trio.fail_after(30):
            await fs.send("step", S.Step(0, encode_hidden(np.zeros((1, 576), np.float32))).to_body(),
                          timeout=10)
            await fs.receive(timeout=10)
            before = updates
            # 40 decode-sized steps there and back: 80 reads of ~2.3 kB, far below half a window.
            for position in range(1, 41):
                x = rng.standard_normal((1, 576)).astype(np.float32)
                await fs.send("step", S.Step(position, encode_hidden(x)).to_body(), timeout=10)
                back = S.Step.from_body((await fs.receive(timeout=10)).body)
                assert np.array_equal(decode_hidden(back.hidden, limits), x)
            assert updates - before <= 2, updates - before  # it was one per read: 80
            # A 2.4 MB prefill-sized step is ~9 windows: credit must keep coming back both ways.
            big = rng.standard_normal((1024, 576)).astype(np.float32)
            await fs.send("step", S.Step(41, encode_hidden(big)).to_body(), timeout=10)
            back = S.Step.from_body((await fs.receive(timeout=10)).body)
            assert np.array_equal(decode_hidden(back.hidden, limits), big)
        await fs.aclose()


async def test_concurrent_sends_on_one_stream_never_interleave_their_frames() -> None:
    """Several tasks send multi-window messages on one stream at once (each write yields many
    times): every message arrives whole, and the send lock is free afterwards."""
    limits = TensorLimits(hidden_size=576, max_tokens=4096)
    rng = np.random.default_rng(1)
    sent = {p: rng.standard_normal((300, 576)).astype(np.float32) for p in range(6)}  # ~690 kB each
    got: dict[int, np.ndarray] = {}
    async with echo_hosts() as (client, peer):
        fs = await client.open_stream(peer, ECHO)

        async def one(position: int) -> None:
            await fs.send("step", S.Step(position, encode_hidden(sent[position])).to_body(), timeout=20)

        async def receive_all() -> None:
            for _ in sent:
                back = S.Step.from_body((await fs.receive(timeout=20)).body)
                got[back.position] = decode_hidden(back.hidden, limits)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_all)
                for position in sent:
                    nursery.start_soon(one, position)
        assert sorted(got) == sorted(sent)
        for position, x in sent.items():
            assert np.array_equal(got[position], x)
        assert not fs._send_lock.locked()
        await fs.aclose()
