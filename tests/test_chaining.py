"""Server-to-server chaining (protocols.session, node.relay): a chained step travels client -> A
-> B -> C -> client over real libp2p hosts, equals hop-by-hop computation, carries every hop's
signed output back, and hostile or stale relayed steps are dropped without harm."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.client import pipeline as P
from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.model.stage import Stage, load_stage
from idlefleet.node.runtime.node import Node, open_node
from idlefleet.node.serve import relay as R
from idlefleet.node.serve.relay import RelayLinks, serve_relay
from idlefleet.node.serve.server import ServerConfig, StageServer
from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.protocols import session as S
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden
from idlefleet.protocols.verification import StepCommitment, row_digests, rows_root
from tests.factories import running_fleet

MAX_LEN = 64
RANGES = ((0, 2), (2, 4), (4, 6))


def hidden(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, 576)).astype(np.float32)


# -- messages ------------------------------------------------------------------------------------
def test_chained_step_round_trips_and_bad_chains_are_refused() -> None:
    x = encode_hidden(hidden(1))
    hop = S.ChainHop("12D3KooWpeer", 7, b"k" * 16)
    step = S.Step(3, x, (hop, hop), seq=5)
    assert S.Step.from_body(step.to_body()) == step
    assert S.Step.from_body(S.Step(3, x, fence=4).to_body()).fence == 4
    body = step.to_body()
    for bad in ({**body, "chain": []}, {**body, "chain": "x"}, {**body, "chain": [hop.to_body()] * 9},
                {**body, "chain": [{**hop.to_body(), "relay": b"short"}]},
                {**body, "chain": [{**hop.to_body(), "extra": 1}]},
                {**body, "chain": [{**hop.to_body(), "session": -1}]},
                {**body, "chain": [{**hop.to_body(), "peer": ""}]},
                {k: v for k, v in body.items() if k != "seq"},  # a chained step needs a seq
                {**body, "hidden": encode_hidden(hidden(9)).to_dict()},  # prefill is never chained
                {**body, "fence": -1}):
        with pytest.raises(RemoteProtocolError):
            S.Step.from_body(bad)


def test_relay_step_and_chain_result_parse_strictly() -> None:
    x = encode_hidden(hidden(2))
    entry = S.TrailEntry(x, b"s" * 64, False, 1.5)
    hop = S.ChainHop("12D3KooWpeer", 7, b"k" * 16)
    rs = S.RelayStep(9, b"t" * 16, 4, 3, (hop,), (entry,))
    assert S.RelayStep.from_body(rs.to_body()) == rs
    assert rs.hidden == x
    result = S.ChainResult(4, 3, (entry, entry))
    assert S.ChainResult.from_body(result.to_body()) == result
    body = rs.to_body()
    other_rows = S.TrailEntry(encode_hidden(hidden(1)), b"s" * 64, False, 0.0).to_body()
    for bad in ({**body, "seq": 0}, {**body, "relay": b"x"}, {**body, "trail": []},
                {**body, "trail": [entry.to_body(), other_rows]},  # entries disagree on rows
                {**body, "trail": [{**entry.to_body(), "sig": b"short"}]},
                {**body, "trail": [{**entry.to_body(), "ms": float("nan")}]},
                {**body, "trail": [{**entry.to_body(), "draining": "no"}]},
                {**body, "chain": [hop.to_body()] * 8, "trail": [entry.to_body()] * 2},  # > 9 hops
                {**body, "extra": 1}, {k: v for k, v in body.items() if k != "chain"}):
        with pytest.raises(RemoteProtocolError):
            S.RelayStep.from_body(bad)
    assert S.relay_batch({"steps": [body, "x"]}) == [body, "x"]  # entries are parsed one by one
    assert S.relay_bodies("relay_step", body) == [body]
    assert S.relay_bodies("relay_steps", {"steps": [body, body]}) == [body, body]
    with pytest.raises(RemoteProtocolError):
        S.relay_bodies("step", body)
    for bad_frame in ({"steps": []}, {"steps": [body] * (S.RELAY_BATCH_MAX + 1)}, {"steps": body},
                      {"steps": [body], "extra": 1}, {}):
        with pytest.raises(RemoteProtocolError):
            S.relay_batch(bad_frame)
    for bad_entry in ("x", [], None, list(body)):  # not a map: a clear error, not a TypeError
        with pytest.raises(RemoteProtocolError):
            S.RelayStep.from_body(bad_entry)
    for bad_result in ({"position": 4, "seq": 3, "trail": "x"}, {"position": -1, "seq": 3, "trail": []},
                       {"position": 4, "trail": [entry.to_body()]}):
        with pytest.raises(RemoteProtocolError):
            S.ChainResult.from_body(bad_result)
    assert S.StepResult.from_body({**S.StepResult(0, x).to_body(), "ahead": 2}).ahead == 2
    with pytest.raises(RemoteProtocolError):
        S.StepResult.from_body({**S.StepResult(0, x).to_body(), "ahead": -1})


# -- three stage servers on real hosts --------------------------------------------------------------
@pytest.fixture(scope="module")
def stages(model_file: Any) -> list[Stage]:
    return [load_stage(model_file, a, b) for a, b in RANGES]


@dataclass
class Hop:
    server: StageServer
    host: Host
    peer: str
    fs: FramedStream
    session: int
    relay: bytes


@asynccontextmanager
async def chain_of_servers(stages: list[Stage], config: ServerConfig | None = None
                           ) -> AsyncIterator[tuple[Host, list[Hop]]]:
    """Three stage servers that relay to each other, and a client host with a session on each."""
    config = config or ServerConfig()
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
        hosts, servers = [], []
        for stage in stages:
            key = Ed25519PrivateKey.generate()
            host = await stack.enter_async_context(open_host(key, HostConfig()))
            addrs: dict[str, list[str]] = {}
            links = RelayLinks(host, lambda peer, addrs=addrs: addrs.get(peer, []))
            server = StageServer(stage, config, key=key, relay=links.send)

            def find(sid: int, server: StageServer = server) -> StageServer | None:
                return server if server.holds(sid) else None

            def dropped(why: str, server: StageServer = server) -> None:
                server.stats.relay_dropped[why] = server.stats.relay_dropped.get(why, 0) + 1

            async def relay_handler(fs: FramedStream, find: Any = find, dropped: Any = dropped) -> None:
                await serve_relay(fs, find, dropped)

            host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
            host.set_stream_handler(S.RELAY_PROTOCOL, relay_handler)
            host.set_stream_handler(S.RELAY_PROTOCOL_1_0, relay_handler)  # as node.hosting does
            hosts.append((host, addrs))
            servers.append(server)
        for _host, addrs in hosts:  # every server may dial every other
            for other, _ in hosts:
                addrs[other.peer_id] = other.multiaddrs()
        hops = []
        for (host, _), server, stage in zip(hosts, servers, stages, strict=True):
            peer = await client.connect(host.multiaddrs()[0])
            fs = await client.open_stream(peer, S.STAGE_PROTOCOL)
            await fs.send("session_open", S.OpenRequest(stage.model_id, stage.start, stage.end,
                                                        MAX_LEN).to_body(), timeout=5)
            opened = (await fs.receive_reply(timeout=5)).body
            assert len(opened["relay"]) == S.RELAY_TOKEN_LEN  # it offers chaining
            hops.append(Hop(server, host, peer, fs, opened["session"], opened["relay"]))
        yield client, hops


async def plain_step(fs: FramedStream, x: np.ndarray, position: int, fence: int = 0) -> S.StepResult:
    await fs.send("step", S.Step(position, encode_hidden(x), fence=fence).to_body(), timeout=5)
    return S.StepResult.from_body((await fs.receive_reply(timeout=10)).body)


async def through(hops: list[Hop], x: np.ndarray, position: int, fence: int = 0) -> np.ndarray:
    """``x`` through every hop as plain steps (the client between hops), the last output."""
    for h in hops:
        x = decode_hidden((await plain_step(h.fs, x, position, fence)).hidden, TensorLimits())
    return x


def chain_to(hops: list[Hop]) -> tuple[S.ChainHop, ...]:
    return tuple(S.ChainHop(h.peer, h.session, h.relay) for h in hops)


async def chained(hops: list[Hop], x: np.ndarray, position: int, seq: int) -> S.ChainResult:
    step = S.Step(position, encode_hidden(x), chain_to(hops[1:]), seq)
    await hops[0].fs.send("step", step.to_body(), timeout=5)
    env = await hops[-1].fs.receive_reply(timeout=10)
    assert env.kind == "chain_result", env
    return S.ChainResult.from_body(env.body)


async def test_a_chained_step_equals_hop_by_hop_and_every_hop_signs_its_part(
        stages: list[Stage], client_model: Any) -> None:
    prompt = hidden(5, 1)
    caches = [s.new_cache() for s in stages]
    x = prompt
    for stage, cache in zip(stages, caches, strict=True):  # what each hop must compute
        x = stage.forward(x, cache, 0)
    async with chain_of_servers(stages) as (client, hops):
        y = await through(hops, prompt, 0)  # the prefill goes hop by hop, as the client does it
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * np.abs(x).max())
        for position, seq in ((5, 1), (6, 2), (7, 3)):
            d = hidden(1, position)
            want = [d]
            for stage, cache in zip(stages, caches, strict=True):
                want.append(stage.forward(want[-1], cache, position))
            result = await chained(hops, d, position, seq)
            assert (result.position, result.seq, len(result.trail)) == (position, seq, 3)
            sent = encode_hidden(d)
            for i, (h, entry) in enumerate(zip(hops, result.trail, strict=True)):
                got = decode_hidden(entry.hidden, TensorLimits())
                np.testing.assert_allclose(got, want[i + 1], rtol=0, atol=1e-5 * np.abs(want[i + 1]).max())
                stage = stages[i]
                StepCommitment(h.peer, client.peer_id, stage.model_id, stage.start, stage.end, h.session,
                               position, 1, rows_root(row_digests(sent)),
                               rows_root(row_digests(entry.hidden))).verify(entry.sig)
                assert not entry.draining and entry.ms > 0
                sent = entry.hidden  # the next hop's input, exactly as it travelled
        assert [h.server.stats.relayed for h in hops] == [3, 3, 0]
        assert [h.server.stats.tokens for h in hops] == [8, 8, 8]
        # Back to hop by hop at any time: the sessions are ordinary sessions.
        await through(hops, hidden(1, 9), 8)


async def test_relayed_steps_with_a_wrong_token_or_session_are_dropped_and_the_stream_closed(
        stages: list[Stage]) -> None:
    async with chain_of_servers(stages) as (client, hops):
        b = hops[1]
        async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as stranger:
            await stranger.connect(b.host.multiaddrs()[0])
            fs = await stranger.open_stream(b.peer, S.RELAY_PROTOCOL)
            entry = S.TrailEntry(encode_hidden(hidden(1)), b"s" * 64, False, 0.0)
            for i in range(R.RELAY_MAX_DROPPED + 4):  # a guessed token, then unknown sessions
                session = b.session if i % 2 else b.session + 1000
                rs = S.RelayStep(session, bytes(16), 0, i + 1, (), (entry,))
                try:
                    await fs.send("relay_step", rs.to_body(), timeout=2)
                except Exception:
                    break  # the server hung up
            with trio.fail_after(5):
                while sum(b.server.stats.relay_dropped.values()) < R.RELAY_MAX_DROPPED:
                    await trio.sleep(0.02)
            assert b.server.stats.tokens == 0  # nothing computed for the stranger
            assert set(b.server.stats.relay_dropped) == {"unknown session or relay token"}
            assert client.peer_id not in b.server.stats.relay_dropped
        # The real chain is unharmed.
        await through(hops, hidden(2, 3), 0)
        result = await chained(hops, hidden(1, 4), 2, 1)
        assert result.seq == 1


async def test_a_relay_stream_with_garbage_ends_and_the_server_goes_on(stages: list[Stage]) -> None:
    async with chain_of_servers(stages) as (_client, hops):
        b = hops[1]
        async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as stranger:
            await stranger.connect(b.host.multiaddrs()[0])
            fs = await stranger.open_stream(b.peer, S.RELAY_PROTOCOL)
            await fs.send("relay_step", {"session": "x"}, timeout=2)  # malformed: counted, skipped
            await fs.send("step", {"position": 0}, timeout=2)  # another kind: the stream ends
            with trio.fail_after(5):
                while not b.server.stats.relay_dropped.get("malformed"):
                    await trio.sleep(0.02)
        await through(hops, hidden(1, 3), 0)


async def hung_up(fs: FramedStream, kind: str, body: dict[str, Any]) -> bool:
    """Whether the receiver reset ``fs`` within 5 s (we keep sending until a send fails)."""
    with trio.move_on_after(5):
        while True:
            try:
                await fs.send(kind, body, timeout=2)
            except NetworkError:
                return True
            await trio.sleep(0.05)
    return False


async def test_a_relay_steps_frame_is_served_entry_by_entry(stages: list[Stage]) -> None:
    async with chain_of_servers(stages) as (_client, hops):
        _a, b, c = hops
        await through(hops, hidden(2, 5), 0)
        entry = S.TrailEntry(encode_hidden(hidden(1, 6)), b"s" * 64, False, 0.0)
        good = S.RelayStep(b.session, b.relay, 2, 1, chain_to([c]), (entry,)).to_body()
        stale = {**good, "seq": 1}  # the same seq again: a replay
        unknown = {**good, "session": b.session + 1000}
        async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as upstream:
            await upstream.connect(b.host.multiaddrs()[0])
            fs = await upstream.open_stream(b.peer, [S.RELAY_PROTOCOL, S.RELAY_PROTOCOL_1_0])
            assert fs.protocol == S.RELAY_PROTOCOL
            await fs.send("relay_steps", {"steps": ["x", unknown, good, {"session": 1}]}, timeout=2)
            env = await c.fs.receive_reply(timeout=10)  # the good one went on through C
            assert env.kind == "chain_result" and S.ChainResult.from_body(env.body).seq == 1
            await fs.send("relay_steps", {"steps": [stale]}, timeout=2)  # the stream is still served
            with trio.fail_after(5):
                while not b.server.stats.relay_dropped.get("stale"):
                    await trio.sleep(0.02)
            assert b.server.stats.relay_dropped == {"malformed": 2, "unknown session or relay token": 1,
                                                    "stale": 1}
            assert b.server.stats.tokens == 3  # the prefill and the good step, nothing else
            await fs.send("relay_steps", {"steps": "x"}, timeout=2)  # a bad frame ends the stream
            assert await hung_up(fs, "relay_steps", {"steps": [stale]})
            # A 1.0.0 stream takes one relay_step per frame: relay_steps there is another kind.
            old = await upstream.open_stream(b.peer, S.RELAY_PROTOCOL_1_0)
            assert old.protocol == S.RELAY_PROTOCOL_1_0
            await old.send("relay_steps", {"steps": [stale]}, timeout=2)
            assert await hung_up(old, "relay_step", stale)
            assert b.server.stats.relay_dropped["stale"] == 1  # neither stream served anything more
        await through(hops, hidden(1, 7), 2)  # A never saw position 2 (we fed B directly)
        assert (await chained(hops, hidden(1, 8), 3, 2)).seq == 2  # the real chain is unharmed


async def test_steps_ready_together_go_in_one_frame_and_a_1_0_peer_gets_one_each() -> None:
    async with AsyncExitStack() as stack:
        sender = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
        frames: dict[str, list[tuple[str, list[int]]]] = {}
        receivers = {}
        for protocol in (S.RELAY_PROTOCOL, S.RELAY_PROTOCOL_1_0):
            host = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
            got = frames.setdefault(host.peer_id, [])

            async def receive(fs: FramedStream, got: list[tuple[str, list[int]]] = got) -> None:
                with contextlib.suppress(NetworkError, trio.TooSlowError):
                    while True:
                        env = await fs.receive(timeout=5)
                        bodies = S.relay_bodies(env.kind, env.body)
                        got.append((env.kind, [S.RelayStep.from_body(b).seq for b in bodies]))

            host.set_stream_handler(protocol, receive)  # the 1.0.0 host speaks nothing newer
            receivers[protocol] = host
        links = RelayLinks(sender, lambda peer: next(h.multiaddrs() for h in receivers.values()
                                                     if h.peer_id == peer))
        entry = S.TrailEntry(encode_hidden(hidden(1)), b"s" * 64, False, 0.0)
        for host in receivers.values():
            async with trio.open_nursery() as nursery:  # a batch's 4 steps, ready together
                for seq in (1, 2, 3, 4):
                    body = S.RelayStep(7, b"t" * 16, 0, seq, (), (entry,)).to_body()
                    nursery.start_soon(links.send, host.peer_id, body)
            await links.send(host.peer_id, S.RelayStep(7, b"t" * 16, 1, 5, (), (entry,)).to_body())
            with trio.fail_after(5):
                while sum(len(seqs) for _, seqs in frames[host.peer_id]) < 5:
                    await trio.sleep(0.01)
        got_new = frames[receivers[S.RELAY_PROTOCOL].peer_id]
        got_old = frames[receivers[S.RELAY_PROTOCOL_1_0].peer_id]
        # The 4 tasks queue in the order trio runs them; one task's steps keep their order.
        assert [(kind, sorted(seqs)) for kind, seqs in got_new] == [("relay_steps", [1, 2, 3, 4]),
                                                                     ("relay_step", [5])]
        assert [kind for kind, _ in got_old] == ["relay_step"] * 5
        assert sorted(seqs[0] for _, seqs in got_old[:4]) == [1, 2, 3, 4] and got_old[4][1] == [5]
        assert (links.frames, links.steps) == (7, 10)
        # Big steps (wide rows, a long trail) split into frames of about RELAY_BATCH_BYTES.
        wide = S.TrailEntry(encode_hidden(np.zeros((8, 4096), np.float32)), b"s" * 64, False, 0.0)
        host = receivers[S.RELAY_PROTOCOL]
        before = len(frames[host.peer_id])
        async with trio.open_nursery() as nursery:  # 8 steps of ~0.4 MiB each: 2 per frame
            for seq in range(6, 14):
                body = S.RelayStep(7, b"t" * 16, 2, seq, (), (wide,) * 3).to_body()
                nursery.start_soon(links.send, host.peer_id, body)
        with trio.fail_after(5):
            while sum(len(seqs) for _, seqs in frames[host.peer_id][before:]) < 8:
                await trio.sleep(0.01)
        assert [len(seqs) for _, seqs in frames[host.peer_id][before:]] == [2, 2, 2, 2]


async def test_a_fence_drops_relayed_steps_the_client_gave_up_on(stages: list[Stage]) -> None:
    async with chain_of_servers(stages) as (_client, hops):
        _a, b, c = hops
        await through(hops, hidden(3, 5), 0)
        # The client gave up on chained step 4 and redid position 3 hop by hop, fencing 4 off.
        d = hidden(1, 6)
        await through(hops, d, 3, fence=4)
        tokens = b.server.stats.tokens
        # Step 4 still arrives at B, late (here: sent by us, holding its token like A would).
        async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as late:
            await late.connect(b.host.multiaddrs()[0])
            fs = await late.open_stream(b.peer, S.RELAY_PROTOCOL)
            entry = S.TrailEntry(encode_hidden(d), b"s" * 64, False, 0.0)
            late_step = S.RelayStep(b.session, b.relay, 3, 4, chain_to([c]), (entry,))
            await fs.send("relay_step", late_step.to_body(), timeout=2)
            with trio.fail_after(5):
                while not b.server.stats.relay_dropped.get("stale"):
                    await trio.sleep(0.02)
        assert b.server.stats.tokens == tokens  # not computed: B's cache still holds position 3
        # Step 5 is new: chained from A as usual, position 4.
        result = await chained(hops, hidden(1, 7), 4, 5)
        assert result.seq == 5 and b.server.stats.tokens == tokens + 1


async def test_a_chain_to_an_unreachable_hop_fails_back_to_the_client(stages: list[Stage]) -> None:
    async with chain_of_servers(stages) as (_client, hops):
        a, b, c = hops
        await through(hops, hidden(2, 5), 0)
        ghost = S.ChainHop("12D3KooWGhostGhostGhostGhostGhostGhostGhostGhost11", 1, bytes(16))
        await a.fs.send("step", S.Step(2, encode_hidden(hidden(1)), (ghost, *chain_to([c])), 1).to_body(),
                        timeout=5)
        env = await a.fs.receive(timeout=10)  # A tells us on its own stream, naming the step
        assert env.kind == "chain_failed" and env.body["seq"] == 1 and env.body["position"] == 2
        assert a.server.stats.chain_failed == 1
        # A computed position 2: a plain redo says so (ahead), for the receipt's count.
        result = await plain_step(a.fs, hidden(1), 2, fence=1)
        assert result.ahead == 1
        # A chained step to a session that is closing gets chain_failed from that hop.
        await c.fs.send("receipt_proposal", {"body": b"", "client_sig": b""}, timeout=5)
        assert (await c.fs.receive(timeout=5)).kind == "error"  # no ledger: refused, but closing
        await plain_step(b.fs, hidden(1), 2)  # B holds position 2 too; C is closing
        await a.fs.send("step", S.Step(3, encode_hidden(hidden(1)), chain_to([b, c]), 2).to_body(), timeout=5)
        env = await c.fs.receive(timeout=10)
        while env.kind == "chain_failed" and env.body["seq"] != 2:
            env = await c.fs.receive(timeout=10)
        assert env.kind == "chain_failed" and "closing" in env.body["message"]


async def test_relayed_steps_keep_a_session_from_idling_out(stages: list[Stage]) -> None:
    async with chain_of_servers(stages, ServerConfig(idle_timeout_s=1.0)) as (_client, hops):
        await through(hops, hidden(1, 5), 0)
        for k in range(8):  # 2.4 s of chained steps: B and C hear nothing from the client
            await chained(hops, hidden(1, k), 1 + k, 1 + k)
            await trio.sleep(0.3)
        assert [h.server.active_sessions for h in hops] == [1, 1, 1]
        assert [h.server.stats.idle_closed for h in hops] == [0, 0, 0]


# -- a client over an in-process fleet of real nodes ----------------------------------------------
PROMPT = "The capital of France is"


def node_config(tmp_path: Path, i: int, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path / f"n{i}", vehicle="sim:parked", bootstrap=bootstrap,
                      consent=True, memory_budget_mb=140, rebalance_s=60.0)


@asynccontextmanager
async def fleet_client(tmp_path: Path, client_model: ClientModel
                       ) -> AsyncIterator[tuple[FleetClient, dict[tuple[int, int], Node]]]:
    """Three serving nodes (blocks [0, 10), [10, 20), [20, 30)) with ledgers, and a client node."""
    async with running_fleet(lambda i, boot: node_config(tmp_path, i, boot), 3) as nodes:
        cfg = NodeConfig(data_dir=tmp_path / "client", bootstrap=(nodes[0].multiaddrs[0],),
                         vehicle="sim:parked", serve=False)
        async with open_node(cfg) as me:
            client = FleetClient(me, client_model, ClientConfig())
            await client.wait_ready(timeout=30)
            yield client, {n.blocks: n for n in nodes if n.blocks}


def edit_forwarded(monkeypatch: pytest.MonkeyPatch, node: Node,
                   edit: Callable[[dict[str, Any]], None]) -> None:
    """``node``'s stage server passes every relay_step body it forwards through ``edit`` first."""
    hosting = node.hosting
    assert hosting is not None and hosting.server is not None
    server = hosting.server
    forward = server._relay
    assert forward is not None

    async def edited(peer: str, body: dict[str, Any]) -> None:
        edit(body)
        await forward(peer, body)

    monkeypatch.setattr(server, "_relay", edited)


