"""Any peer is an entry point: the fleet keeps working and new nodes keep joining after the first
(bootstrap) node is SIGKILLed (real node processes, marked slow)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.cli.swarm import Swarm, node_data_dir
from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import open_node
from tests.test_swarm_pipeline import PROMPT, TOKENS, wait_coverage

pytestmark = pytest.mark.slow


def peers_up(events: Path) -> set[str]:
    try:
        lines = events.read_text().splitlines()
    except FileNotFoundError:
        return set()
    out = set()
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if event.get("event") == "peer_up":
            out.add(event["peer"])
    return out


@pytest.fixture(scope="module")
def local_ids(local_greedy: Any) -> list[int]:
    return list(local_greedy(PROMPT, TOKENS))


async def test_new_nodes_join_and_generations_run_after_the_bootstrap_node_dies(
        tmp_path: Path, client_model: ClientModel, local_ids: list[int]) -> None:
    swarm = Swarm(6, tmp_path, vehicles=[f"sim:parked:seed={i}" for i in range(6)])
    try:
        # Staggered: six processes each loading 10 blocks at once on 2 shared cores start slowly.
        await trio.to_thread.run_sync(lambda: swarm.start(stagger_s=3.0))
        await trio.to_thread.run_sync(wait_coverage, swarm, 1)
        first = swarm.nodes[0]
        os.kill(first.proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(first.proc.wait)
        live = {n.status()["peer_id"]: n for n in swarm.nodes[1:]}  # type: ignore[index]
        second = swarm.nodes[2].status()["multiaddr"]  # type: ignore[index]

        # A new node that knows only another node's address joins and sees every live peer
        # (its event log: a peer_up event per peer entering its view, from the first second).
        swarm.vehicles.append("sim:parked:seed=6")
        newcomer = swarm._spawn(6, second)
        events = node_data_dir(tmp_path, 6) / "events.jsonl"
        with trio.fail_after(30):
            while not set(live) <= peers_up(events):
                await trio.sleep(0.5)
        # ... and serves (its blocks load first: slow on a loaded machine), with the dead node
        # gone from its view.
        with trio.fail_after(120):
            while not ((s := newcomer.status()) and s["state"] == "online" and s.get("blocks")
                       and s["peers_known"] == len(live)):
                await trio.sleep(0.5)

        # A generation through a third node's address returns the local tokens.
        third = swarm.nodes[3].status()["multiaddr"]  # type: ignore[index]
        config = NodeConfig(key_file=tmp_path / "client.key", bootstrap=(third,), vehicle="sim:parked")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as me:
            assert first.proc.returncode is not None
            client = FleetClient(me, client_model, ClientConfig())
            await client.wait_ready(timeout=60)
            result = await client.generate(PROMPT, max_new_tokens=TOKENS)
            assert result.new_ids == local_ids
    finally:
        await trio.to_thread.run_sync(swarm.stop)
