"""Whole nodes on the in-memory network and virtual time: membership, gossip intake, the record
publisher, liveness-driven eviction and discovery entry points (tests/memfleet.py)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.runtime.discovery import load_peers_file
from idlefleet.node.runtime.node import STATUS_PROTOCOL, Node, capacity_topic, request_status
from idlefleet.p2p.errors import RemoteError
from idlefleet.protocols import wire
from idlefleet.protocols.records import encode_signed, validate_record
from tests.memfleet import virtual_world, wait_until
from tests.test_node import forged_record, own_record

# Liveness defaults (LivenessConfig): heartbeats every 1 s, 2 misses of 2 s, then indirect probes
# (2 s): a frozen peer goes within 1 + 2 * 2 + 2 = 7 s (+ the round in flight).
EVICTION_BOUND_S = 9.0


@pytest.fixture
def mem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    return virtual_world(tmp_path, monkeypatch)


def ids(records: Any) -> set[str]:
    return {r.peer_id for r in records}


def events(node: Node, kind: str) -> list[dict[str, Any]]:
    path = node.config.events_path
    assert path is not None
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


async def converged(nodes: list[Node], timeout: float = 20.0) -> float:
    want = {n.peer_id for n in nodes}
    return await wait_until(lambda: all(ids(n.fleet()) == want for n in nodes), timeout=timeout)


async def test_five_nodes_converge_and_report_status(
        autojump_clock: Any, mem: Any) -> None:
    """Moved from test_node.py (real libp2p in one process, real clock)."""
    async with mem.fleet() as fleet:
        nodes = await fleet.start(5)
        assert await converged(nodes) < 1.0  # bootstrap status replies: no refresh needed
        for r in nodes[2].fleet():
            assert r.region == "u33d" and r.consent is True and 0.0 <= r.battery_soc <= 1.0
            assert r.state in ("joining", "online")
        async with fleet.network.open_host(Ed25519PrivateKey.generate()) as plain:
            peer = await plain.connect(nodes[4].multiaddrs[0])
            status = await request_status(plain, peer, timeout=5)  # type: ignore[arg-type]
        assert ids(validate_record(raw, time.time()) for raw in status.records) == {n.peer_id for n in nodes}
        assert all(n.rejected.total() == 0 for n in nodes)
        # A node leaving cleanly publishes "offline": the rest drop it at once, not at expiry.
        leaving = nodes[3]
        fleet.stop(leaving)
        took = await wait_until(lambda: all(leaving.peer_id not in ids(n.fleet()) for n in fleet.nodes))
        assert took < 0.5


async def test_bad_gossip_is_rejected_counted_and_never_enters_the_view(
        autojump_clock: Any, mem: Any) -> None:
    """Moved from test_node.py: the node's gossip validator, fed by a rogue host, decides as over
    GossipSub; rejected messages are not forwarded to the node's other peers."""
    async with mem.fleet() as fleet:
        node, other = await fleet.start(2)
        await converged([node, other])
        rogue_key = Ed25519PrivateKey.generate()
        async with fleet.network.open_host(rogue_key) as rogue:
            await rogue.connect(node.multiaddrs[0])
            topic = capacity_topic("u33d")
            await rogue.subscribe(topic, lambda origin, data: True)
            victim = node.view.get(other.peer_id)
            assert victim is not None
            other.request_publish()  # so that ``victim.raw`` becomes an old record
            await wait_until(lambda: node.view.get(other.peer_id).record.seq > victim.record.seq)  # type: ignore[union-attr]
            now = time.time()
            fresh = {"issued_at": now, "expires_at": now + 60, "seq": int(now * 1000)}
            bad: list[tuple[str, bytes]] = [
                ("malformed", b"\x00garbage\xff" * 10),
                ("malformed", wire.encode_envelope("capacity", {"record": b"\x93not a record"})),
                ("bad_signature", wire.encode_envelope("capacity", {
                    "record": forged_record(victim.record, rogue_key, resign=False)})),
                ("signer_mismatch", wire.encode_envelope("capacity", {
                    "record": forged_record(victim.record, rogue_key, resign=True)})),
                ("expired", wire.encode_envelope("capacity", {"record": encode_signed(own_record(
                    rogue_key, victim.record, issued_at=now - 120, expires_at=now - 60), rogue_key)})),
                ("not_yet_valid", wire.encode_envelope("capacity", {"record": encode_signed(own_record(
                    rogue_key, victim.record, issued_at=now + 300, expires_at=now + 400), rogue_key)})),
                ("stale_sequence", wire.encode_envelope("capacity", {"record": victim.raw})),
                ("oversized", wire.encode_envelope("capacity", {"record": b"\x00" * 5000})),
            ]
            for _reason, data in bad:
                await rogue.publish(topic, data)
            await rogue.publish(topic, wire.encode_envelope("capacity", {
                "record": encode_signed(own_record(rogue_key, victim.record, **fresh), rogue_key)}))
            await wait_until(lambda: rogue.peer_id in ids(node.fleet()), timeout=10)
            expected: dict[str, int] = {}
            for reason, _ in bad:
                expected[reason] = expected.get(reason, 0) + 1
            assert dict(node.rejected) == expected
            assert ids(node.fleet()) == {node.peer_id, other.peer_id, rogue.peer_id}
            # Only the valid record was forwarded: ``other`` rejected nothing, and knows the rogue.
            await wait_until(lambda: rogue.peer_id in ids(other.fleet()), timeout=5)
            assert other.rejected.total() == 0
            current = node.view.get(other.peer_id)
            assert current is not None and current.record.seq > victim.record.seq  # replay ignored


