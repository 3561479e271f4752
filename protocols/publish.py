"""When to publish a new capacity record: on a significant change, plus a slow refresh.

Each delivered gossip message costs ~5 ms of CPU on every node (DESIGN.md), so a fleet cannot
afford a 1 Hz flood. ``should_publish`` is pure: the node calls it each time it samples its state.
"""

from __future__ import annotations

from dataclasses import dataclass

from idlefleet.protocols.records import CapacityRecord


@dataclass(frozen=True)
class PublishPolicy:
    refresh_s: float = 20.0  # republish unchanged state this often (record TTL is ~3x this)
    min_interval_s: float = 1.0  # never faster than this, except for a state change
    battery_delta: float = 0.02  # 2 points of state of charge
    thermal_delta_c: float = 5.0
    load_delta: float = 0.2
    memory_rel_delta: float = 0.2
    naive: bool = False  # the baseline: republish every ``min_interval_s`` whatever changed


# Fields whose any change matters at once to a router or to the owner.
_DISCRETE = ("state", "plugged_in", "consent", "consent_expires", "link_kind", "link_metered",
             "model_id", "blocks", "addrs", "region", "expected_departure", "parked_since")


def significant_change(old: CapacityRecord, new: CapacityRecord,
                       policy: PublishPolicy) -> str | None:
    """Name the first significant difference between two records' contents, or None."""
    for name in _DISCRETE:
        if getattr(old, name) != getattr(new, name):
            return name
    if abs(old.battery_soc - new.battery_soc) >= policy.battery_delta:
        return "battery_soc"
    if abs(old.thermal_headroom_c - new.thermal_headroom_c) >= policy.thermal_delta_c:
        return "thermal_headroom_c"
    if abs(old.load - new.load) >= policy.load_delta:
        return "load"
    mem_change = abs(old.free_memory_mb - new.free_memory_mb) / max(old.free_memory_mb, 1)
    if mem_change >= policy.memory_rel_delta:
        return "free_memory_mb"
    return None


def should_publish(last: CapacityRecord | None, candidate: CapacityRecord, now: float,
                   policy: PublishPolicy) -> str | None:
    """Return why to publish ``candidate`` now (a short reason), or None to stay quiet."""
    if last is None:
        return "first"
    since = now - last.issued_at
    if last.state != candidate.state:
        return "state"
    if since < policy.min_interval_s:
        return None
    if policy.naive:
        return "naive"
    changed = significant_change(last, candidate, policy)
    if changed is not None:
        return changed
    if since >= policy.refresh_s:
        return "refresh"
    return None
