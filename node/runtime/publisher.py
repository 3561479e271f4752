"""The publisher: this node's signed capacity record, built, signed and gossiped.

``Publisher`` (``node.publisher``) owns the record's sequence number and the last record
published. Its loop (``run``) samples the vehicle every ``vehicle_poll_s`` (``node.owner_desk``),
lets the node's lifecycle advance, and publishes when ``protocols.publish.should_publish`` says
the record changed enough or aged, or at once when asked (``request``), keeping a minimum interval.
What the record says about serving (state, policy) is ``node.serving()``
(``protocols.serving.serving_decision``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from idlefleet.node.serve.hosting import available_memory_mb
from idlefleet.node.vehicle.state import VehicleState
from idlefleet.p2p.errors import NetworkError
from idlefleet.protocols import wire
from idlefleet.protocols.publish import PublishPolicy, should_publish
from idlefleet.protocols.records import CapacityRecord, encode_signed

if TYPE_CHECKING:
    from idlefleet.node.runtime.node import Node

log = logging.getLogger(__name__)

#: What a record says while no vehicle state was ever read (its policy says vehicle_unknown).
UNKNOWN_VEHICLE = VehicleState(battery_soc=0.0, plugged_in=False, charging_kw=0.0, thermal_headroom_c=0.0,
                               parked=False, parked_since=None, expected_departure=None)


def measure_compute_gflops(size: int = 256, repeats: int = 5) -> float:
    """A quick fp32 matmul benchmark (~10 ms): this device's compute estimate, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return round(2 * size**3 / max(best, 1e-9) / 1e9, 2)


class Publisher:
    """Builds and publishes ``node``'s record. Start with ``await nursery.start(publisher.run)``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        config = node.config
        self.seq = 0
        self.last_record: CapacityRecord | None = None
        self.compute_gflops = measure_compute_gflops()
        self.policy = PublishPolicy(refresh_s=config.refresh_s, naive=config.publish_policy == "naive")
        self._publish_now = trio.Event()

    def request(self) -> None:
        """Publish a fresh record soon (the minimum interval still holds)."""
        self._publish_now.set()

    def _next_seq(self) -> int:
        # Milliseconds since the epoch: monotonic across restarts with the same key, so peers that
        # remember our last sequence number do not reject us as a replay after a reboot.
        self.seq = max(self.seq + 1, int(time.time() * 1000))
        return self.seq

    def build_record(self, now: float) -> CapacityRecord:
        """The record this node would announce now (unsigned; sequence number not advanced)."""
        node = self.node
        vehicle = node.owner_desk.last_vehicle or UNKNOWN_VEHICLE
        grant = node.owner.consent()
        consent = grant.active(now)
        serving = node.serving()
        # Relayed addresses first: a node advertises them only when it cannot be dialled.
        addrs = tuple(node.nat.relayed_addrs + [a.split("/p2p/")[0] for a in node.host.multiaddrs()])[:8]
        return CapacityRecord(
            peer_id=node.peer_id, public_key=node.public_key, addrs=addrs,
            region=node.config.region, state=serving.state,
            battery_soc=vehicle.battery_soc, plugged_in=vehicle.plugged_in,
            charging_kw=vehicle.charging_kw, thermal_headroom_c=vehicle.thermal_headroom_c,
            parked_since=vehicle.parked_since, expected_departure=vehicle.expected_departure,
            consent=consent, consent_expires=grant.expires_at if consent else None,
            link_kind=node.config.link_kind, link_metered=node.config.link_metered,
            compute_gflops=self.compute_gflops, free_memory_mb=available_memory_mb(),
            load=min(1.0, max(0.0, node.load)), model_id=node.model_id, blocks=node.blocks,
            seq=self.seq, issued_at=now, expires_at=now + node.config.record_ttl_s,
            policy=serving.policy, policy_reason=serving.policy_reason,
        )

    async def publish(self, reason: str) -> CapacityRecord:
        """Sign and gossip a fresh record now; also store it in the DHT (``Discovery``). A failed
        publish is logged (peers get the next one); the record is ours either way."""
        node = self.node
        now = time.time()
        record = dataclasses.replace(self.build_record(now), seq=self._next_seq())
        raw = encode_signed(record, node.key)
        node.view.accept(record, raw, now)
        node.view.mark_verified(node.peer_id, now)
        self.last_record = record
        envelope = wire.encode_envelope("capacity", {"record": raw})
        try:
            await node.host.publish(node.topic, envelope)
        except (NetworkError, trio.TooSlowError) as e:
            log.warning("publishing our record failed: %s", e)
        node.event("published", seq=record.seq, reason=reason, battery_soc=record.battery_soc,
                   state=record.state)
        node.notify_changed()
        node.discovery.record_published(record.seq, raw)  # every record: the DHT copy stays fresh
        return record

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the vehicle every ``vehicle_poll_s``; publish per the policy. Runs until cancelled."""
        node = self.node
        task_status.started()
        while True:
            with trio.move_on_after(node.config.vehicle_poll_s):
                await self._publish_now.wait()
            forced = self._publish_now.is_set()
            self._publish_now = trio.Event()
            if forced and self.last_record is not None:
                # A forced publish (a refutation, new blocks) still keeps the minimum interval:
                # a flood of notices about us must not make us flood the topic.
                await trio.sleep_until(trio.current_time() + max(
                    0.0, self.last_record.issued_at + self.policy.min_interval_s - time.time()))
            now = time.time()
            if node.owner_desk.evaluate_policy(now):
                forced = True
            node.advance_lifecycle(now)
            candidate = self.build_record(now)
            reason = "forced" if forced else should_publish(self.last_record, candidate, now, self.policy)
            if reason is not None:
                await self.publish(reason)