async def test_gossip_replays_only_current_records(
        autojump_clock: Any, mem: Any) -> None:
    """Moved from test_node.py: a late subscriber is not handed superseded records."""
    async with mem.fleet() as fleet:
        (node,) = await fleet.start(1)
        seqs = []
        for _ in range(3):  # three records within the cache window (the minimum interval is 1 s)
            seqs.append((await node.publish_record("forced")).seq)
            await trio.sleep(1.05)
        got: list[int] = []

        def collect(origin: str, data: bytes) -> bool:
            env = wire.decode_envelope(data)
            if env.kind == "capacity":
                got.append(validate_record(env.body["record"], time.time()).seq)
            return True

        async with fleet.network.open_host(Ed25519PrivateKey.generate()) as host:
            await host.subscribe(capacity_topic("u33d"), collect)
            await host.connect(node.multiaddrs[0])
            await trio.sleep(2.0)
        assert got and got[0] == seqs[-1], f"replayed {got}, published {seqs}"
        assert got == sorted(set(got)), f"stale records replayed: {got}"


async def test_a_request_of_the_wrong_kind_gets_a_clear_error_and_the_node_keeps_serving(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        (node,) = await fleet.start(1)
        async with fleet.network.open_host(Ed25519PrivateKey.generate()) as plain:
            await plain.connect(node.multiaddrs[0])
            with pytest.raises(RemoteError, match="bad_request"):
                await plain.request(node.peer_id, STATUS_PROTOCOL, "heartbeat", {"nonce": 1})
            status = await request_status(plain, node.peer_id, timeout=5)  # type: ignore[arg-type]
            assert len(status.records) == 1
        assert node.host.misbehaviour.score(plain.peer_id) >= 1


async def test_unchanged_state_is_republished_every_refresh_s(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        a, b = await fleet.start(2, refresh_s=10.0, record_ttl_s=30.0)
        await converged([a, b])
        await trio.sleep(45)
        times = [e["t"] for e in events(a, "published") if e["reason"] == "refresh"]
        assert len(times) == 4, times
        gaps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
        assert all(10.0 <= g <= 11.01 for g in gaps), gaps  # refresh_s, at the vehicle poll's grain
        # ... and every refresh reached the peer: its copy is never older than one refresh.
        held = b.view.get(a.peer_id)
        assert held is not None and time.time() - held.record.issued_at <= 11.01


async def test_a_state_change_is_published_at_once(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        a, b = await fleet.start(2)
        await converged([a, b])
        await trio.sleep(5)
        started = trio.current_time()
        await a.drain(timeout=1.0)
        await wait_until(lambda: any(r.peer_id == a.peer_id and r.state == "draining" for r in b.fleet()))
        assert trio.current_time() - started < 0.2
        assert events(a, "published")[-1]["reason"] == "state"


async def test_forced_publishes_keep_the_minimum_interval(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        (a,) = await fleet.start(1)
        await trio.sleep(5)
        before = len(events(a, "published"))
        for _ in range(10):  # a flood of refutations / block changes
            a.request_publish()
            await trio.sleep(0.1)
        await trio.sleep(3)
        times = [e["t"] for e in events(a, "published")[before:]]
        assert 1 <= len(times) <= 3, times
        assert all(t1 - t0 >= 1.0 - 1e-6 for t0, t1 in itertools.pairwise(times)), times


async def test_a_significant_battery_change_waits_for_nothing_but_the_minimum_interval(
        mem: Any, tmp_path: Path) -> None:
    state = tmp_path / "car.json"
    parked = {"battery_soc": 0.8, "plugged_in": True, "charging_kw": 7.0, "thermal_headroom_c": 20.0,
              "parked": True, "parked_since": time.time() - 3600, "expected_departure": None,
              "updated_at": time.time()}
    state.write_text(json.dumps(parked))
    async with mem.fleet() as fleet:
        a, b = await fleet.start(2, vehicle=f"file:{state}")
        await converged([a, b])
        await trio.sleep(3)
        state.write_text(json.dumps({**parked, "battery_soc": 0.7, "updated_at": time.time()}))
        took = await wait_until(lambda: any(r.peer_id == a.peer_id and r.battery_soc == pytest.approx(0.7)
                                            for r in b.fleet()))
        assert took <= 1.1  # the next vehicle poll
        assert events(a, "published")[-1]["reason"] not in ("refresh", "forced")


async def test_a_record_expires_for_peers_at_its_ttl(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        # Heartbeats so slow that only the record's expiry can drop a silent peer.
        slow = {"record_ttl_s": 10.0, "refresh_s": 5.0, "heartbeat_s": 60.0, "heartbeat_timeout_s": 60.0}
        a, b, x = await fleet.start(3, **slow)
        await converged([a, b, x])
        await trio.sleep(2)
        fleet.network.freeze(x.peer_id)
        last = x.view.get(x.peer_id)
        assert last is not None
        await wait_until(lambda: x.peer_id not in ids(a.fleet()) | ids(b.fleet()), timeout=15)
        assert time.time() - last.record.expires_at == pytest.approx(0.0, abs=0.11)
        assert x.peer_id in a.host.connected_peers()  # the expiry dropped it, not liveness


async def test_a_frozen_node_is_evicted_after_the_heartbeat_deadline_and_indirect_probes(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(4)
        await converged(nodes)
        await trio.sleep(3)  # heartbeats measured: every peer routable
        x, rest = nodes[3], nodes[:3]
        assert all(x.peer_id in ids(n.routable()) for n in rest)
        fleet.network.freeze(x.peer_id)
        took = await wait_until(lambda: all(x.peer_id not in ids(n.fleet()) for n in rest), timeout=30)
        assert 4.0 <= took <= EVICTION_BOUND_S, took  # not before two missed deadlines
        assert sum(n.host.stats.evictions for n in rest) >= 1
        assert all(x.peer_id not in n.host.connected_peers() for n in rest)
        assert any(e["peer"] == x.peer_id for n in rest for e in events(n, "peer_down"))
        assert all(ids(n.fleet()) == ids(rest) for n in rest)  # nobody else was lost


async def test_a_killed_node_is_dropped_at_once(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3)
        await converged(nodes)
        await trio.sleep(2)
        x = nodes[2]
        fleet.kill(x)
        took = await wait_until(lambda: all(x.peer_id not in ids(n.fleet()) for n in fleet.nodes))
        assert took < 0.5, took  # EOF: re-probed at once, the dial is refused


async def test_a_peer_cut_off_from_one_node_is_kept_alive_by_indirect_probes(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        a, b, x = await fleet.start(3)
        await converged([a, b, x])
        await trio.sleep(3)
        fleet.network.partition(a.peer_id, x.peer_id)
        await trio.sleep(20)
        assert x.peer_id in ids(a.fleet()), "b answered for x: x is alive"
        assert a.liveness.indirect_saves >= 1
        assert a.host.stats.evictions == 0


async def test_a_thawed_node_comes_back(
        autojump_clock: Any, mem: Any) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3)
        await converged(nodes)
        x, rest = nodes[2], nodes[:2]
        fleet.network.freeze(x.peer_id)
        await wait_until(lambda: all(x.peer_id not in ids(n.fleet()) for n in rest), timeout=30)
        fleet.network.thaw(x.peer_id)
        took = await wait_until(lambda: all(x.peer_id in ids(n.fleet()) for n in rest), timeout=30)
        assert took < 5.0, took  # it re-joins through its bootstrap peer and publishes a newer record


async def test_saved_peers_are_entry_points(
        autojump_clock: Any, mem: Any, tmp_path: Path) -> None:
    """Moved from test_discovery.py (real libp2p in one process, real clock)."""
    peers_file = tmp_path / "peers.json"
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3)
        await converged(nodes)
        cfg = fleet.config(5, bootstrap=(nodes[1].multiaddrs[0],), peers_file=peers_file)
        once = await fleet.add(cfg)
        await converged([*nodes, once])
        fleet.stop(once)
        await wait_until(peers_file.exists)
        saved = json.loads(peers_file.read_text())
        assert {p["peer_id"] for p in saved["peers"]} == {n.peer_id for n in nodes}
        # Restarted with no bootstrap address and one dead saved peer, it re-joins through the rest.
        saved["peers"].insert(0, {"peer_id": "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
                                  "addrs": ["/ip4/10.9.9.9/tcp/1"]})
        peers_file.write_text(json.dumps(saved))
        assert len(load_peers_file(peers_file)) == 4
        await trio.sleep(61)  # the others forget the old run's record ("offline" until it expires)
        again = await fleet.add(cfg.replace(bootstrap=()))
        await converged([*nodes, again])
        assert again.state == "online"


async def test_bootstrap_addresses_are_tried_in_parallel(
        autojump_clock: Any, mem: Any) -> None:
    """Moved from test_discovery.py: a dead entry point does not delay the live one."""
    async with mem.fleet() as fleet:
        nodes = await fleet.start(2)
        dead = "/ip4/10.9.9.9/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
        started = trio.current_time()
        me = await fleet.add(fleet.config(7, bootstrap=(dead, nodes[1].multiaddrs[0])))
        assert ids(me.fleet()) >= ids(n.view.get(n.peer_id).record for n in nodes)  # type: ignore[union-attr]
        assert trio.current_time() - started < 1.0
