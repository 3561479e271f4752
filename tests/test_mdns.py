"""Nearby peers with no bootstrap at all: node processes on one LAN (network namespaces on a bridge
made here, multicast on) started with ``--mdns`` and no ``--bootstrap`` find each other, join one
fleet and serve a generation together (real processes, marked slow; needs root and ``ip``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from idlefleet.node.swarm import Swarm, node_data_dir
from idlefleet.p2p.mdns import advertised_addrs
from tests.netns import NetLab, require
from tests.test_swarm_entry import peers_up
from tests.test_swarm_pipeline import PROMPT, TOKENS, wait_coverage


@pytest.fixture(scope="module")
def local_ids(local_greedy: Any) -> list[int]:
    return list(local_greedy(PROMPT, TOKENS))


def test_a_wildcard_listen_address_is_advertised_as_each_interface_address() -> None:
    addrs = advertised_addrs(["/ip4/0.0.0.0/tcp/4001", "/ip4/192.0.2.7/tcp/4002"])
    assert "/ip4/192.0.2.7/tcp/4002" in addrs
    assert not any(a.startswith(("/ip4/0.0.0.0/", "/ip4/127.")) for a in addrs)
    assert all(a.endswith("/tcp/4001") for a in addrs if a != "/ip4/192.0.2.7/tcp/4002")


@pytest.mark.slow
async def test_nodes_on_one_lan_find_each_other_by_mdns_and_generate(tmp_path: Path,
                                                                    local_ids: list[int]) -> None:
    require("ip")
    n = 2
    # Two nodes of 15 blocks each (SmolLM2 has 30): 220 MB of weights each.
    swarm = Swarm(n, tmp_path, vehicles=[f"sim:parked:seed={i}" for i in range(n)])
    with NetLab("m") as lab:
        try:
            lan = lab.switch("lan")
            ips = []
            for i in range(n):
                ns = lab.namespace(f"car{i}")
                ips.append(lab.plug(ns, lan, f"10.97.0.{i + 2}/24"))
                swarm.wrappers[i] = lab.exec_prefix(ns)
            client_ns = lab.namespace("phone")
            lab.plug(client_ns, lan, "10.97.0.100/24")
            swarm.workdir.mkdir(parents=True, exist_ok=True)
            for i in range(n):  # no --bootstrap: each node knows nobody
                swarm.extra_args = ["--mdns", "--listen-host", ips[i], "--memory-budget-mb", "220"]
                swarm._spawn(i, None)
            ids = {}
            for node in swarm.nodes:
                ids[node.index] = (await trio.to_thread.run_sync(swarm._wait_status, node, 60.0))["peer_id"]
            # Each finds the other (a peer_up event in its event log) through mDNS alone.
            with trio.fail_after(30):
                for i in range(n):
                    others = {pid for j, pid in ids.items() if j != i}
                    while not others <= peers_up(node_data_dir(tmp_path, i) / "events.jsonl"):
                        await trio.sleep(0.5)
            for i in range(n):  # (whoever heard the other first dialled it)
                others = [pid for j, pid in ids.items() if j != i]
                assert all(f"mDNS: found {pid}" in swarm.nodes[i].log_file.read_text() for pid in others)
            await trio.to_thread.run_sync(wait_coverage, swarm, 1)
            # A phone on the same LAN generates across the two (joining through one of them).
            boot = swarm.nodes[1].status()["multiaddr"]  # type: ignore[index]
            cmd = [*lab.exec_prefix(client_ns), sys.executable, "-m", "idlefleet.node.cli", "generate",
                   "--bootstrap", boot, PROMPT, "--max-new-tokens", str(TOKENS), "--json"]
            done = await trio.to_thread.run_sync(lambda: subprocess.run(
                cmd, capture_output=True, text=True, timeout=180, env=swarm.env, check=False))
            assert done.returncode == 0, done.stderr[-2000:]
            result = json.loads(done.stdout.strip().splitlines()[-1])
            assert result["new_ids"] == local_ids
        finally:
            await trio.to_thread.run_sync(swarm.stop)
