"""A hostile stranger against a real swarm of node processes (issue 8, findings 2 and 3; slow).

A fresh key, a libp2p connection and bytes per docs/PROTOCOL.md: a forged peer-down notice with the
largest subject_seq, a flood of 300 notices, and ten valid self-signed records from fresh keys that
claim every block at 999,999 GFLOPS and list addresses of a port nobody asked to be dialled. The
swarm keeps every honest peer in every view and still generates the local tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.cli.swarm import Swarm
from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import open_node
from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.liveness import Liveness
from idlefleet.protocols import wire
from idlefleet.protocols.gossip import capacity_topic, claimed_peer
from idlefleet.protocols.notices import PeerDownNotice, encode_notice
from idlefleet.protocols.records import encode_signed
from tests.factories import capacity_record
from tests.test_swarm import view_of
from tests.test_swarm_pipeline import PROMPT, TOKENS, local_ids, wait_coverage

pytestmark = pytest.mark.slow
__all__ = ["local_ids"]  # the fixture, re-used

TOPIC = capacity_topic("u33d")
MAX_SEQ = 2**63 - 1


async def join_mesh(host: Host, addrs: list[str], want: set[str], on_message: Any = None) -> None:
    await host.subscribe(TOPIC, on_message or (lambda origin, data: True))
    for addr in addrs:
        await host.connect(addr, timeout=10)
    with trio.fail_after(20):
        while not want & host.gossip_peers(TOPIC):
            await trio.sleep(0.05)


def notice(key: Ed25519PrivateKey, reporter: str, subject: str, seq: int) -> bytes:
    body = PeerDownNotice(reporter, subject, seq, time.time(), "it died, trust me")
    return wire.encode_envelope("peer_down", {"notice": encode_notice(body, key)})


async def test_swarm_survives_forged_notices_and_fake_coverage(
        tmp_path: Path, client_model: ClientModel, local_ids: list[int]) -> None:
    swarm = Swarm(3, tmp_path, vehicles=[f"sim:parked:seed={i}" for i in range(3)])
    try:
        await trio.to_thread.run_sync(swarm.start)
        t0 = time.monotonic()
        await trio.to_thread.run_sync(wait_coverage, swarm, 1)
        print(f"swarm up and covering the model after {time.monotonic() - t0:.0f}s")
        statuses = [n.status() or {} for n in swarm.nodes]
        ids = [s["peer_id"] for s in statuses]
        addrs = [s["multiaddr"] for s in statuses]
        config = NodeConfig(key_file=tmp_path / "client.key", bootstrap=(addrs[0],), vehicle="sim:parked")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as me, AsyncExitStack() as stack:
            client = FleetClient(me, client_model, ClientConfig(step_timeout_s=3.0))
            await client.wait_ready(timeout=90)
            assert (await client.generate(PROMPT, max_new_tokens=TOKENS)).new_ids == local_ids
            started = time.monotonic()

            # --- finding 2: forged notices -----------------------------------------------------
            rogue_key = Ed25519PrivateKey.generate()
            rogue = await stack.enter_async_context(open_host(rogue_key, HostConfig()))
            Liveness(rogue, lambda peer, reason: None)  # it answers heartbeats: not evicted as dead
            published: Counter[str] = Counter()

            def count(origin: str, data: bytes) -> bool:
                env = wire.decode_envelope(data)
                if env.kind == "capacity":
                    published[claimed_peer(env.body["record"]) or ""] += 1
                return True

            await join_mesh(rogue, addrs, set(ids), count)
            await rogue.publish(TOPIC, notice(rogue_key, rogue.peer_id, ids[1], MAX_SEQ))
            before = published[ids[2]]
            t0 = trio.current_time()
            for i in range(300):
                await rogue.publish(TOPIC, notice(rogue_key, rogue.peer_id, ids[2], i))
                await trio.sleep(4.0 / 300)
            await trio.sleep(2.0)
            flood_s = trio.current_time() - t0
            forced = published[ids[2]] - before
            print(f"300 notices in {flood_s:.1f}s made the victim publish {forced} records")
            assert forced <= flood_s + 2, forced  # 1 s minimum interval (+ a routine refresh)
            for observer in ids:
                view = await view_of(rogue, observer)
                assert set(ids) <= view, (observer, view)

            # --- finding 3: fake coverage ------------------------------------------------------
            dialled = 0

            async def count_dials(listener: trio.SocketListener) -> None:
                nonlocal dialled
                while True:
                    stream = await listener.accept()
                    dialled += 1
                    await stream.aclose()

            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            victim_addrs = (f"/ip4/127.0.0.1/tcp/{port}",) * 8
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(count_dials, listeners[0])
            template = next(r for r in me.fleet() if r.blocks)
            # Ten strangers, each with a fresh key, in the swarm's mesh (not connected to our
            # client, which hears of them only through the swarm: with 14 topic peers a node's mesh
            # holds only some of them, so every node relays, not only node 0): they answer
            # heartbeats, so the swarm keeps them; their records list only the port.
            fakes = []
            for _ in range(10):
                key = Ed25519PrivateKey.generate()
                fake = await stack.enter_async_context(open_host(key, HostConfig()))
                Liveness(fake, lambda peer, reason: None)
                await join_mesh(fake, addrs, set(ids))
                now = time.time()
                record = dataclasses.replace(
                    capacity_record(key, issued_at=now, seq=int(now * 1000)), model_id=template.model_id,
                    blocks=(0, 30), compute_gflops=999_999.0, load=0.0, addrs=victim_addrs)
                raw = encode_signed(record, key)
                await fake.publish(TOPIC, wire.encode_envelope("capacity", {"record": raw}))
                fakes.append(fake)
            fake_ids = {fake.peer_id for fake in fakes}
            with trio.fail_after(10):
                while len(fake_ids & {r.peer_id for r in me.fleet()}) < 10:
                    await trio.sleep(0.05)
            assert not fake_ids & {r.peer_id for r in me.routable()}
            result = await client.generate(PROMPT, max_new_tokens=TOKENS)
            assert result.new_ids == local_ids
            assert not fake_ids & {h["peer_id"] for h in result.route}
            await trio.sleep(3.0)
            print(f"fake records: {dialled} connection(s) to the port they listed")
            # One dial per node (4 of them) for the one address, not one per record and address;
            # py-libp2p makes each dial up to 4 TCP attempts (RetryConfig.max_retries = 3).
            assert dialled <= 4 * 4
            for observer in ids:
                try:
                    view = await view_of(rogue, observer)
                except NetworkError:
                    continue
                assert set(ids) <= view, (observer, view)
            nursery.cancel_scope.cancel()
            print(f"attacks and checks took {time.monotonic() - started:.0f}s")
    except BaseExceptionGroup as group:  # the nesting of hosts hides the cause: show the leaves
        raise _leaf(group) from group
    finally:
        codes = await trio.to_thread.run_sync(swarm.stop)
    assert list(codes.values()) == [0, 0, 0], codes


def _leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup) and group.exceptions:
        group = group.exceptions[0]
    return group
