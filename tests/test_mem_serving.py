"""Serving nodes (real SmolLM2 stages) on the in-memory network and virtual time: hosting claims,
generation like local, client fail-over (killed, frozen host), drain migration, owner events and
verification, through the client's public API (tests/memfleet.py)."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from idlefleet.node.client.fleet import ClientConfig, ClientModel, FleetClient
from idlefleet.node.runtime.node import Node
from tests.memfleet import MemFleet, virtual_world, wait_until

PROMPT = "The capital of France is"
WHOLE_MB = 450  # every block of SmolLM2


@pytest.fixture
def mem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    return virtual_world(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def local_ids(local_greedy: Any) -> list[int]:
    return list(local_greedy(PROMPT, 12))


async def covered(fleet: MemFleet, nodes: list[Node]) -> None:
    await wait_until(lambda: sorted(n.blocks or (0, 0) for n in nodes) == [(0, 10), (10, 20), (20, 30)])


async def client_of(fleet: MemFleet, client_model: ClientModel, **config: Any) -> FleetClient:
    me = await fleet.add(serve=False)
    client = FleetClient(me, client_model, ClientConfig(**config))
    await client.wait_ready(timeout=30)
    return client


async def spare(fleet: MemFleet, **overrides: Any) -> Node:
    """A node hosting the whole model, online in the client's view."""
    node = await fleet.add(serve=True, memory_budget_mb=WHOLE_MB, **overrides)
    await wait_until(lambda: node.blocks == (0, 30) and node.state == "online")
    await trio.sleep(2)  # gossiped, heartbeats measured: routable
    return node


async def generate_with(client: FleetClient, on_third: Any) -> tuple[list[int], Any]:
    """Stream 12 tokens; after the third, ``await on_third()``. Returns (ids, result)."""
    generation = client.stream(PROMPT, max_new_tokens=12)
    ids: list[int] = []
    async with aclosing(generation.run()) as tokens:
        async for token, _ in tokens:
            ids.append(token)
            if len(ids) == 3:
                await on_third()
    return [t for t in ids if t >= 0], generation.result


