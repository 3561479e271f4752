"""Peer-down notices are hints (issue 8, finding 2), on real in-process nodes and a hostile host."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import Node
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.liveness import Liveness
from idlefleet.protocols import wire
from idlefleet.protocols.gossip import capacity_topic
from idlefleet.protocols.notices import PeerDownNotice, encode_notice
from idlefleet.protocols.records import encode_signed
from tests.factories import capacity_record, running_fleet

MAX_SEQ = 2**63 - 1
TOPIC = capacity_topic("u33d")


def node_config(tmp_path: Path, i: int, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(key_file=tmp_path / f"node{i}.key", vehicle=f"sim:parked:seed={i}",
                      bootstrap=bootstrap, consent=True, serve=False,
                      event_log=tmp_path / f"node{i}.events.jsonl")


@asynccontextmanager
async def hostile(nodes: list[Node]) -> AsyncIterator[tuple[Host, Ed25519PrivateKey]]:
    """A stranger with a fresh key, connected to every node and in their gossip mesh."""
    key = Ed25519PrivateKey.generate()
    async with open_host(key, HostConfig()) as rogue:
        await rogue.subscribe(TOPIC, lambda origin, data: True)
        for node in nodes:
            await rogue.connect(node.multiaddrs[0])
        with trio.fail_after(15):
            while not {n.peer_id for n in nodes} <= rogue.gossip_peers(TOPIC):
                await trio.sleep(0.05)
        yield rogue, key


def notice_about(key: Ed25519PrivateKey, reporter: str, subject: str, seq: int) -> bytes:
    notice = PeerDownNotice(reporter, subject, seq, time.time(), "saw it die")
    return wire.encode_envelope("peer_down", {"notice": encode_notice(notice, key)})


async def all_see(nodes: list[Node], timeout: float = 20.0) -> None:
    want = {n.peer_id for n in nodes}
    for n in nodes:
        await n.wait_for(lambda f: want <= {r.peer_id for r in f}, timeout=timeout)


async def test_a_forged_notice_with_the_largest_seq_does_not_evict_a_live_peer(tmp_path: Path) -> None:
    async with running_fleet(lambda i, boot: node_config(tmp_path, i, boot), 3) as nodes:
        await all_see(nodes)
        victim = nodes[1]
        async with hostile(nodes) as (rogue, key):
            await rogue.publish(TOPIC, notice_about(key, rogue.peer_id, victim.peer_id, MAX_SEQ))
            await trio.sleep(4.0)  # time for every node to check the victim itself
            for n in nodes:
                assert victim.peer_id in {r.peer_id for r in n.fleet()}, n.peer_id
            events = (tmp_path / "node0.events.jsonl").read_text()
            assert '"event": "notice_refuted"' in events
            assert '"event": "peer_down"' not in events


async def test_a_notice_flood_is_rate_limited_and_refutations_keep_the_publish_interval(
        tmp_path: Path) -> None:
    async with running_fleet(lambda i, boot: node_config(tmp_path, i, boot), 2) as nodes:
        await all_see(nodes)
        victim, other = nodes
        async with hostile(nodes) as (rogue, key):
            published = victim.host.stats.gossip_published
            start = trio.current_time()
            for i in range(300):  # 300 notices about the victim in about 4 s, low seqs
                await rogue.publish(TOPIC, notice_about(key, rogue.peer_id, victim.peer_id, i))
                await trio.sleep(4.0 / 300)
            await trio.sleep(max(0.0, 5.0 - (trio.current_time() - start)))
            def dropped(node: Node) -> int:
                # Two budgets: the host's per-sender gossip budget drops most of a flood before any
                # signature check; the notice gate rate-limits each reporter among the rest.
                return node.rejected["rate_limited"] + node.host.stats.gossip_rate_limited

            with trio.move_on_after(20):  # a loaded machine may still be delivering the flood
                while dropped(victim) < 290:
                    await trio.sleep(0.1)
            forced = victim.host.stats.gossip_published - published
            elapsed = trio.current_time() - start
            # Before: one forced record per notice (300 in 4 s). Now the reporter's budget (5) and
            # the 1 s minimum interval bound it; allow one ordinary publish on top.
            assert forced <= elapsed / 1.0 + 2, (forced, elapsed)
            assert dropped(victim) >= 100  # (the rest may still be in flight)
            assert victim.rejected["rate_limited"] >= 1  # the gate saw some and refused them
            assert dropped(other) >= 1  # not forwarded past its budget
        assert victim.peer_id in {r.peer_id for r in other.fleet()}


async def test_records_earn_routability_by_a_liveness_round_trip(tmp_path: Path) -> None:
    # Issue 8, finding 3: a valid self-signed record alone made a peer a routing candidate.
    async with running_fleet(lambda i, boot: node_config(tmp_path, i, boot), 1) as (node,):
        for serves_heartbeats in (False, True):
            async with hostile([node]) as (rogue, key):
                if serves_heartbeats:
                    Liveness(rogue, lambda peer, reason: None)
                now = time.time()
                record = dataclasses.replace(capacity_record(key, issued_at=now, seq=int(now * 1000)),
                                             model_id="m", blocks=(0, 30), compute_gflops=999_999.0)
                raw = encode_signed(record, key)
                await rogue.publish(TOPIC, wire.encode_envelope("capacity", {"record": raw}))
                await node.wait_for(lambda f: rogue.peer_id in {r.peer_id for r in f}, timeout=10)
                await trio.sleep(1.5)  # a heartbeat round (1 s) has run
                routable = {r.peer_id for r in node.routable()}
                assert (rogue.peer_id in routable) is serves_heartbeats
                assert node.peer_id in routable
