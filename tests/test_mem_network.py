"""p2p.memory on virtual time: Host's surface, its deadlines and errors, gossip validation, the DHT
and the faults (partition, freeze, kill, delay)."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.p2p.errors import DeadlineExceeded, NetworkError, PeerUnreachable, RemoteError, StreamClosed
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host
from idlefleet.p2p.memory import MemoryHost, MemoryNetwork
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.wire import Envelope

ECHO = "/test/echo/1.0.0"
REQ = "/test/req/1.0.0"


async def echo(fs: FramedStream) -> None:
    while True:
        try:
            env = await fs.receive(timeout=30)
        except StreamClosed:
            return
        await fs.send(env.kind, env.body, timeout=30)


async def answer(peer_id: str, env: Envelope) -> tuple[str, dict[str, Any]]:
    return "status_response", {"records": []}


@asynccontextmanager
async def hosts(n: int, *, delay: float = 0.0) -> AsyncIterator[tuple[MemoryNetwork, list[MemoryHost]]]:
    net = MemoryNetwork(link_delay_s=delay)
    async with AsyncExitStack() as stack:
        out = [await stack.enter_async_context(net.open_host(Ed25519PrivateKey.generate())) for _ in range(n)]
        for h in out:
            h.set_stream_handler(ECHO, echo)
            h.set_request_handler(REQ, "status_request", answer)
        yield net, out


def test_memory_host_offers_every_public_method_of_host() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {name: inspect.signature(f) for name, f in inspect.getmembers(cls, callable)
                if not name.startswith("_")}

    host, memory = public(Host), public(MemoryHost)
    assert set(host) <= set(memory), set(host) - set(memory)
    for name, sig in host.items():  # same parameters (names and kinds), so callers cannot tell
        assert list(sig.parameters) == list(memory[name].parameters), name


def test_memory_modules_import_no_libp2p() -> None:
    from pathlib import Path

    for name in ("memory.py", "memory_dht.py"):
        text = (Path(__file__).parent.parent / "p2p" / name).read_text()
        assert "import libp2p" not in text and "from libp2p" not in text


async def test_request_and_reply_with_a_reused_stream(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        await a.connect(b.multiaddrs()[0])
        for _ in range(3):
            reply = await a.request(b.peer_id, REQ, "status_request", {}, reuse=True)
            assert reply.kind == "status_response"
        assert b.stats.requests_served == 3
        assert a.connected_peers() == {b.peer_id} and b.connected_peers() == {a.peer_id}


async def test_open_stream_negotiates_the_first_protocol_the_peer_serves(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        fs = await a.open_stream(b.peer_id, ["/test/newer/2.0.0", ECHO])
        assert fs.protocol == ECHO and fs.peer_id == b.peer_id
        await fs.send("heartbeat", {"nonce": 1}, timeout=1)
        assert (await fs.receive(timeout=1)).body == {"nonce": 1}
        with pytest.raises(PeerUnreachable, match="not supported"):
            await a.open_stream(b.peer_id, "/test/nobody/1.0.0")


async def test_a_frozen_peer_hangs_until_the_deadline(autojump_clock: Any) -> None:
    async with hosts(2) as (net, (a, b)):
        fs = await a.open_stream(b.peer_id, ECHO)
        net.freeze(b.peer_id)
        started = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await a.request(b.peer_id, REQ, "status_request", {}, timeout=2.0)
        assert trio.current_time() - started == pytest.approx(2.0)
        await fs.send("heartbeat", {"nonce": 2}, timeout=1)  # buffered, like a socket's send buffer
        with pytest.raises(DeadlineExceeded):
            await fs.receive(timeout=3.0)
        net.thaw(b.peer_id)  # what was written meanwhile arrives now
        assert (await fs.receive(timeout=1.0)).body == {"nonce": 2}


async def test_a_frozen_peer_cannot_be_dialled_within_the_deadline(autojump_clock: Any) -> None:
    async with hosts(2) as (net, (a, b)):
        net.freeze(b.peer_id)
        with pytest.raises(DeadlineExceeded):
            await a.connect(b.multiaddrs()[0], timeout=1.5)
        net.thaw(b.peer_id)
        assert await a.connect(b.multiaddrs()[0]) == b.peer_id


async def test_a_killed_peer_is_eof_then_refuses_dials(autojump_clock: Any) -> None:
    async with hosts(2) as (net, (a, b)):
        gone: list[str] = []
        a.on_disconnect(gone.append)
        fs = await a.open_stream(b.peer_id, ECHO)
        net.kill(b.peer_id)
        with pytest.raises(StreamClosed):
            await fs.receive(timeout=5)
        assert gone == [b.peer_id] and not a.connected_peers()
        with pytest.raises(PeerUnreachable, match="refused"):
            await a.connect(b.multiaddrs()[0])


async def test_evict_closes_the_connection_on_both_sides(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        a_saw, b_saw = [], []
        a.on_disconnect(a_saw.append)
        b.on_disconnect(b_saw.append)
        fs = await a.open_stream(b.peer_id, ECHO)
        a.evict(b.peer_id)
        assert a.stats.evictions == 1 and a_saw == [b.peer_id] and b_saw == [a.peer_id]
        with pytest.raises(NetworkError):
            await fs.receive(timeout=5)
        assert b.peer_id not in a.dht_routing_peers()


async def test_a_partition_hangs_both_ways_until_healed(autojump_clock: Any) -> None:
    async with hosts(3) as (net, (a, b, c)):
        net.partition(a.peer_id, b.peer_id)
        with pytest.raises(DeadlineExceeded):
            await a.connect(b.multiaddrs()[0], timeout=1.0)
        assert await a.connect(c.multiaddrs()[0]) == c.peer_id  # other links are fine
        net.heal(a.peer_id, b.peer_id)
        assert await a.connect(b.multiaddrs()[0]) == b.peer_id


async def test_link_delay_is_paid_on_every_hop(autojump_clock: Any) -> None:
    async with hosts(2, delay=0.05) as (net, (a, b)):
        await a.connect(b.multiaddrs()[0])  # a handshake: one round trip
        started = trio.current_time()
        await a.request(b.peer_id, REQ, "status_request", {}, reuse=True)
        first = trio.current_time() - started  # negotiation + request + reply
        started = trio.current_time()
        await a.request(b.peer_id, REQ, "status_request", {}, reuse=True)
        assert first == pytest.approx(0.2) and trio.current_time() - started == pytest.approx(0.1)
        net.set_delay(a.peer_id, b.peer_id, 0.5)
        started = trio.current_time()
        await a.request(b.peer_id, REQ, "status_request", {}, reuse=True)
        assert trio.current_time() - started == pytest.approx(1.0)


async def test_bad_requests_get_an_error_and_crashes_reset_and_score_the_peer(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        async def refuse(fs: FramedStream) -> None:
            await fs.receive(timeout=1)
            raise RemoteProtocolError("no thanks")

        async def crash(fs: FramedStream) -> None:
            await fs.receive(timeout=1)
            raise KeyError("bug")

        b.set_stream_handler("/test/refuse/1.0.0", refuse)
        b.set_stream_handler("/test/crash/1.0.0", crash)
        fs = await a.open_stream(b.peer_id, "/test/refuse/1.0.0")
        await fs.send("heartbeat", {"nonce": 3}, timeout=1)
        with pytest.raises(RemoteError, match="no thanks"):
            await fs.receive_reply(timeout=1)
        with pytest.raises(RemoteError, match="expects 'status_request'"):
            await a.request(b.peer_id, REQ, "heartbeat", {"nonce": 1})
        assert b.stats.requests_rejected == 2
        fs = await a.open_stream(b.peer_id, "/test/crash/1.0.0")
        await fs.send("heartbeat", {"nonce": 3}, timeout=1)
        with pytest.raises(NetworkError):
            await fs.receive(timeout=1)
        assert b.stats.handler_crashes == 1 and b.misbehaviour.score(a.peer_id) == 2 + 10


async def test_inbound_streams_per_peer_are_capped(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        cap = 64
        streams = [await a.open_stream(b.peer_id, ECHO) for _ in range(cap)]
        extra = await a.open_stream(b.peer_id, ECHO)
        with pytest.raises(NetworkError):
            await extra.receive(timeout=1)
        assert b.stats.streams_refused == 1
        await streams[0].aclose()
        await trio.sleep(0.1)
        fresh = await a.open_stream(b.peer_id, ECHO)
        await fresh.send("heartbeat", {"nonce": 3}, timeout=1)
        assert (await fresh.receive(timeout=1)).kind == "heartbeat"


async def _line(net: MemoryNetwork, hs: list[MemoryHost]) -> None:
    for left, right in itertools.pairwise(hs):
        await left.connect(right.multiaddrs()[0])


async def test_gossip_goes_hop_by_hop_and_a_rejecting_validator_stops_it(autojump_clock: Any) -> None:
    async with hosts(4) as (net, hs):
        await _line(net, hs)  # a - b - c - d
        seen: dict[int, list[bytes]] = {i: [] for i in range(4)}

        def validator(i: int) -> Any:
            def check(origin: str, data: bytes) -> bool:
                seen[i].append(data)
                return not (i == 2 and data == b"bad")  # c rejects "bad": not forwarded to d
            return check

        for i, h in enumerate(hs):
            await h.subscribe("t", validator(i))
        await hs[0].publish("t", b"good")
        await hs[0].publish("t", b"bad")
        await trio.sleep(1)
        assert seen[1] == [b"good", b"bad"] and seen[2] == [b"good", b"bad"]
        assert seen[3] == [b"good"]
        assert hs[2].stats.gossip_rejected == {"t": 1}
        assert hs[1].gossip_peers("t") == {hs[0].peer_id, hs[2].peer_id}


async def test_each_message_is_validated_once_per_host(autojump_clock: Any) -> None:
    async with hosts(3) as (_net, (a, b, c)):
        for x, y in ((a, b), (b, c), (a, c)):  # a triangle: c hears it from a and from b
            await x.connect(y.multiaddrs()[0])
        calls: list[str] = []
        await a.subscribe("t", lambda o, d: True)
        await b.subscribe("t", lambda o, d: True)
        await c.subscribe("t", lambda o, d: calls.append(o) is None)
        await a.publish("t", b"once")
        await trio.sleep(1)
        assert calls == [a.peer_id]


async def test_a_new_connection_replays_only_what_is_still_current(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        current = {b"new"}
        await a.subscribe("t", lambda o, d: True, still_current=lambda d: d in current)
        await a.publish("t", b"old")
        await a.publish("t", b"new")
        got: list[bytes] = []
        await b.subscribe("t", lambda o, d: got.append(d) is None)
        await b.connect(a.multiaddrs()[0])
        await trio.sleep(1)
        assert got == [b"new"]


async def test_a_validator_bug_is_a_crash_not_a_dead_topic(autojump_clock: Any) -> None:
    async with hosts(2) as (_, (a, b)):
        await a.connect(b.multiaddrs()[0])
        await a.subscribe("t", lambda o, d: True)
        await b.subscribe("t", lambda o, d: 1 / 0 == 0)
        await a.publish("t", b"x")
        await trio.sleep(1)
        assert b.stats.handler_crashes == 1


def _pick_highest(key: str, values: list[bytes]) -> int:
    return max(range(len(values)), key=lambda i: int(values[i]))


def _digits(key: str, value: bytes) -> None:
    if not value.isdigit():
        raise ValueError("not digits")


async def test_dht_values_are_validated_and_the_best_one_wins(autojump_clock: Any) -> None:
    async with hosts(5) as (net, hs):
        await _line(net, hs)
        for h in hs:
            h.register_dht_namespace("ns", _digits, _pick_highest)
        await hs[0].dht_put("/ns/k", b"7")
        await hs[4].dht_put("/ns/k", b"3")  # lower: every store keeps 7
        assert await hs[2].dht_get("/ns/k") == b"7"
        with pytest.raises(NetworkError):
            await hs[0].dht_put("/ns/k", b"garbage")
        with pytest.raises(NetworkError):
            await hs[0].dht_put("/other/k", b"1")
        hs[3]._values["/ns/k"] = b"999x"  # a hostile store's answer is checked by the asker
        assert await hs[1].dht_get("/ns/k") == b"7"
        assert await hs[1].dht_get("/ns/absent") is None
        assert hs[0].dht_store_sizes() == (1, 0)


async def test_dht_providers_are_found_across_the_network_but_not_through_a_partition(
        autojump_clock: Any) -> None:
    async with hosts(4) as (net, hs):
        await _line(net, hs)
        assert await hs[3].dht_provide("cid-1")
        assert await hs[0].dht_find_providers("cid-1") == [hs[3].peer_id]
        assert await hs[1].dht_refresh() == 3
        net.partition(hs[1].peer_id, hs[2].peer_id)  # cuts the line: 0-1 | 2-3
        assert await hs[0].dht_find_providers("cid-2") == []
        await hs[3].dht_provide("cid-2")
        assert await hs[0].dht_find_providers("cid-2") == []