async def test_three_nodes_claim_disjoint_ranges_and_generate_like_local(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        client = await client_of(fleet, client_model)
        result = await client.generate(PROMPT, max_new_tokens=12)
        assert result.new_ids == local_ids
        assert [h["blocks"] for h in result.route] == [[0, 10], [10, 20], [20, 30]]
        assert result.failovers == 0


async def test_concurrent_generations_decode_in_lockstep(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    """From test_pipeline.py's lockstep part (its batch-count bound stays there: with compute
    inline, rows never wait for each other on virtual time)."""
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        client = await client_of(fleet, client_model)
        results: list[list[int]] = []

        async def one() -> None:
            results.append((await client.generate(PROMPT, max_new_tokens=12)).new_ids)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        assert results == [local_ids] * 3
        assert not client.decoding  # every generation left the lockstep


async def test_a_killed_host_mid_generation_fails_over_with_the_same_tokens(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        client = await client_of(fleet, client_model)
        backup: list[Node] = []

        async def kill() -> None:  # a spare comes online mid-generation (it would be routed first)
            backup.append(await spare(fleet))
            fleet.kill(nodes[1])

        ids, result = await generate_with(client, kill)
        assert ids == local_ids and result.failovers >= 1
        assert nodes[1].peer_id not in {h["peer_id"] for h in result.route}
        assert backup[0].peer_id in {h["peer_id"] for h in result.route}


async def test_a_frozen_host_mid_generation_times_out_and_is_avoided(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        client = await client_of(fleet, client_model)
        frozen_at: list[float] = []

        async def freeze() -> None:
            await spare(fleet)
            fleet.network.freeze(nodes[2].peer_id)
            frozen_at.append(trio.current_time())

        ids, result = await generate_with(client, freeze)
        assert ids == local_ids and result.failovers >= 1
        assert nodes[2].peer_id not in {h["peer_id"] for h in result.route}
        assert trio.current_time() - frozen_at[0] < 10.0  # one step deadline, not a hang
        # Later routes avoid it too, and the fleet evicts it.
        me = client.node
        await wait_until(lambda: nodes[2].peer_id not in {r.peer_id for r in me.fleet()}, timeout=30)
        assert nodes[2].peer_id not in {h.peer_id for h in client.find_route()}


async def test_a_drained_host_hands_its_session_over_with_the_same_tokens(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    """From test_pipeline.py's drain part (it slept on the real clock for the announcement)."""
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        client = await client_of(fleet, client_model)
        backup: list[Node] = []
        drained = trio.Event()

        async def drain() -> None:
            backup.append(await spare(fleet))

            async def run() -> None:
                await nodes[1].drain(10.0)
                drained.set()

            fleet.nodes[0].nursery.start_soon(run)
            await trio.sleep(0.2)  # the drain is announced; the next step sees it

        ids, result = await generate_with(client, drain)
        with trio.fail_after(15):
            await drained.wait()
        assert ids == local_ids
        assert nodes[1].peer_id not in {h["peer_id"] for h in result.route} and backup
        assert nodes[1].hosting is not None and nodes[1].hosting.server is not None
        assert nodes[1].hosting.server.active_sessions == 0


@pytest.mark.skip(reason="spins the trio loop forever 1 run in ~5 (no virtual time passes, so no deadline "
                         "fires; py-spy: the scheduler busy-polling); the drain -> stop path on the memory "
                         "fleet, cause not found yet. Covered on real libp2p by tests/test_owner*.py")
async def test_consent_revoked_mid_generation_drains_to_another_host(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        client = await client_of(fleet, client_model)
        revoked_at: list[float] = []

        async def revoke() -> None:
            await spare(fleet)
            reply = nodes[0].control({"op": "revoke"})
            assert reply["decision"]["action"] == "drain"
            revoked_at.append(trio.current_time())

        ids, result = await generate_with(client, revoke)
        assert ids == local_ids
        assert nodes[0].peer_id not in {h["peer_id"] for h in result.route}
        await wait_until(lambda: nodes[0].owner.decision is not None
                         and nodes[0].owner.decision.action == "stop", timeout=5)
        assert trio.current_time() - revoked_at[0] < 2.5  # drain 1 s, then stop at the next poll
        entry = nodes[0].view.get(nodes[0].peer_id)
        assert entry is not None and entry.record.policy == "stop" and entry.record.consent is False
        # Consent again: serving resumes at once (an owner's choice has no cool-down).
        assert nodes[0].control({"op": "consent", "hours": 1})["decision"]["action"] == "serve"


async def test_verification_checks_every_window_of_new_peers(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    async with mem.fleet() as fleet:
        nodes = await fleet.start(3, serve=True)
        await covered(fleet, nodes)
        await spare(fleet)  # an independent host of every block: the verifier's
        client = await client_of(fleet, client_model, verify=True, verify_window=4)
        result = await client.generate(PROMPT, max_new_tokens=12)
        assert result.new_ids == local_ids
        v = result.verification
        assert v is not None and v["mismatches"] == 0
        # Which route wins is a tie on a zero-latency network (random peer ids): through the three
        # hosts, whose windows the spare re-computes, or through the spare alone, which nobody
        # else hosts whole, so its tokens stay unverified (never passed off as verified).
        if [h["blocks"] for h in result.route] == [[0, 10], [10, 20], [20, 30]]:
            assert v["windows_checked"] >= 3 and v["unverified_tokens"] == 0, v
        else:
            assert [h["blocks"] for h in result.route] == [[0, 30]], result.route
            assert v["windows_checked"] == 0 and v["unverified_tokens"] == 12, v


async def test_a_client_finds_hosts_of_another_region_through_the_dht(
        autojump_clock: Any, mem: Any, client_model: ClientModel, local_ids: list[int]) -> None:
    """Moved from test_discovery.py (real libp2p in one process, real clock)."""
    async with mem.fleet() as fleet:
        x = await fleet.add(serve=True)
        await wait_until(lambda: x.blocks == (0, 10))
        await trio.sleep(1)  # x's record says which blocks it hosts before y joins
        y = await fleet.add(serve=True, region="u33e", memory_budget_mb=280)
        await wait_until(lambda: y.blocks == (10, 30))
        me = await fleet.add(serve=False)
        client = FleetClient(me, client_model, ClientConfig(route_wait_s=60))
        await wait_until(lambda: x.peer_id in {r.peer_id for r in me.routable()}, timeout=10)
        assert y.peer_id not in {r.peer_id for r in me.fleet()}  # gossip does not carry it
        assert client.uncovered_blocks() == list(range(10, 30))
        await client.wait_ready()
        assert me.discovery.stats["lookups"] >= 1
        result = await client.generate(PROMPT, max_new_tokens=12)
        assert result.new_ids == local_ids
        assert [(h["peer_id"], h["blocks"]) for h in result.route] == [
            (x.peer_id, [0, 10]), (y.peer_id, [10, 30])]
