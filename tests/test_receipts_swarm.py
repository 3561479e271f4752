"""Receipts across real node processes (slow): a serving node SIGKILLed in the middle of a generation
still has, in its ledger, every receipt the client received from it; the owner report's credits
come from the ledger, from a running node and from the file of a dead one."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from idlefleet.node.cli.swarm import FILE_VEHICLE, Swarm, node_data_dir
from idlefleet.node.client.config import ClientConfig, ClientModel, GenerationFailed
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.owner.control import control_request
from idlefleet.node.owner.ledger import Ledger
from idlefleet.node.runtime.node import open_node
from idlefleet.protocols.receipts import decode_receipt
from tests.test_swarm_pipeline import wait_coverage

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time,"


def server_receipts(path: Path) -> set[bytes]:
    with Ledger(path) as ledger:
        return {raw for _, raw in ledger.receipts(role="server")}


async def test_a_sigkilled_server_keeps_every_receipt_it_acknowledged(
        tmp_path: Path, client_model: ClientModel) -> None:
    # Three parked, plugged-in cars, ten blocks each: every route goes through all three.
    swarm = Swarm(3, tmp_path / "swarm", ["--owner", "max_state_age_s=3600", "--unload-grace", "3600"],
                  vehicles=[FILE_VEHICLE] * 3)
    (tmp_path / "swarm").mkdir()
    try:
        await trio.to_thread.run_sync(lambda: swarm.start(timeout=180))
        await trio.to_thread.run_sync(wait_coverage, swarm, 1)
        index_of = {n.status()["peer_id"]: n.index for n in swarm.nodes}  # type: ignore[index]
        boot = swarm.nodes[0].status()["multiaddr"]  # type: ignore[index]
        client_dir = tmp_path / "client"
        config = NodeConfig(data_dir=client_dir, bootstrap=(boot,), vehicle="sim:parked", serve=False)
        async with open_node(config) as me:
            assert me.ledger is not None
            client = FleetClient(me, client_model, ClientConfig(step_timeout_s=5.0))
            await client.wait_ready(timeout=60)
            for _ in range(2):
                await client.generate(PROMPT, max_new_tokens=4)
            stats = client.statistics()
            assert stats.receipts_stored == 6 and not stats.receipts_refused  # 2 generations x 3 hops
            # Each node's status file counts the steps it served and the batches they took.
            with trio.fail_after(10):
                while not all(((n.status() or {}).get("serving") or {}).get("steps", 0) >= 6
                              for n in swarm.nodes):
                    await trio.sleep(0.2)
            for n in swarm.nodes:
                serving = n.status()["serving"]  # type: ignore[index]
                assert 1 <= serving["batches"] <= serving["steps"] and serving["compute_s"] > 0, serving

            # A third generation; after 3 tokens the middle hop's node is SIGKILLed. Nobody else
            # hosts its blocks, so the generation fails; the exchange for the lost hop fails too.
            generation = client.stream(PROMPT, max_new_tokens=16)
            victim = ""

            async def kill_mid_generation() -> None:
                nonlocal victim
                async with aclosing(generation.run()) as tokens:
                    n = 0
                    async for _ in tokens:
                        n += 1
                        if n == 3:
                            assert generation.pipeline is not None
                            victim = generation.pipeline.hops[1].peer_id
                            os.kill(swarm.nodes[index_of[victim]].proc.pid, signal.SIGKILL)

            with pytest.raises(GenerationFailed):
                await kill_mid_generation()
            with trio.fail_after(10):
                while client.statistics().receipts_pending:
                    await trio.sleep(0.05)
            stats = client.statistics()
            assert set(stats.receipts_refused) <= {"link_lost", "no_reply"}, stats.receipts_refused
            assert sum(stats.receipts_refused.values()) == 1  # the killed hop's session
            mine = me.ledger.receipts(role="client")
            assert len(mine) == stats.receipts_stored == 8  # + the two survivors' third sessions
            assert [x["peer"] for x in me.ledger.refused()] == [victim]

            # The dead node's ledger holds every receipt it acknowledged: the client has them.
            await trio.to_thread.run_sync(swarm.nodes[index_of[victim]].proc.wait)
            acknowledged = {raw for _, raw in mine if decode_receipt(raw).server == victim}
            assert len(acknowledged) == 2
            victim_dir = node_data_dir(swarm.workdir, index_of[victim])
            assert acknowledged <= server_receipts(victim_dir / "ledger.sqlite")
            for peer, index in index_of.items():
                if peer != victim:  # the survivors too, and each says so over its control socket
                    theirs = {raw for _, raw in mine if decode_receipt(raw).server == peer}
                    assert theirs == server_receipts(node_data_dir(swarm.workdir, index) / "ledger.sqlite")
                    sock = node_data_dir(swarm.workdir, index) / "control.sock"
                    reply = await trio.to_thread.run_sync(control_request, sock, {"op": "report"})
                    assert reply is not None and reply["report"]["credits"]["receipts"] == 3, reply
            # The owner report of the dead car, from its stored ledger.
            out = await trio.run_process([sys.executable, "-m", "idlefleet.node.cli", "owner", "report",
                                          "--json", "--data-dir", str(victim_dir)], capture_stdout=True)
            credits = json.loads(out.stdout)["credits"]
            assert credits["receipts"] >= 2 and credits["tokens_unverified"] == credits["tokens"] > 0
    finally:
        await trio.to_thread.run_sync(swarm.stop)
        for node in swarm.nodes:
            assert node.proc.poll() is not None
