"""Generation across real node processes, with a route peer killed or frozen mid-generation (slow)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import aclosing
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

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time,"
TOKENS = 20


@pytest.fixture(scope="module")
def local_ids(local_greedy: Any) -> list[int]:
    return list(local_greedy(PROMPT, TOKENS))


def hosts_per_block(swarm: Swarm, n_blocks: int = 30) -> list[int]:
    hosted = [0] * n_blocks
    for node in swarm.nodes:
        st = node.status()
        if st and st.get("state") == "online" and st.get("blocks"):
            for b in range(*st["blocks"]):
                hosted[b] += 1
    return hosted


def wait_coverage(swarm: Swarm, at_least: int, timeout: float = 180.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosted = hosts_per_block(swarm)
        if min(hosted) >= at_least:
            return hosted
        time.sleep(0.5)
    raise AssertionError(f"coverage never reached {at_least}: {hosts_per_block(swarm)}")


async def generate_with_fault(client: FleetClient, swarm: Swarm, hop: int, sig: signal.Signals
                              ) -> tuple[list[int], Any, int, str]:
    """Generate; after 3 tokens send ``sig`` to the peer serving route hop ``hop``."""
    pids = {n.status()["peer_id"]: n.proc.pid for n in swarm.nodes if n.status()}
    ids: list[int] = []
    victim, victim_peer = -1, ""
    generation = client.stream(PROMPT, max_new_tokens=TOKENS)
    async with aclosing(generation.run()) as tokens:
        async for token, _ in tokens:
            ids.append(token)
            if len(ids) == 3:
                assert generation.pipeline is not None
                victim_peer = generation.pipeline.hops[hop].peer_id
                victim = pids[victim_peer]
                os.kill(victim, sig)
    return [t for t in ids if t >= 0], generation.result, victim, victim_peer


async def test_six_node_swarm_survives_sigkill_and_sigstop_of_route_peers(
        tmp_path: Path, client_model: ClientModel, local_ids: list[int]) -> None:
    # Identical parked cars: route choice then depends on load, not on who leaves soonest.
    swarm = Swarm(6, tmp_path, vehicles=[f"sim:parked:seed={i}" for i in range(6)])
    frozen = -1
    try:
        await trio.to_thread.run_sync(swarm.start)
        hosted = await trio.to_thread.run_sync(wait_coverage, swarm, 2)
        assert min(hosted) >= 2, hosted  # six nodes: every block has at least two hosts
        boot = swarm.nodes[0].status()["multiaddr"]  # type: ignore[index]
        config = NodeConfig(key_file=tmp_path / "client.key", bootstrap=(boot,), vehicle="sim:parked")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as me:
            client = FleetClient(me, client_model, ClientConfig(step_timeout_s=3.0))
            await client.wait_ready(timeout=60)
            undisturbed = await client.generate(PROMPT, max_new_tokens=TOKENS)
            assert undisturbed.new_ids == local_ids

            # Concurrent generations spread over the fleet: every block has two hosts, and the
            # sessions this client holds count as load, so the two routes differ. (Not always
            # disjoint: heartbeat RTTs measured on a busy machine can outweigh the load.)
            results: list[Any] = []

            async def one() -> None:
                results.append(await client.generate(PROMPT, max_new_tokens=TOKENS))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
            assert [r.new_ids for r in results] == [local_ids, local_ids]
            peers = [{h["peer_id"] for h in r.route} for r in results]
            assert peers[0] != peers[1], [r.route for r in results]

            ids, result, killed, peer = await generate_with_fault(client, swarm, 0, signal.SIGKILL)
            assert ids == local_ids
            assert result.failovers >= 1
            assert peer not in {h["peer_id"] for h in result.route}
            t0 = time.monotonic()
            ids, result, frozen, peer = await generate_with_fault(client, swarm, 1, signal.SIGSTOP)
            print(f"generation with a SIGSTOPped route peer took {time.monotonic() - t0:.1f}s")
            assert ids == local_ids
            assert result.failovers >= 1
            assert peer not in {h["peer_id"] for h in result.route}
            assert time.monotonic() - t0 < 60
            assert killed != frozen
    finally:
        if frozen > 0:
            os.kill(frozen, signal.SIGCONT)
        await trio.to_thread.run_sync(swarm.stop)
