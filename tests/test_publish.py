"""Rate-aware publishing: first record, state changes, min interval, significant fields, refresh, naive."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.protocols.publish import PublishPolicy, should_publish, significant_change
from idlefleet.protocols.records import CapacityRecord
from tests.factories import T0, capacity_record

KEY = Ed25519PrivateKey.from_private_bytes(b"\x33" * 32)

POLICY = PublishPolicy()  # refresh 20 s, min interval 1 s


def make_record(**overrides: Any) -> CapacityRecord:
    defaults = {"battery_soc": 0.5, "thermal_headroom_c": 30.0, "free_memory_mb": 8000, "load": 0.3}
    return capacity_record(KEY, **(defaults | overrides))


LAST = make_record()


def candidate(at: float, **changes: Any) -> CapacityRecord:
    """What the node would build at time ``at``: same contents as LAST except ``changes``."""
    return dataclasses.replace(LAST, issued_at=at, expires_at=at + 60.0, **changes)


def test_first_record_is_always_published() -> None:
    assert should_publish(None, LAST, T0, POLICY) == "first"
    assert should_publish(None, LAST, T0, PublishPolicy(naive=True)) == "first"


def test_nothing_changed_stays_quiet_until_refresh() -> None:
    for dt in (0.0, 0.5, 1.0, 5.0, 19.99):
        assert should_publish(LAST, candidate(T0 + dt), T0 + dt, POLICY) is None, dt
    assert should_publish(LAST, candidate(T0 + 20.0), T0 + 20.0, POLICY) == "refresh"
    assert should_publish(LAST, candidate(T0 + 45.0), T0 + 45.0, POLICY) == "refresh"


def test_refresh_follows_the_policy() -> None:
    policy = PublishPolicy(refresh_s=5.0)
    assert should_publish(LAST, candidate(T0 + 4.9), T0 + 4.9, policy) is None
    assert should_publish(LAST, candidate(T0 + 5.0), T0 + 5.0, policy) == "refresh"


def test_state_change_bypasses_the_min_interval() -> None:
    for state in ("draining", "offline", "joining"):
        assert should_publish(LAST, candidate(T0 + 0.1, state=state), T0 + 0.1, POLICY) == "state"
    # Even at once, and even in naive mode.
    assert should_publish(LAST, candidate(T0, state="offline"), T0, PublishPolicy(naive=True)) == "state"


def test_significant_change_waits_for_the_min_interval() -> None:
    changed = candidate(T0 + 0.5, battery_soc=0.2)
    assert should_publish(LAST, changed, T0 + 0.5, POLICY) is None
    assert should_publish(LAST, changed, T0 + 0.999, POLICY) is None
    assert should_publish(LAST, changed, T0 + 1.0, POLICY) == "battery_soc"


def test_min_interval_follows_the_policy() -> None:
    policy = PublishPolicy(min_interval_s=3.0)
    changed = candidate(T0 + 2.0, plugged_in=True)
    assert should_publish(LAST, changed, T0 + 2.0, policy) is None
    assert should_publish(LAST, changed, T0 + 3.0, policy) == "plugged_in"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("plugged_in", True),
        ("consent", False),
        ("consent_expires", T0 + 3600),
        ("link_kind", "cellular"),
        ("link_metered", True),
        ("model_id", "smollm2-135m"),
        ("addrs", ("/ip4/10.0.0.2/tcp/4001",)),
        ("region", "u33e"),
        ("expected_departure", T0 + 7200),
    ],
)
def test_any_change_of_a_discrete_field_is_significant(field: str, value: Any) -> None:
    new = candidate(T0 + 2.0, **{field: value})
    assert significant_change(LAST, new, POLICY) == field
    assert should_publish(LAST, new, T0 + 2.0, POLICY) == field


def test_block_range_change_is_significant() -> None:
    hosting = candidate(T0 + 2.0, model_id="m", blocks=(0, 10))
    assert significant_change(candidate(T0, model_id="m"), hosting, POLICY) == "blocks"
    assert significant_change(hosting, dataclasses.replace(hosting, blocks=(0, 12)), POLICY) == "blocks"


@pytest.mark.parametrize(
    ("field", "below", "at_threshold"),
    [
        # LAST: battery 0.5, thermal 30 C, load 0.3, free memory 8000 MB
        ("battery_soc", 0.51, 0.47),
        ("thermal_headroom_c", 34.0, 25.0),
        ("load", 0.45, 0.5),
        ("free_memory_mb", 7000, 6400),  # 20% of 8000 = 1600
    ],
)
def test_numeric_fields_matter_only_past_their_threshold(field: str, below: Any, at_threshold: Any) -> None:
    small = candidate(T0 + 2.0, **{field: below})
    big = candidate(T0 + 2.0, **{field: at_threshold})
    assert significant_change(LAST, small, POLICY) is None
    assert should_publish(LAST, small, T0 + 2.0, POLICY) is None
    assert significant_change(LAST, big, POLICY) == field
    assert should_publish(LAST, big, T0 + 2.0, POLICY) == field


def test_thresholds_follow_the_policy() -> None:
    strict = PublishPolicy(battery_delta=0.005, thermal_delta_c=0.5, load_delta=0.01, memory_rel_delta=0.01)
    assert significant_change(LAST, candidate(T0, battery_soc=0.51), strict) == "battery_soc"
    assert significant_change(LAST, candidate(T0, thermal_headroom_c=31.0), strict) == "thermal_headroom_c"
    assert significant_change(LAST, candidate(T0, load=0.32), strict) == "load"
    assert significant_change(LAST, candidate(T0, free_memory_mb=7900), strict) == "free_memory_mb"


def test_changes_in_either_direction_count() -> None:
    assert significant_change(LAST, candidate(T0, battery_soc=0.6), POLICY) == "battery_soc"
    assert significant_change(LAST, candidate(T0, battery_soc=0.4), POLICY) == "battery_soc"
    assert significant_change(LAST, candidate(T0, free_memory_mb=9600), POLICY) == "free_memory_mb"


def test_free_memory_from_zero_does_not_divide_by_zero() -> None:
    empty = dataclasses.replace(LAST, free_memory_mb=0)
    assert significant_change(empty, empty, POLICY) is None
    assert significant_change(empty, LAST, POLICY) == "free_memory_mb"
    assert significant_change(LAST, empty, POLICY) == "free_memory_mb"


def test_bookkeeping_fields_are_not_significant() -> None:
    # A new sequence number and timestamps alone are what a refresh is for.
    new = dataclasses.replace(LAST, seq=99, issued_at=T0 + 10, expires_at=T0 + 70)
    assert significant_change(LAST, new, POLICY) is None
    assert should_publish(LAST, new, T0 + 10, POLICY) is None


def test_several_changes_name_the_first_discrete_one() -> None:
    new = candidate(T0 + 2.0, battery_soc=0.1, plugged_in=True, state="online")
    assert should_publish(LAST, new, T0 + 2.0, POLICY) == "plugged_in"


def test_naive_mode_publishes_every_min_interval_whatever_changed() -> None:
    naive = PublishPolicy(naive=True)
    assert should_publish(LAST, candidate(T0 + 0.5), T0 + 0.5, naive) is None
    assert should_publish(LAST, candidate(T0 + 1.0), T0 + 1.0, naive) == "naive"
    assert should_publish(LAST, candidate(T0 + 1.0, battery_soc=0.1), T0 + 1.0, naive) == "naive"
    assert should_publish(LAST, candidate(T0 + 30.0), T0 + 30.0, naive) == "naive"


def test_a_slowly_draining_battery_publishes_rarely() -> None:
    # Sample every second while the battery loses 0.1 point per second for 100 s: publish on each
    # 2-point step (every ~20 s) and no more, instead of 100 times.
    last = LAST
    reasons = []
    for i in range(1, 101):
        now = T0 + i
        cand = candidate(now, battery_soc=round(0.5 - 0.001 * i, 6))
        reason = should_publish(last, cand, now, POLICY)
        if reason is not None:
            reasons.append(reason)
            last = cand
    assert 4 <= len(reasons) <= 6
    assert set(reasons) <= {"battery_soc", "refresh"}
