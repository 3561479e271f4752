"""The owner decides, across real node processes (slow): consent revoked, the car starting to drive,
and its battery falling under the floor while unplugged, each in the middle of a generation."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.cli.swarm import FILE_VEHICLE, Swarm, node_data_dir
from idlefleet.node.client.config import ClientConfig, ClientModel
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import NodeConfig
from idlefleet.node.owner.control import control_request
from idlefleet.node.runtime.node import open_node
from tests.test_swarm_pipeline import wait_coverage

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time,"
TOKENS = 16
N_BLOCKS = 30


@pytest.fixture(scope="module")
def local_ids(local_greedy: Any) -> list[int]:
    return list(local_greedy(PROMPT, TOKENS))


def control(swarm: Swarm, index: int, op: str, **fields: Any) -> dict[str, Any]:
    reply = control_request(node_data_dir(swarm.workdir, index) / "control.sock", {"op": op, **fields})
    assert reply is not None and reply["ok"], reply
    return reply


def still_covered_without(swarm: Swarm, gone: set[str]) -> bool:
    hosted = [0] * N_BLOCKS
    for node in swarm.nodes:
        st = node.status()
        if st and st["peer_id"] not in gone and st.get("blocks"):
            for b in range(*st["blocks"]):
                hosted[b] += 1
    return min(hosted) >= 1


async def test_owner_policy_moves_sessions_off_a_car_mid_generation(
        tmp_path: Path, client_model: ClientModel, local_ids: list[int]) -> None:
    # Every car reads DATA_DIR/vehicle.json (parked, plugged in, 80%). The test plays each car's
    # daemon: the states stay valid for the whole test; stopped cars stay stopped (cool-down).
    swarm = Swarm(6, tmp_path, ["--owner", "max_state_age_s=3600", "--owner", "resume_cooldown_s=3600",
                                "--unload-grace", "3600"], vehicles=[FILE_VEHICLE] * 6)
    actions: list[tuple[str, Callable[[int], Any], str]] = [
        ("revoke", lambda i: control(swarm, i, "revoke"), "consent_revoked"),
        ("driving", lambda i: swarm.write_vehicle(i, parked=False), "driving"),
        ("battery", lambda i: swarm.write_vehicle(i, plugged_in=False, charging_kw=0.0, battery_soc=0.1),
         "battery_floor"),
    ]
    try:
        # Start-up only: six processes loading ten blocks each share two cores with other work.
        await trio.to_thread.run_sync(lambda: swarm.start(timeout=180))
        hosted = await trio.to_thread.run_sync(wait_coverage, swarm, 2)
        assert min(hosted) >= 2, hosted
        index_of = {n.status()["peer_id"]: n.index for n in swarm.nodes}  # type: ignore[index]
        boot = swarm.nodes[0].status()["multiaddr"]  # type: ignore[index]
        config = NodeConfig(key_file=tmp_path / "client.key", bootstrap=(boot,), vehicle="sim:parked",
                            serve=False)
        async with open_node(config, key=Ed25519PrivateKey.generate()) as me:
            client = FleetClient(me, client_model, ClientConfig(step_timeout_s=5.0))
            await client.wait_ready(timeout=60)
            stopped: set[str] = set()
            for name, act, reason in actions:
                ids: list[int] = []
                victim = ""
                acted = 0.0
                generation = client.stream(PROMPT, max_new_tokens=TOKENS)
                async with aclosing(generation.run()) as tokens:
                    async for token, _ in tokens:
                        ids.append(token)
                        if len(ids) == 3:
                            assert generation.pipeline is not None
                            victim = next(h.peer_id for h in generation.pipeline.hops
                                          if still_covered_without(swarm, stopped | {h.peer_id}))
                            await trio.to_thread.run_sync(act, index_of[victim])
                            # The generation waits (it only runs as its tokens are read) until the
                            # car has decided (its vehicle poll is 1 s): a short generation would
                            # otherwise end on the car before it reacts.
                            with trio.fail_after(10):
                                while (await trio.to_thread.run_sync(
                                        control, swarm, index_of[victim], "status")
                                       )["decision"]["action"] not in ("drain", "stop"):
                                    await trio.sleep(0.1)
                            acted = trio.current_time()
                assert [t for t in ids if t >= 0] == local_ids, name
                assert generation.result is not None
                assert victim not in {h["peer_id"] for h in generation.result.route}, name
                # The car has no session within 2 s of its decision.
                while (st := await trio.to_thread.run_sync(control, swarm, index_of[victim], "status")
                       )["sessions"] > 0:
                    assert trio.current_time() - acted < 2.0, (name, st)
                    await trio.sleep(0.1)
                assert st["decision"]["action"] in ("drain", "stop")
                assert st["decision"]["reason"] == reason, (name, st["decision"])
                # Its record says it does not serve; the next route avoids it.
                await me.wait_for(lambda f, v=victim: any(r.peer_id == v and r.policy != "serve"
                                                          for r in f), timeout=10)
                assert victim not in {h.peer_id for h in client.find_route()}, name
                stopped.add(victim)

            # The owner reports reconcile with what this client observed, car by car.
            await trio.sleep(1.5)  # let the last sessions' close events reach the logs
        stats = client.statistics()
        for node in swarm.nodes:
            peer = node.status()["peer_id"]  # type: ignore[index]
            report = (await trio.to_thread.run_sync(control, swarm, node.index, "report"))["report"]
            assert report["sessions"] == stats.sessions_opened[peer], (node.index, report)
            assert report["tokens"] == stats.positions_computed[peer], (node.index, report)
            if peer in stopped:
                assert [t["action"] for t in report["transitions"]][-1] == "stop"
        # The same report from the command line, on a stopped car.
        victim_dir = node_data_dir(swarm.workdir, index_of[sorted(stopped)[0]])
        out = await trio.run_process([sys.executable, "-m", "idlefleet.node.cli", "owner", "report",
                                      "--json", "--data-dir", str(victim_dir)], capture_stdout=True)
        assert {"sessions", "tokens", "block_steps", "busy_s", "energy_wh", "transitions"} <= set(
            json.loads(out.stdout))
    finally:
        await trio.to_thread.run_sync(swarm.stop)
        for node in swarm.nodes:
            assert node.proc.poll() is not None


async def test_stale_vehicle_file_stops_serving_and_a_fresh_one_resumes_after_the_cooldown(
        tmp_path: Path) -> None:
    vehicle = tmp_path / "vehicle.json"
    state = {"battery_soc": 0.8, "plugged_in": True, "charging_kw": 7.0, "thermal_headroom_c": 40.0,
             "parked": True, "parked_since": time.time(), "expected_departure": None}
    vehicle.write_text(json.dumps(state))
    config = NodeConfig(data_dir=tmp_path / "car", vehicle=f"file:{vehicle}", consent=True, serve=False,
                        vehicle_poll_s=0.2, owner={"max_state_age_s": 1.0, "resume_cooldown_s": 1.5})
    async with open_node(config) as node:
        def decision() -> tuple[str, str]:
            d = node.owner.decision
            assert d is not None
            return d.action, d.reason

        assert decision() == ("serve", "ok")
        with trio.fail_after(5):  # the daemon stops writing: unknown after 1 s
            while decision() != ("stop", "vehicle_unknown"):
                await trio.sleep(0.1)
        vehicle.write_text(json.dumps(state))  # the daemon is back
        fresh = trio.current_time()
        with trio.fail_after(5):
            while decision()[1] != "cooldown":
                await trio.sleep(0.05)
            while decision() != ("serve", "ok"):
                vehicle.write_text(json.dumps(state))  # keep it fresh meanwhile
                await trio.sleep(0.1)
        assert trio.current_time() - fresh >= 1.3  # waited the cool-down, not just the next poll
