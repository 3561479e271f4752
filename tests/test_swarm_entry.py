"""Any peer is an entry point: the fleet keeps working and new nodes keep joining after the first
(bootstrap) node is SIGKILLed (real node processes, marked slow)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.client import ClientConfig, ClientModel, FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.node import open_node
from idlefleet.node.swarm import Swarm
from idlefleet.p2p.host import HostConfig, open_host
from tests.test_swarm import view_of
from tests.test_swarm_pipeline import PROMPT, TOKENS, wait_coverage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ids(local_greedy: Any) -> list[int]:
    return list(local_greedy(PROMPT, TOKENS))


async def test_new_nodes_join_and_generations_run_after_the_bootstrap_node_dies(
        tmp_path: Path, client_model: ClientModel, local_ids: list[int]) -> None:
    swarm = Swarm(6, tmp_path, vehicles=[f"sim:parked:seed={i}" for i in range(6)])
    try:
        await trio.to_thread.run_sync(swarm.start)
        await trio.to_thread.run_sync(wait_coverage, swarm, 1)
        first = swarm.nodes[0]
        os.kill(first.proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(first.proc.wait)
        live = {n.status()["peer_id"]: n for n in swarm.nodes[1:]}  # type: ignore[index]
        second = swarm.nodes[2].status()["multiaddr"]  # type: ignore[index]

        # A new node that knows only another node's address joins and sees every live peer.
        swarm.vehicles.append("sim:parked:seed=6")
        started = time.monotonic()
        newcomer = swarm._spawn(6, second)
        st = await trio.to_thread.run_sync(swarm._wait_status, newcomer, 30.0)
        async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as probe:
            await probe.connect(st["multiaddr"])
            with trio.fail_after(max(1.0, 30.0 - (time.monotonic() - started))):
                while (await view_of(probe, st["peer_id"])) != {*live, st["peer_id"]}:
                    await trio.sleep(0.5)
        # ... and serves (loading its blocks takes a while on a loaded machine).
        with trio.fail_after(120):
            while not ((s := newcomer.status()) and s["state"] == "online" and s.get("blocks")):
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
