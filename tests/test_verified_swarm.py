"""Verified work across real node processes (slow): a 6-node swarm, every block hosted twice, one
node started with ``--chaos-fault KIND`` (``idlefleet swarm --faulty``; corrupt, skip, stale). The
client checks every hop on the other host of its blocks, convicts the faulty node (itself as
referee: there is no third host), bans and reports it, rolls back, and returns the local tokens;
the receipts in the nodes' own ledgers say rejected for the faulty node and verified for the
honest ones."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.cli.swarm import Swarm, node_data_dir
from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.owner.ledger import Ledger
from idlefleet.node.runtime.node import open_node
from idlefleet.protocols.receipts import decode_receipt
from tests.test_swarm_pipeline import wait_coverage

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time,"
TOKENS = 24
FAULTY = 5  # the last node; node 0 bootstraps the swarm and is never faulty


def server_receipts(workdir: Path, index: int, client: str) -> list[Any]:
    """The receipts node ``index`` countersigned for ``client``, read from its own ledger file."""
    path = node_data_dir(workdir, index) / "ledger.sqlite"
    if not path.exists():
        return []
    with Ledger(path) as ledger:
        receipts = [decode_receipt(raw) for _role, raw in ledger.receipts(role="server")]
    return [r for r in receipts if r.client == client]


@pytest.mark.parametrize("kind", ["corrupt", "skip", "stale"])
async def test_a_faulty_node_in_a_six_node_swarm_is_caught_and_earns_rejected_receipts(
        kind: str, tmp_path: Path, client_model: ClientModel, local_greedy: Any) -> None:
    want = list(local_greedy(PROMPT, TOKENS))
    swarm = Swarm(6, tmp_path / "swarm", vehicles=[f"sim:parked:seed={i}" for i in range(6)],
                  faulty={FAULTY: kind})
    try:
        await trio.to_thread.run_sync(swarm.start)
        hosted = await trio.to_thread.run_sync(wait_coverage, swarm, 2)
        assert min(hosted) >= 2, hosted
        state = swarm.state()["nodes"]
        assert [n["faulty"] for n in state] == [False] * 5 + [True]
        bad = state[FAULTY]["peer_id"]
        honest = {n["peer_id"]: i for i, n in enumerate(state) if i != FAULTY}
        config = NodeConfig(key_file=tmp_path / "client.key", bootstrap=(state[0]["multiaddr"],),
                            vehicle="sim:parked", consent=False, serve=False, data_dir=tmp_path / "client")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as me:
            client = FleetClient(me, client_model, ClientConfig(step_timeout_s=3.0, verify_window=8))
            await client.wait_ready(timeout=60)
            # Each block has two hosts, and a checked hop uses both (one serves, the other verifies):
            # the faulty node is on every generation, as primary or as verifier.
            first = await client.generate(PROMPT, max_new_tokens=TOKENS)
            assert first.new_ids == want
            v = first.verification
            assert v["banned_peers"] == [bad], v  # caught, and no honest peer accused
            assert v["undecided"] == 0 and v["reports"] == 1, v
            # Convicted as primary: within 64 positions of its first wrong output. (As verifier
            # host, its lie cost nothing: the primary's window stood.)
            assert v["detection_lag_max"] is None or v["detection_lag_max"] <= 64, v
            assert me.accusations.is_accused(bad, time.time())  # our own report, applied locally
            # Later generations route around it and accuse nobody.
            accused = 0
            for _ in range(2):
                again = await client.generate(PROMPT, max_new_tokens=TOKENS)
                assert again.new_ids == want
                assert bad not in {h["peer_id"] for h in again.route}
                accused += len(again.verification["banned_peers"])
            assert accused == 0
            with trio.move_on_after(10):  # abandoned hops settle their receipts in the background
                while client.statistics().receipts_pending:
                    await trio.sleep(0.1)
            me_id = me.peer_id
        # The nodes' own ledgers (read from their files): the faulty node's work was rejected, the
        # honest nodes' work verified, and none of theirs rejected.
        rejected = server_receipts(tmp_path / "swarm", FAULTY, me_id)
        assert rejected and sum(r.rejected for r in rejected) > 0 and sum(r.verified for r in rejected) == 0
        good = [r for i in honest.values() for r in server_receipts(tmp_path / "swarm", i, me_id)]
        assert good and sum(r.verified for r in good) > 0 and sum(r.rejected for r in good) == 0
    finally:
        await trio.to_thread.run_sync(swarm.stop)
