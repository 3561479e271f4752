"""DHT discovery used for real: a client finds hosts its region's gossip does not carry; saved
peers are entry points; several bootstrap addresses are tried in parallel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idlefleet.node.client.fleet import ClientConfig, ClientModel, FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.discovery import load_peers_file, spread_order
from idlefleet.node.runtime.node import open_node
from tests.test_pipeline import PROMPT, serving_config


async def test_a_client_finds_hosts_of_another_region_through_the_dht(
        tmp_path: Path, client_model: ClientModel, local_greedy: Any) -> None:
    near = serving_config(tmp_path, 0)  # region u33d, budget for 10 blocks: [0, 10)
    async with open_node(near) as x:
        # x's own record says which blocks it hosts before y joins (under load it is published a
        # moment after x has loaded them; y would take [0, 20) without it).
        await x.wait_for(lambda f: any(r.peer_id == x.peer_id and r.blocks for r in f), timeout=30)
        # Another region, 20 blocks: it saw x's record in x's status reply when it joined, so it
        # takes the rest of the model; its records are gossiped only in u33e.
        far = serving_config(tmp_path, 1, (x.multiaddrs[0],)).replace(region="u33e", memory_budget_mb=280)
        async with open_node(far) as y:
            assert x.blocks == (0, 10) and y.blocks == (10, 30)
            client_cfg = NodeConfig(key_file=tmp_path / "client.key", bootstrap=(x.multiaddrs[0],),
                                    vehicle="sim:parked")
            async with open_node(client_cfg) as me:
                client = FleetClient(me, client_model, ClientConfig(route_wait_s=60))
                # Routable once a heartbeat round trip with x completed (records earn routability).
                await me.wait_for(lambda f: x.peer_id in {r.peer_id for r in me.routable()}, timeout=10)
                assert y.peer_id not in {r.peer_id for r in me.fleet()}  # gossip does not carry it
                assert client.uncovered_blocks() == list(range(10, 30))
                await client.wait_ready()
                assert me.discovery.stats["lookups"] >= 1
                assert me.view.get(y.peer_id) is not None  # its record, fetched and validated
                result = await client.generate(PROMPT, max_new_tokens=12)
                assert result.new_ids == list(local_greedy(PROMPT, 12))
                assert [(h["peer_id"], h["blocks"]) for h in result.route] == [
                    (x.peer_id, [0, 10]), (y.peer_id, [10, 30])]


async def test_a_damaged_peers_file_is_ignored(tmp_path: Path) -> None:
    bad = tmp_path / "peers.json"
    for content in ("{not json", json.dumps({"version": 99}), json.dumps({"version": 1, "peers": [7]}),
                    "x" * 300_000):
        bad.write_text(content)
        assert load_peers_file(bad) == []
    assert load_peers_file(tmp_path / "missing.json") == []


def test_provider_announcements_spread_over_the_range() -> None:
    order = spread_order(10, 30, 9)
    assert sorted(order) == list(range(10, 30))
    assert order[:9] == [10, 19, 28, 11, 20, 29, 12, 21, 13]  # the first burst spans the range
