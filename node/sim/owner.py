"""The owner policy of every simulated car: ``protocols.policy.decide`` itself, called for the cars
whose ``DecisionInputs`` changed. The inputs are computed for all cars at once in numpy
(``inputs``), one field per field of ``DecisionInputs``, and packed one bit per field into the memo
key (``inputs_key``): a car whose key did not change keeps its action and reason, since
``policy.rule`` reads nothing else. A field the simulator does not compute raises; ``exact=True``
checks every car's fields against ``policy.decision_inputs``."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING

import numpy as np

from idlefleet.node.sim.fleet import HOUR_S, T0
from idlefleet.node.vehicle import physics
from idlefleet.protocols.policy import (
    COOLDOWN_REASONS,
    REASONS,
    Consent,
    Decision,
    DecisionInputs,
    Preferences,
    VehicleReading,
    decide,
    decision_inputs,
)

if TYPE_CHECKING:
    from idlefleet.node.sim.engine import Simulation

ACTIONS = ("serve", "drain", "stop")
SERVE, DRAIN, STOP = 0, 1, 2
REASON_CODE = {r: i for i, r in enumerate(REASONS)}
_COOLDOWN_CODES = np.array([r in COOLDOWN_REASONS for r in REASONS])
INPUT_FIELDS = tuple(f.name for f in fields(DecisionInputs))
_COOL_BIT = INPUT_FIELDS.index("cooling_down")


def _within(prefs: Preferences, now_u: float) -> bool:
    """Whether ``now_u`` is inside the owner's allowed hours (a flag input only; ``decide`` rules)."""
    minute = int(((now_u + prefs.utc_offset_s) % 86_400.0) // 60)
    for start, end in prefs.allowed_hours:
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False


def consent_of(sim: Simulation, i: int, now_u: float) -> Consent:
    f, scn = sim.fleet, sim.scn
    if not f.opted_in[i]:
        return Consent()
    granted = T0 + scn.start_hour * HOUR_S - 86_400.0
    expires = (T0 + (scn.start_hour + scn.fleet.consent_hours) * HOUR_S
               if scn.fleet.consent_hours > 0 else None)
    rv = f.revoke_at[i]
    revoked = T0 + float(rv) if not math.isnan(rv) and T0 + rv <= now_u else None
    return Consent(granted_at=granted, expires_at=expires, revoked_at=revoked)


def cooling(sim: Simulation, now: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        out: np.ndarray = now - sim.blocked_at < sim.pref["resume_cooldown_s"]
    return out


def inputs(sim: Simulation, now: float) -> dict[str, np.ndarray]:
    """Every field of ``policy.DecisionInputs`` for every car, vectorised (the same comparisons
    ``policy.decision_inputs`` makes on one car's floats; ``exact=True`` checks them)."""
    f, scn, g, pref = sim.fleet, sim.scn, sim.group, sim.pref
    n = f.n
    now_u = T0 + now
    pct = sim.soc * 100.0
    head = physics.headroom_c(f.limit_c, sim.temp)
    with np.errstate(invalid="ignore"):  # NaN: never revoked / no departure announced
        revoked = f.opted_in & ((T0 + f.revoke_at) <= now_u)
        rv_over = now_u - (T0 + f.revoke_at) >= pref["revoke_drain_s"]
        dep_soon = (T0 + sim.announced) - now_u < pref["departure_margin_s"]
    expired = np.zeros(n, dtype=bool)
    exp_over = np.zeros(n, dtype=bool)
    if scn.fleet.consent_hours > 0:
        exp = T0 + (scn.start_hour + scn.fleet.consent_hours) * HOUR_S
        expired = f.opted_in & (now_u >= exp)
        exp_over = expired & (now_u - exp >= pref["revoke_drain_s"])
    outside = np.array([bool(p.allowed_hours) and not _within(p, now_u) for p in sim.prefs])[g]
    return {
        "consented": f.opted_in, "revoked": revoked, "expired": expired,
        "drain_over": np.where(revoked, rv_over, exp_over),
        "vehicle_known": np.ones(n, dtype=bool),  # the simulated daemon is never late
        "parked": sim.parked, "below_floor": pct < pref["hard_floor_pct"], "overheated": head < 0,
        "departure_soon": dep_soon, "hot": head < pref["min_headroom_c"],
        "plugged_in": sim.plug_now() > 0, "require_plugged_in": sim.require_plugged[g],
        "below_min_battery": pct < pref["min_battery_pct"],
        "metered_blocked": f.metered & ~sim.allow_metered[g], "outside_hours": outside,
        "cooling_down": cooling(sim, now),
    }


def inputs_key(sim: Simulation, now: float) -> np.ndarray:
    """Each car's ``DecisionInputs`` packed into one int (bit k = field k): the memo key. A car
    whose key did not change since its last decision gets the same action and reason
    (``policy.rule`` reads nothing else). Raises RuntimeError if ``_inputs`` misses a field."""
    cols = inputs(sim, now)
    if list(cols) != list(INPUT_FIELDS):
        raise RuntimeError(f"the simulator computes {sorted(cols)}, DecisionInputs has {INPUT_FIELDS}")
    out = np.zeros(sim.fleet.n, dtype=np.int64)
    for k, name in enumerate(INPUT_FIELDS):
        out |= cols[name].astype(np.int64) << k
    return out


def check_inputs(sim: Simulation, i: int, key: int, got: DecisionInputs) -> None:
    """``exact=True``: car ``i``'s packed inputs must be what the policy itself computes."""
    mine = DecisionInputs(*(bool(key >> k & 1) for k in range(len(INPUT_FIELDS))))
    if mine != got:
        raise RuntimeError(f"car {i}: simulated policy inputs {mine} != decision_inputs {got}")


def decide_all(sim: Simulation, now: float, changed: np.ndarray) -> np.ndarray:
    """Re-evaluate the policy where needed; returns the cars whose action changed."""
    key = inputs_key(sim, now)
    stale = (key != sim.inputs_key) | changed
    todo = np.arange(sim.fleet.n) if sim.exact else np.flatnonzero(stale)
    sim.inputs_key = key
    now_u = T0 + now
    f = sim.fleet
    before = sim.action.copy()
    head = physics.headroom_c(f.limit_c, sim.temp)
    plug = sim.plug_now() > 0
    for i in todo.tolist():
        prev = Decision(ACTIONS[sim.action[i]], REASONS[sim.reason[i]], T0 + float(sim.since[i]),
                        None if math.isnan(sim.blocked_at[i]) else T0 + float(sim.blocked_at[i]))
        ann = sim.announced[i]
        reading = VehicleReading(
            battery_soc=float(sim.soc[i]), plugged_in=bool(plug[i]),
            thermal_headroom_c=float(head[i]), parked=bool(sim.parked[i]),
            expected_departure=None if math.isnan(ann) else T0 + float(ann), observed_at=now_u,
            link_metered=bool(f.metered[i]))
        prefs, consent = sim.prefs[sim.group[i]], consent_of(sim, i, now_u)
        if sim.exact:
            check_inputs(sim, i, int(key[i]), decision_inputs(prefs, consent, reading, now_u, prev))
        d = decide(prefs, consent, reading, now_u, prev)
        sim.action[i] = ACTIONS.index(d.action)
        sim.reason[i] = REASON_CODE[d.reason]
        sim.since[i] = d.since - T0
        sim.blocked_at[i] = np.nan if d.vehicle_blocked_at is None else d.vehicle_blocked_at - T0
    sim.calls["decide"] += len(todo)
    # A car still blocked by a vehicle condition gets the same decision with
    # vehicle_blocked_at = now (the policy's hysteresis): no call needed to know that.
    sim.blocked_at = np.where(_COOLDOWN_CODES[sim.reason], now, sim.blocked_at)
    # the cool-down flag depends on blocked_at, which the decisions just moved
    bit = np.int64(1) << _COOL_BIT
    sim.inputs_key = (sim.inputs_key & ~bit) | (cooling(sim, now).astype(np.int64) << _COOL_BIT)
    serving = (sim.action == SERVE) & sim.parked
    sim.floor_violations += int(np.sum(serving & (sim.soc * 100.0 < sim.pref["hard_floor_pct"])))
    return np.flatnonzero(sim.action != before)