async def test_generation_chains_and_a_broken_chain_loses_no_token_and_no_receipt(
        tmp_path: Path, client_model: ClientModel, local_greedy: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    want = list(local_greedy(PROMPT, 10))
    # A's chain_failed reaches the client on A's stream while it waits on C's: it redoes the step
    # after this wait. Not much shorter: under load (the whole suite on 2 cores) a healthy chained
    # step took over 0.3 s once, and an extra chain failure changes the counts below.
    monkeypatch.setattr(P, "CHAIN_MIN_WAIT_S", 1.0)
    async with fleet_client(tmp_path, client_model) as (client, by_blocks):
        result = await client.generate(PROMPT, max_new_tokens=10)
        assert result.new_ids == want
        assert (result.chained_steps, result.chain_failures) == (10, 0)  # the prefill fits a chain too
        assert [by_blocks[b].hosting.server.stats.relayed  # type: ignore[union-attr]
                for b in sorted(by_blocks)] == [10, 10, 0]
        # A cannot reach B for one step: A says chain_failed, the client redoes the step hop by hop
        # and goes on hop by hop for a while; same tokens, no peer banned.
        a = by_blocks[(0, 10)].hosting
        assert a is not None and a.server is not None
        send, failed = a.server._relay, []
        assert send is not None
        fail_at = len(client.encode_prompt(PROMPT)) + 4  # the 6th step: prefill + 4 decode steps went

        async def flaky(peer: str, body: dict[str, Any]) -> None:
            if body["position"] >= fail_at and not failed:
                failed.append(peer)
                raise NetworkError("link to B is down (test)")
            await send(peer, body)

        monkeypatch.setattr(a.server, "_relay", flaky)
        result = await client.generate(PROMPT, max_new_tokens=10)
        assert failed, failed
        assert result.new_ids == want, (result.new_ids, want, fail_at)
        assert result.chain_failures == 1 and result.chained_steps == 5  # then hop by hop (16 steps)
        assert not client.banned()
        assert a.server.stats.chain_failed == 1
        # Every session's receipt matches its server's count: A computed that position twice (the
        # chained step, then the redo), and the client learned it from the redo's "ahead".
        with trio.fail_after(10):
            while client.statistics().receipts_pending:
                await trio.sleep(0.05)
        stats = client.statistics()
        assert stats.receipts_stored == 6 and not stats.receipts_refused


async def test_a_hop_that_tampers_with_or_forges_an_earlier_entry_frames_no_one(
        tmp_path: Path, client_model: ClientModel, local_greedy: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    want = list(local_greedy(PROMPT, 8))
    monkeypatch.setattr(P, "CHAIN_MIN_WAIT_S", 0.3)
    async with fleet_client(tmp_path, client_model) as (client, by_blocks):

        def tamper(body: dict[str, Any]) -> None:
            first = body["trail"][0]["hidden"]  # A's output, signed by A: B flips one byte
            data = bytearray(first["data"])
            data[0] ^= 1
            first["data"] = bytes(data)

        edit_forwarded(monkeypatch, by_blocks[(10, 20)], tamper)
        result = await client.generate(PROMPT, max_new_tokens=8)
        assert result.new_ids == want  # every broken chained step was redone hop by hop
        assert result.chain_failures >= 1
        assert not client.banned()  # A's signature did not match what reached us: no proof who lied
        with trio.fail_after(10):
            while client.statistics().receipts_pending:
                await trio.sleep(0.05)
        stats = client.statistics()
        assert stats.receipts_stored == 3 and not stats.receipts_refused  # counts still agree

        # B forges A's draining flag (not signed): A is asked with a plain step, says no, stays.
        monkeypatch.undo()

        def forge(body: dict[str, Any]) -> None:
            body["trail"][0]["draining"] = True

        edit_forwarded(monkeypatch, by_blocks[(10, 20)], forge)
        result = await client.generate(PROMPT, max_new_tokens=8)
        assert result.new_ids == want
        assert by_blocks[(0, 10)].peer_id in {h["peer_id"] for h in result.route}  # not moved
        assert 0 < result.chained_steps < 8 and result.chain_failures == 0  # every other step plain


async def test_relay_streams_are_reopened_after_the_receiver_hung_up(
        stages: list[Stage], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "RELAY_IDLE_S", 0.5)  # receivers hang up on a silent relay stream fast
    async with chain_of_servers(stages) as (_client, hops):
        await through(hops, hidden(1, 5), 0)
        await chained(hops, hidden(1, 1), 1, 1)
        await trio.sleep(1.0)  # B and C closed the relay streams from A and B
        result = await chained(hops, hidden(1, 2), 2, 2)  # A and B open new ones
        assert result.seq == 2
        monkeypatch.setattr(R, "RELAY_REUSE_S", 0.0)  # a sender replaces any stream it has not just used
        await trio.sleep(0.01)
        assert (await chained(hops, hidden(1, 3), 3, 3)).seq == 3
        assert [h.server.stats.chain_failed for h in hops] == [0, 0, 0]


async def test_relaying_to_many_unknown_peers_keeps_nothing(stages: list[Stage]) -> None:
    async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as host:
        links = RelayLinks(host, lambda peer: [])
        for i in range(5 * R.RELAY_MAX_OUT):  # a client naming a new next hop in every step
            with pytest.raises(NetworkError):
                await links.send(f"12D3KooWNobody{i:08d}", {})
        assert len(links._locks) <= 4 * R.RELAY_MAX_OUT + 1 and not links._out
        assert len(links._queues) <= 4 * R.RELAY_MAX_OUT + 1 and not any(links._queues.values())


def test_a_chained_steps_time_is_shared_within_bounds_whatever_the_servers_claim() -> None:
    hops = [SimpleNamespace(start=a, end=a + 10) for a in (0, 10, 20)]
    assert P._time_shares(hops, [10.0, 10.0, 10.0]) == pytest.approx([1 / 3] * 3)
    assert P._time_shares(hops, [0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)  # no claims: by blocks
    # c says it was instant and the others slow: at most twice and half the fair shares.
    assert P._time_shares(hops, [1000.0, 1000.0, 0.0]) == pytest.approx([3 / 7, 3 / 7, 1 / 7])
    assert P._time_shares(hops, [float("inf"), 1.0, 1.0]) == pytest.approx(
        P._time_shares(hops, [1e12, 1.0, 1.0]))  # no NaN from a huge claim
