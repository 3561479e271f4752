"""The fleet simulator: fixed time steps over numpy arrays, with the node's own decisions.

Each step of ``step_s`` seconds:

1. **Physics** (vectorised): battery (driving, charging with the taper of ``node/vehicle/physics.py``,
   standby, compute) and temperature relax towards a target (ambient, sun, charging, driving,
   serving heat). A car serving on battery stops drawing compute at its hard floor, as the node
   would within a second.
2. **Trips**: departures and arrivals in the step (``fleet.Schedule``); scenario outages.
3. **Owner policy**: ``protocols.policy.decide`` — the node's function — for every car whose
   policy inputs changed. "Changed" is tested on every predicate the policy reads (parked, plugged,
   each threshold, departure margin, consent, cool-down, hours) in numpy; a car with the same
   predicates gets the same decision (``exact=True`` calls ``decide`` for every car every step,
   and the tests check both give the same result).
4. **Hosting**: a car that starts serving claims ``protocols.placement.choose_range`` of its
   region's coverage; a car that stops abruptly (drove off, battery floor, overheated) loses its
   in-flight sessions, which fail over; a draining car's sessions migrate. Every ``rebalance_s``,
   ``rebalance_checks`` hosts (distinct budget and range) of each region whose coverage changed
   ask ``placement.should_move``; in a region with a block nobody hosts, every host asks at every
   step. Answers are memoised (a pure function of the coverage without the host, its range and
   how many blocks fit).
5. **Demand**: Poisson arrivals per region from the daily curve, an overnight batch queue.
   In a routed region every request goes through ``protocols.routing.find_route`` over that
   region's online hosts (their load included; a found route takes as many requests as its
   busiest hop has room for, then the search repeats); service time from ``routing.hop_cost``.
   Other regions (``RoutingSpec.sample_regions``) use the per-block capacity bound: ``n``
   requests fit if every block's free slot-seconds cover them. Unserved requests try the sibling
   region, then fail with a reason.
6. **Gossip**: ``protocols.publish.should_publish`` for every running node whose record changed;
   unchanged records refresh every ``refresh_s``. Bytes from the real signed record size
   (``records.encode_signed``) and the GossipSub mesh degree of the regional topic.

Nothing here imports trio or libp2p; it is deterministic for a given scenario (wall-clock timings
are reported apart, under ``timing``).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.sim.fleet import HOUR_S, KINDS, MB, T0, build_fleet, region_name
from idlefleet.node.sim.scenario import PROFILES, Scenario
from idlefleet.node.vehicle import physics
from idlefleet.protocols.errors import LocalProtocolError
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.placement import choose_range, should_move
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
from idlefleet.protocols.publish import should_publish
from idlefleet.protocols.records import CapacityRecord, encode_signed
from idlefleet.protocols.routing import Candidate, NoRoute, find_route, hop_cost

__all__ = ["FAIL_REASONS", "SimResult", "Simulation", "run_simulation"]

ACTIONS = ("serve", "drain", "stop")
SERVE, DRAIN, STOP = 0, 1, 2
_REASON_CODE = {r: i for i, r in enumerate(REASONS)}
_COOLDOWN_CODES = np.array([r in COOLDOWN_REASONS for r in REASONS])
INPUT_FIELDS = tuple(f.name for f in fields(DecisionInputs))
_COOL_BIT = INPUT_FIELDS.index("cooling_down")
#: Why a request was not served.
FAIL_REASONS = ("no_coverage", "overloaded", "failover_failed")
#: A prompt token costs this fraction of a decode token (prefill runs in chunks).
PREFILL_FRACTION = 1 / 8
STATES = ("online", "draining", "offline")
KAD_ALPHA, KAD_BITS_PER_HOP = 3, 3  # DHT estimate: alpha parallel queries, ~3 bits closer per hop


class _RecordView(NamedTuple):
    """The fields ``should_publish`` compares, with the node record's names (a signed
    ``CapacityRecord`` costs ~0.1 ms to build; the policy only reads fields)."""

    state: str
    plugged_in: bool
    consent: bool
    consent_expires: float | None
    link_kind: str
    link_metered: bool
    model_id: str
    blocks: tuple[int, int] | None
    addrs: tuple[str, ...]
    region: str
    expected_departure: float | None
    parked_since: float | None
    battery_soc: float
    thermal_headroom_c: float
    load: float
    free_memory_mb: int
    issued_at: float


@dataclass
class SimResult:
    """``report`` is JSON-ready and deterministic; ``timing`` holds wall-clock measurements."""

    report: dict[str, Any]
    timing: dict[str, Any]


def _pct(values: np.ndarray | list[float] | list[int], q: float) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else 0.0


def _r(x: float, digits: int = 4) -> float:
    """Round for the report (stable JSON across platforms' last-bit differences)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else 0.0


def record_sizes(scn: Scenario) -> dict[tuple[int, bool, bool], int]:
    """Signed record sizes on the wire by (state, hosts blocks, announces a departure): real
    ``encode_signed`` output for a record like the simulated node would send."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key().public_bytes_raw()
    base = CapacityRecord(
        peer_id=peer_id_from_public_key(pub), public_key=pub, addrs=("/ip4/203.0.113.7/tcp/4001",),
        region=region_name(0), state="online", battery_soc=0.61803, plugged_in=True, charging_kw=7.4,
        thermal_headroom_c=41.5, parked_since=T0 + 1234.5, expected_departure=None, consent=True,
        consent_expires=None, link_kind="wifi", link_metered=False, compute_gflops=2000.0,
        free_memory_mb=12_000, load=0.25, model_id=f"sim-{scn.model.blocks}-blocks", blocks=None,
        seq=123_456, issued_at=T0 + 5000.25, expires_at=T0 + 5000.25 + scn.record_ttl_s,
    )
    sizes = {}
    for s, state in enumerate(STATES):
        for blocks in (False, True):
            for dep in (False, True):
                rec = replace(base, state=state, blocks=(10, 22) if blocks else None,
                              expected_departure=T0 + 40_000.5 if dep else None)
                sizes[(s, blocks, dep)] = len(encode_signed(rec, key))
    return sizes


class Simulation:
    """One run of a scenario. ``run()`` returns a ``SimResult``; ``exact=True`` evaluates the
    policy and the publish decision for every car at every step (slow; for tests)."""

    def __init__(self, scn: Scenario, *, exact: bool = False,
                 progress: Callable[[str], None] | None = None) -> None:
        t_build = time.perf_counter()
        self.scn = scn
        self.exact = exact
        self.progress = progress
        self.fleet = f = build_fleet(scn)
        self.rng = np.random.Generator(np.random.PCG64([scn.seed, 7]))
        B = scn.model.blocks
        self.B = B
        self.block_bytes = [int(scn.model.block_mb * MB)] * B
        self.n_fit = np.minimum(f.budget_bytes // self.block_bytes[0], B).astype(np.int64)
        self.region_names = [region_name(r) for r in range(f.regions)]
        self.pop = np.bincount(f.region, minlength=f.regions)
        self.cap = scn.demand.slots * scn.step_s  # slot-seconds per host per step
        costs = replace(scn.routing.costs, block_flops=scn.model.block_gflop * 1e9,
                        default_rtt_s=scn.routing.rtt_s)
        self.costs = costs
        # Latency estimate: the same hop cost without the routing penalties (which are not time).
        self.latency_costs = replace(costs, low_battery_penalty_s=0.0, draining_penalty_s=0.0,
                                     departure_penalty_s=0.0, metered_penalty_s=0.0,
                                     other_region_penalty_s=0.0)
        self.prefs = [scn.policy, replace(scn.policy, require_plugged_in=False)]
        self.record_bytes = record_sizes(scn)
        self.size_table = np.array([self.record_bytes[(s, bool(b), bool(d))]
                                    for s in range(len(STATES)) for b in (0, 1) for d in (0, 1)], dtype=float)
        # Per-device per-block compute time (s/token) and fixed hop time, from routing.hop_cost.
        speeds, which = np.unique(f.gflops, return_inverse=True)
        per, fixed = np.empty(len(speeds)), np.empty(len(speeds))
        for k, g in enumerate(speeds.tolist()):
            c = self._cand_proto(g)
            fixed[k] = hop_cost(c, 0, now=T0, costs=self.latency_costs)
            per[k] = hop_cost(c, 1, now=T0, costs=self.latency_costs) - fixed[k]
        self.per_block_s, self.hop_fixed_s = per[which], fixed[which]
        # Sampled (routed) regions: evenly spread by index.
        R = f.regions
        k = scn.routing.sample_regions
        self.routed = np.ones(R, dtype=bool)
        if 0 < k < R:
            self.routed[:] = False
            self.routed[np.linspace(0, R - 1, k).round().astype(int)] = True
        self.sibling = np.where(np.arange(R) ^ 1 < R, np.arange(R) ^ 1, -1)
        if R == 1:
            self.sibling[:] = -1
        # Outage regions: the most populous first.
        e = scn.events
        n_out = round(e.outage_regions * R)
        self.outage_region = np.zeros(R, dtype=bool)
        self.outage_region[np.argsort(-self.pop, kind="stable")[:n_out]] = True
        self._init_state()
        self.t_build = time.perf_counter() - t_build

    def _cand_proto(self, gflops: float) -> Candidate:
        return Candidate("p", 0, 1, None, gflops, 0.0, 1.0, True, "online", None, False, "u")

    # -- state -------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        f, scn, n = self.fleet, self.scn, self.fleet.n
        self.t = scn.start_hour * HOUR_S
        self.soc = f.soc.copy()
        self.soc0 = f.soc.copy()
        self.parked = f.parked.copy()
        self.plug_kw = f.plug_kw.copy()
        self.parked_since = f.parked_since.copy()
        self.announced = f.announced.copy()
        self.power_out = np.zeros(n, dtype=bool)
        self.net_out = np.zeros(n, dtype=bool)
        self.temp = self._target_temp(self.t, np.zeros(n))
        # decisions
        self.action = np.full(n, STOP, dtype=np.int8)
        self.reason = np.full(n, _REASON_CODE["no_consent"], dtype=np.int8)
        self.since = np.full(n, self.t)
        self.blocked_at = np.full(n, np.nan)
        self.inputs_key = np.full(n, -1, dtype=np.int64)
        self.require_plugged = np.array([p.require_plugged_in for p in self.prefs])
        self.allow_metered = np.array([p.allow_metered for p in self.prefs])
        self.group = g = f.on_battery.astype(np.int8)
        self.pref = {name: np.array([getattr(p, name) for p in self.prefs], dtype=float)[g]
                     for name in ("hard_floor_pct", "min_battery_pct", "departure_margin_s", "revoke_drain_s",
                                  "resume_cooldown_s", "min_headroom_c")}
        # hosting
        self.hosting = np.zeros(n, dtype=bool)
        self.h_start = np.zeros(n, dtype=np.int64)
        self.h_end = np.zeros(n, dtype=np.int64)
        self.cov = np.zeros((f.regions, self.B), dtype=np.int32)
        self.cov_dirty = np.zeros(f.regions, dtype=bool)
        self.next_rebalance = self.t + scn.rebalance_s
        self.rebalance_round = 0
        self.used = np.zeros(n)  # slot-seconds assigned this step
        self.util = np.zeros(n)
        # gossip
        self.running = np.zeros(n, dtype=bool)
        self.pub_valid = np.zeros(n, dtype=bool)
        self.pub_t = np.zeros(n)
        self.pub_state = np.zeros(n, dtype=np.int8)
        self.pub_plug = np.zeros(n, dtype=bool)
        self.pub_blk = np.full(n, -1, dtype=np.int64)
        self.pub_ann = np.full(n, np.nan)
        self.pub_since = np.full(n, np.nan)
        self.pub_consent = np.zeros(n, dtype=bool)
        self.pub_soc = np.zeros(n)
        self.pub_head = np.zeros(n)
        self.pub_load = np.zeros(n)
        # accounting
        self.compute_kwh = np.zeros(n)
        self.grid_kwh = np.zeros(n)
        self.drive_kwh = np.zeros(n)
        self.standby_kwh = np.zeros(n)
        self.credits = np.zeros(n)
        self.served_s = np.zeros(n)
        self.hour_bytes = np.zeros(n)
        self.hour_run_s = np.zeros(n)
        self.hour_msgs = np.zeros(n)
        self.queue = np.zeros(f.regions, dtype=np.int64)
        self.calls = {"decide": 0, "should_publish": 0, "choose_range": 0, "should_move": 0,
                      "find_route": 0, "hop_cost": 0}
        self.move_memo: dict[tuple[int, int, int, bytes], tuple[int, int] | None] = {}
        self.publish_reasons: dict[str, int] = {}
        self.cand_cache: dict[int, tuple[tuple[Any, ...], Candidate]] = {}
        self.route_ms: list[float] = []
        self.route_cands: list[int] = []
        self.route_hops: list[int] = []
        self.floor_violations = 0
        self.energy_over = 0
        self.charger_kwh = 0.0
        self.battery_compute_kwh = 0.0
        self.phase_s: dict[str, float] = {}
        self.floor_compute_violations = 0
        self.hours: list[dict[str, Any]] = []
        self._hour_reset()
        self.totals: dict[str, int] = {"arrived": 0, "served": 0, "served_remote": 0, "batch_arrived": 0,
                                       "batch_served": 0, "failovers": 0, "migrations": 0, "moves": 0,
                                       "joins": 0, "abrupt_stops": 0, "tokens": 0}
        self.failed = dict.fromkeys(FAIL_REASONS, 0)
        self.by_method = {"routed": [0, 0], "bound": [0, 0]}  # [requests, served in their region]
        self.batch_failed = dict.fromkeys(FAIL_REASONS, 0)

    def _hour_reset(self) -> None:
        self.h: dict[str, Any] = {
                  "arrived": 0, "served": 0, "served_remote": 0, "failed": dict.fromkeys(FAIL_REASONS, 0),
                  "tokens": 0, "failovers": 0, "migrations": 0, "batch_served": 0, "dht_lookups": 0,
                  "publishes": 0, "compute_kwh": 0.0, "moves": 0, "joins": 0}
        self.hour_bytes[:] = 0
        self.hour_run_s[:] = 0
        self.hour_msgs[:] = 0

    # -- physics -----------------------------------------------------------------------------------

    def _target_temp(self, t: float, util: np.ndarray) -> np.ndarray:
        f = self.fleet
        is_car = f.kind == 0
        plug = self._plug_now()
        # Cars sit outside (sun on the roof, charging heat); phones and laptops indoors.
        out: np.ndarray = physics.target_temp_c(
            t, ambient_c=f.ambient_c, diurnal_c=np.where(is_car, 6.0, 1.0),
            idle_rise_c=np.where(is_car, 2.0, 3.0), driving=~self.parked,
            drive_rise_c=np.where(is_car, 25.0, 9.0), unplugged=plug <= 0,
            solar_c=np.where(is_car, 12.0, 0.0), charge=self._charge_kw(plug),
            charge_rise_c=np.where(is_car, 20.0, 0.0), charge_ref_kw=50.0,
            serve_rise_c=f.serve_rise_c, util=util)
        return out

    def _plug_now(self) -> np.ndarray:
        out: np.ndarray = physics.plug_kw(self.parked, self.plug_kw, self.power_out)
        return out

    def _charge_kw(self, plug: np.ndarray) -> np.ndarray:
        out: np.ndarray = physics.charge_kw(plug, self.soc)
        return out

    def _physics(self, dt: float) -> None:
        f = self.fleet
        hosting_serving = self.hosting & (self.action == SERVE)
        draw = np.where(hosting_serving, f.idle_kw + (f.compute_kw - f.idle_kw) * self.util, 0.0)
        draw = np.where(self.hosting & (self.action == DRAIN), f.idle_kw, draw)
        plug = self._plug_now()
        charge = self._charge_kw(plug)
        plugged = plug > 0
        batt_in = physics.battery_kw(self.parked, plug, charge, f.drive_kw, f.standby_kw, draw)
        # Serving on battery stops at the hard floor (the node samples every second).
        floor = self.pref["hard_floor_pct"] / 100.0
        need = np.where(batt_in < 0, -batt_in * dt / HOUR_S, 0.0)
        room = np.maximum(0.0, (self.soc - floor) * f.battery_kwh)
        frac = np.where((draw > 0) & (need > room), np.clip(room / np.maximum(need, 1e-12), 0.0, 1.0), 1.0)
        if np.any((draw > 0) & (self.soc < floor - 1e-9) & (frac > 0) & (batt_in < 0)):
            self.floor_compute_violations += 1
        draw_eff = draw * frac
        # Energy conservation: compute never uses more than the charger's power plus the battery
        # above its floor.
        used = draw_eff * dt / HOUR_S
        avail = (np.where(self.parked, plug * dt / HOUR_S, 0.0)
                 + np.maximum(0.0, self.soc - floor) * f.battery_kwh)
        self.energy_over += int(np.sum(used > avail + 1e-9))
        self.charger_kwh += float(np.sum(np.where(draw > 0, plug, 0.0))) * dt / HOUR_S
        self.battery_compute_kwh += float(np.sum(np.where(plug > 0, 0.0, used)))
        batt_in = np.where(self.parked & (frac < 1.0), batt_in + draw - draw_eff, batt_in)
        new_soc = physics.soc_after(self.soc, batt_in, dt, f.battery_kwh)
        delivered = (new_soc - self.soc) * f.battery_kwh  # what the battery really took or gave
        self.grid_kwh += np.where(plugged, np.maximum(0.0, delivered) + draw_eff * dt / HOUR_S, 0.0)
        self.compute_kwh += draw_eff * dt / HOUR_S
        self.h["compute_kwh"] += float(draw_eff.sum()) * dt / HOUR_S
        self.drive_kwh += np.where(self.parked, 0.0, -delivered)
        self.standby_kwh += np.where(self.parked & ~plugged, f.standby_kw * dt / HOUR_S, 0.0)
        self.soc = new_soc
        target = self._target_temp(self.t + dt / 2, np.where(draw > 0, draw_eff / f.compute_kw, 0.0))
        self.temp = physics.relax_c(self.temp, target, dt, f.tau_s)

    # -- trips and outages -------------------------------------------------------------------------

    def _events(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Apply trips in (t0, t1]; returns (departed, changed) masks."""
        s, n = self.fleet.schedule, self.fleet.n
        lo, hi = np.searchsorted(s.t, [t0, t1], side="right")
        departed = np.zeros(n, dtype=bool)
        changed = np.zeros(n, dtype=bool)
        if hi > lo:
            car, kind = s.car[lo:hi], s.kind[lo:hi]
            departed[car[kind == 0]] = True
            changed[car] = True
            last = np.full(n, -1, dtype=np.int64)
            np.maximum.at(last, car, np.arange(lo, hi))
            cars = np.flatnonzero(last >= 0)
            li = last[cars]
            arrive = s.kind[li] == 1
            self.parked[cars] = arrive
            self.plug_kw[cars] = np.where(arrive, s.plug_kw[li], 0.0)
            self.parked_since[cars] = np.where(arrive, s.t[li], np.nan)
            self.announced[cars] = np.where(arrive, s.announced[li], np.nan)
        e = self.scn.events
        if e.outage_h > 0 and e.outage_regions > 0:
            a = (self.scn.start_hour + e.outage_at_h) * HOUR_S
            inside = a <= t1 < a + e.outage_h * HOUR_S
            down = self.outage_region[self.fleet.region] & inside
            if e.outage_kind == "power":
                changed |= down != self.power_out
                self.power_out = down
            else:
                changed |= down != self.net_out
                self.net_out = down
        return departed, changed

    # -- owner policy ------------------------------------------------------------------------------

    def _consent(self, i: int, now_u: float) -> Consent:
        f, scn = self.fleet, self.scn
        if not f.opted_in[i]:
            return Consent()
        granted = T0 + scn.start_hour * HOUR_S - 86_400.0
        expires = (T0 + (scn.start_hour + scn.fleet.consent_hours) * HOUR_S
                   if scn.fleet.consent_hours > 0 else None)
        rv = f.revoke_at[i]
        revoked = T0 + float(rv) if not math.isnan(rv) and T0 + rv <= now_u else None
        return Consent(granted_at=granted, expires_at=expires, revoked_at=revoked)

    def _cool(self, now: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            out: np.ndarray = now - self.blocked_at < self.pref["resume_cooldown_s"]
        return out

    def _inputs(self, now: float) -> dict[str, np.ndarray]:
        """Every field of ``policy.DecisionInputs`` for every car, vectorised (the same comparisons
        ``policy.decision_inputs`` makes on one car's floats; ``exact=True`` checks them)."""
        f, scn, g, pref = self.fleet, self.scn, self.group, self.pref
        n = f.n
        now_u = T0 + now
        pct = self.soc * 100.0
        head = physics.headroom_c(f.limit_c, self.temp)
        with np.errstate(invalid="ignore"):  # NaN: never revoked / no departure announced
            revoked = f.opted_in & ((T0 + f.revoke_at) <= now_u)
            rv_over = now_u - (T0 + f.revoke_at) >= pref["revoke_drain_s"]
            dep_soon = (T0 + self.announced) - now_u < pref["departure_margin_s"]
        expired = np.zeros(n, dtype=bool)
        exp_over = np.zeros(n, dtype=bool)
        if scn.fleet.consent_hours > 0:
            exp = T0 + (scn.start_hour + scn.fleet.consent_hours) * HOUR_S
            expired = f.opted_in & (now_u >= exp)
            exp_over = expired & (now_u - exp >= pref["revoke_drain_s"])
        outside = np.array([bool(p.allowed_hours) and not _within(p, now_u) for p in self.prefs])[g]
        return {
            "consented": f.opted_in, "revoked": revoked, "expired": expired,
            "drain_over": np.where(revoked, rv_over, exp_over),
            "vehicle_known": np.ones(n, dtype=bool),  # the simulated daemon is never late
            "parked": self.parked, "below_floor": pct < pref["hard_floor_pct"], "overheated": head < 0,
            "departure_soon": dep_soon, "hot": head < pref["min_headroom_c"],
            "plugged_in": self._plug_now() > 0, "require_plugged_in": self.require_plugged[g],
            "below_min_battery": pct < pref["min_battery_pct"],
            "metered_blocked": f.metered & ~self.allow_metered[g], "outside_hours": outside,
            "cooling_down": self._cool(now),
        }

    def _inputs_key(self, now: float) -> np.ndarray:
        """Each car's ``DecisionInputs`` packed into one int (bit k = field k): the memo key. A car
        whose key did not change since its last decision gets the same action and reason
        (``policy.rule`` reads nothing else). Raises RuntimeError if ``_inputs`` misses a field."""
        cols = self._inputs(now)
        if list(cols) != list(INPUT_FIELDS):
            raise RuntimeError(f"the simulator computes {sorted(cols)}, DecisionInputs has {INPUT_FIELDS}")
        out = np.zeros(self.fleet.n, dtype=np.int64)
        for k, name in enumerate(INPUT_FIELDS):
            out |= cols[name].astype(np.int64) << k
        return out

    def _check_inputs(self, i: int, key: int, got: DecisionInputs) -> None:
        """``exact=True``: car ``i``'s packed inputs must be what the policy itself computes."""
        mine = DecisionInputs(*(bool(key >> k & 1) for k in range(len(INPUT_FIELDS))))
        if mine != got:
            raise RuntimeError(f"car {i}: simulated policy inputs {mine} != decision_inputs {got}")

    def _decide(self, now: float, changed: np.ndarray) -> np.ndarray:
        """Re-evaluate the policy where needed; returns the cars whose action changed."""
        key = self._inputs_key(now)
        stale = (key != self.inputs_key) | changed
        todo = np.arange(self.fleet.n) if self.exact else np.flatnonzero(stale)
        self.inputs_key = key
        now_u = T0 + now
        f = self.fleet
        before = self.action.copy()
        head = physics.headroom_c(f.limit_c, self.temp)
        plug = self._plug_now() > 0
        for i in todo.tolist():
            prev = Decision(ACTIONS[self.action[i]], REASONS[self.reason[i]], T0 + float(self.since[i]),
                            None if math.isnan(self.blocked_at[i]) else T0 + float(self.blocked_at[i]))
            ann = self.announced[i]
            reading = VehicleReading(
                battery_soc=float(self.soc[i]), plugged_in=bool(plug[i]),
                thermal_headroom_c=float(head[i]), parked=bool(self.parked[i]),
                expected_departure=None if math.isnan(ann) else T0 + float(ann), observed_at=now_u,
                link_metered=bool(f.metered[i]))
            prefs, consent = self.prefs[self.group[i]], self._consent(i, now_u)
            if self.exact:
                self._check_inputs(i, int(key[i]), decision_inputs(prefs, consent, reading, now_u, prev))
            d = decide(prefs, consent, reading, now_u, prev)
            self.action[i] = ACTIONS.index(d.action)
            self.reason[i] = _REASON_CODE[d.reason]
            self.since[i] = d.since - T0
            self.blocked_at[i] = np.nan if d.vehicle_blocked_at is None else d.vehicle_blocked_at - T0
        self.calls["decide"] += len(todo)
        # A car still blocked by a vehicle condition gets the same decision with
        # vehicle_blocked_at = now (the policy's hysteresis): no call needed to know that.
        self.blocked_at = np.where(_COOLDOWN_CODES[self.reason], now, self.blocked_at)
        # the cool-down flag depends on blocked_at, which the decisions just moved
        bit = np.int64(1) << _COOL_BIT
        self.inputs_key = (self.inputs_key & ~bit) | (self._cool(now).astype(np.int64) << _COOL_BIT)
        serving = (self.action == SERVE) & self.parked
        self.floor_violations += int(np.sum(serving & (self.soc * 100.0 < self.pref["hard_floor_pct"])))
        return np.flatnonzero(self.action != before)

    # -- hosting -----------------------------------------------------------------------------------

    def _leave(self, i: int) -> None:
        r = self.fleet.region[i]
        self.cov[r, self.h_start[i]:self.h_end[i]] -= 1
        self.cov_dirty[r] = True
        self.hosting[i] = False

    def _join(self, i: int) -> bool:
        f = self.fleet
        r = f.region[i]
        try:
            s, e = choose_range(self.B, self.block_bytes, int(f.budget_bytes[i]), self.cov[r].tolist())
        except LocalProtocolError:
            return False  # not even one block fits
        finally:
            self.calls["choose_range"] += 1
        self.h_start[i], self.h_end[i] = s, e
        self.cov[r, s:e] += 1
        self.cov_dirty[r] = True
        self.hosting[i] = True
        self.h["joins"] += 1
        self.totals["joins"] += 1
        self.h["dht_lookups"] += e - s  # one DHT provide (a lookup) per hosted block
        return True

    def _hosting(self, departed: np.ndarray) -> list[tuple[int, int, int, int, int]]:
        """Join / leave per decision; returns abrupt stops as (car, region, start, end, lost)."""
        can_serve = (self.action == SERVE) & self.parked & ~self.net_out
        lost_list: list[tuple[int, int, int, int, int]] = []
        leaving = np.flatnonzero(self.hosting & ~can_serve)
        conc = self.used / self.scn.step_s
        u = self.rng.random(len(leaving))
        for k, i in enumerate(leaving.tolist()):
            abrupt = departed[i] or self.action[i] == STOP or self.net_out[i] or not self.parked[i]
            sessions = int(conc[i] + u[k])
            r, s, e = int(self.fleet.region[i]), int(self.h_start[i]), int(self.h_end[i])
            self._leave(i)
            if abrupt:
                self.totals["abrupt_stops"] += 1
                if sessions:
                    lost_list.append((i, r, s, e, sessions))
            else:
                self.h["migrations"] += sessions
                self.totals["migrations"] += sessions
        for i in np.flatnonzero(can_serve & ~self.hosting & (self.n_fit > 0)).tolist():
            self._join(i)
        return lost_list

    def _rebalance(self, *, gaps_only: bool = False) -> None:
        """Hosts of regions whose coverage changed ask ``should_move``: ``rebalance_checks``
        distinct (budget, range) groups per region in turn; in a region with a block nobody hosts
        (``gaps_only``, every step) every group asks, as nodes checking every ~20 s would."""
        f = self.fleet
        if gaps_only:
            gap = self.cov_dirty & (self.cov.min(axis=1) == 0)
            regions = np.flatnonzero(gap)
            self.cov_dirty &= ~gap
        else:
            regions = np.flatnonzero(self.cov_dirty)
            self.cov_dirty[:] = False
            self.rebalance_round += 1
        if not len(regions):
            return
        hosts = np.flatnonzero(self.hosting)
        order = np.argsort(f.region[hosts], kind="stable")
        hosts = hosts[order]
        hr = f.region[hosts]
        bounds = np.searchsorted(hr, np.arange(f.regions + 1))
        # (blocks that fit, start, end) of every host as one sortable int
        W = self.B + 1
        codes = (self.n_fit[hosts] * W + self.h_start[hosts]) * W + self.h_end[hosts]
        for r in regions.tolist():
            members = hosts[bounds[r]:bounds[r + 1]]
            if not len(members):
                continue
            mcodes = codes[bounds[r]:bounds[r + 1]]
            keys = np.unique(mcodes).tolist()
            k = len(keys) if gaps_only else self.scn.rebalance_checks
            first = (self.rebalance_round * k) % len(keys)
            for code in (keys + keys)[first:first + min(k, len(keys))]:
                fit, s, e = code // (W * W), code // W % W, code % W
                cars = members[mcodes == code].tolist()
                while cars:
                    wo = self.cov[r].copy()
                    wo[s:e] -= 1
                    mkey = (fit, s, e, wo.tobytes())
                    if mkey in self.move_memo:
                        better = self.move_memo[mkey]
                    else:
                        # Uniform block sizes: the answer depends on the budget only through how
                        # many blocks fit, so the memo is keyed by that.
                        better = should_move(self.B, self.block_bytes, int(f.budget_bytes[cars[0]]),
                                             wo.tolist(), (s, e))
                        self.calls["should_move"] += 1
                        if len(self.move_memo) > 200_000:
                            self.move_memo.clear()
                        self.move_memo[mkey] = better
                    if better is None:
                        break
                    i = cars.pop()
                    self.cov[r, s:e] -= 1
                    self.h_start[i], self.h_end[i] = better
                    self.cov[r, better[0]:better[1]] += 1
                    self.h["moves"] += 1
                    self.totals["moves"] += 1
                    self.h["dht_lookups"] += better[1] - better[0]

    # -- demand and routing ------------------------------------------------------------------------

    def _online_index(self) -> tuple[np.ndarray, np.ndarray]:
        f = self.fleet
        online = self.hosting & (self.action == SERVE)
        hosts = np.flatnonzero(online)
        hosts = hosts[np.argsort(f.region[hosts], kind="stable")]
        bounds = np.searchsorted(f.region[hosts], np.arange(f.regions + 1))
        return hosts, bounds

    def _candidate(self, i: int, now_u: float, region: str) -> Candidate:
        """Car ``i`` as a routing candidate. Candidates are cached per car: routing reads the
        battery only as ``battery_soc < costs.low_battery_soc``, so a cached one whose other fields
        and that predicate are unchanged routes exactly like a new one."""
        f = self.fleet
        ann = self.announced[i]
        soc = min(1.0, max(0.0, float(self.soc[i])))
        used = float(self.used[i])
        plugged = self._plug_kw_i(i) > 0
        key = (int(self.h_start[i]), int(self.h_end[i]), soc < self.costs.low_battery_soc, plugged,
               float(ann), used)
        hit = self.cand_cache.get(i)
        if hit is not None and (hit[0] == key or (math.isnan(ann) and _same_key(hit[0], key))):
            return hit[1]
        cand = Candidate(
            peer_id=f"car{i:08d}", start=key[0], end=key[1], rtt_s=self.scn.routing.rtt_s,
            compute_gflops=float(f.gflops[i]), load=min(1.0, used / self.cap), battery_soc=soc,
            plugged_in=plugged, state="online",
            expected_departure=None if math.isnan(ann) else T0 + float(ann),
            link_metered=bool(f.metered[i]), region=region)
        self.cand_cache[i] = (key, cand)
        return cand

    def _plug_kw_i(self, i: int) -> float:
        return 0.0 if self.power_out[i] or not self.parked[i] else float(self.plug_kw[i])

    def _route_assign(self, r: int, members: np.ndarray, count: int, span: tuple[int, int],
                      tokens: tuple[int, int], now_u: float,
                      banned: frozenset[str] = frozenset()) -> tuple[int, str | None]:
        """Serve up to ``count`` requests of region ``r``'s clients over ``span`` with
        ``find_route`` on the region's online hosts. Returns (served, reason the rest failed)."""
        name = self.region_names[r]
        cands = {f"car{i:08d}": self._candidate(i, now_u, name) for i in members.tolist()}
        done, calls = 0, 0
        prompt, new = tokens
        work_tokens = new + prompt * PREFILL_FRACTION
        while done < count and calls < self.scn.routing.max_calls:
            t = time.perf_counter()
            try:
                route = find_route(cands.values(), span[0], span[1], now=now_u, my_region=name,
                                   banned=banned, costs=self.costs)
            except NoRoute as exc:
                hosted = any(c.start <= exc.block < c.end and c.peer_id not in banned for c in cands.values())
                return done, "overloaded" if hosted else "no_coverage"
            finally:
                self.route_ms.append((time.perf_counter() - t) * 1000.0)
                self.route_cands.append(len(cands))
                self.calls["find_route"] += 1
                calls += 1
            self.route_hops.append(len(route))
            per_token = 0.0
            for hop in route:
                per_token += hop_cost(cands[hop.peer_id], hop.end - hop.start, now=now_u,
                                      costs=self.latency_costs)
            self.calls["hop_cost"] += len(route)
            svc = work_tokens * per_token
            idx = [int(h.peer_id[3:]) for h in route]
            room = min(int((self.cap - self.used[i]) // svc) for i in idx)
            if room <= 0:  # the busiest hop is full: it takes no more sessions this step
                full = min(idx, key=lambda i: self.cap - self.used[i])
                key = f"car{full:08d}"
                cands[key] = replace(cands[key], load=1.0)
                continue
            take = min(room, count - done)
            for hop, i in zip(route, idx, strict=True):
                self.used[i] += take * svc
                self.credits[i] += take * (prompt + new) * (hop.end - hop.start)
                cands[hop.peer_id] = replace(cands[hop.peer_id], load=min(1.0, self.used[i] / self.cap))
            done += take
        if done < count:  # out of route computations this step: the capacity bound for the rest
            extra, reason = self._fluid_one(r, members, count - done, span, work_tokens, tokens)
            return done + extra, reason
        return done, None

    def _svc_s(self, members: np.ndarray, work_tokens: float) -> float:
        """Service time of one request over one region's hosts (see ``_region_svc``)."""
        rr = np.zeros(len(members), dtype=np.int64)
        return float(self._region_svc(rr, members, 1, work_tokens)[0])

    def _region_svc(self, rr: np.ndarray, hosts: np.ndarray, R: int, work_tokens: float) -> np.ndarray:
        """Service time of one request per region: ``work_tokens`` times the per-token time of a
        route through hosts of the region's typical speed — per-block compute averaged over the
        blocks hosted (a route's blocks come mostly from the hosts with many of them), plus a round
        trip per hop for hosts of the mean length. Per-host times come from ``routing.hop_cost``."""
        length = (self.h_end[hosts] - self.h_start[hosts]).astype(float)
        cnt = np.maximum(np.bincount(rr, minlength=R).astype(float), 1.0)
        blocks = np.maximum(np.bincount(rr, weights=length, minlength=R), 1.0)
        per_block = np.bincount(rr, weights=self.per_block_s[hosts] * length, minlength=R) / blocks
        fixed = np.bincount(rr, weights=self.hop_fixed_s[hosts], minlength=R) / cnt
        hops = np.ceil(self.B / np.maximum(blocks / cnt, 1.0))
        out: np.ndarray = work_tokens * (self.B * per_block + hops * fixed)
        return out

    def _fluid_one(self, r: int, members: np.ndarray, count: int, span: tuple[int, int],
                   work_tokens: float, tokens: tuple[int, int]) -> tuple[int, str | None]:
        """The capacity bound for one region: ``n`` requests fit if every block of ``span`` has
        ``n * svc`` free slot-seconds among its hosts; the load is shared in proportion to free room."""
        if count <= 0:
            return 0, None
        if not len(members):
            return 0, "no_coverage"
        s0, e0 = span
        starts = np.maximum(self.h_start[members], s0)
        ends = np.minimum(self.h_end[members], e0)
        ok = starts < ends
        m, starts, ends = members[ok], starts[ok], ends[ok]
        if not len(m):
            return 0, "no_coverage"
        free = np.maximum(0.0, self.cap - self.used[m])
        width = e0 - s0
        diff = np.zeros(width + 1)
        np.add.at(diff, starts - s0, free)
        np.add.at(diff, ends - s0, -free)
        F = np.cumsum(diff)[:width]
        cnt = np.zeros(width + 1)
        np.add.at(cnt, starts - s0, 1)
        np.add.at(cnt, ends - s0, -1)
        if np.any(np.cumsum(cnt)[:width] <= 0):
            return 0, "no_coverage"
        svc = self._svc_s(m, work_tokens) * width / self.B
        n_ok = min(count, int(F.min() // svc)) if svc > 0 else count
        if n_ok > 0:
            inv = np.concatenate([[0.0], np.cumsum(1.0 / np.maximum(F, 1e-12))])
            share = n_ok * free * (inv[ends - s0] - inv[starts - s0])  # requests x blocks served
            self.used[m] += svc * share / (ends - starts)
            self.credits[m] += share * (tokens[0] + tokens[1])
        return n_ok, None if n_ok == count else "overloaded"

    def _fluid_all(self, hosts: np.ndarray, bounds: np.ndarray, want: np.ndarray, work_tokens: float,
                   tokens: tuple[int, int], regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The capacity bound for many regions at once (vectorised ``_fluid_one`` over the full
        model). Returns (served per region, no-coverage mask)."""
        f, B = self.fleet, self.B
        R = f.regions
        served = np.zeros(R, dtype=np.int64)
        sel = np.zeros(R, dtype=bool)
        sel[regions] = True
        sel &= want > 0
        hr = f.region[hosts]
        use = sel[hr]
        h = hosts[use]
        rr = hr[use]
        nocov = sel.copy()
        if not len(h):
            return served, nocov
        free = np.maximum(0.0, self.cap - self.used[h])
        s, e = self.h_start[h], self.h_end[h]
        W = B + 1
        F = np.bincount(rr * W + s, weights=free, minlength=R * W) - np.bincount(rr * W + e, weights=free,
                                                                                 minlength=R * W)
        F = np.cumsum(F.reshape(R, W), axis=1)[:, :B]
        C = np.bincount(rr * W + s, minlength=R * W) - np.bincount(rr * W + e, minlength=R * W)
        C = np.cumsum(C.reshape(R, W), axis=1)[:, :B]
        covered = (C > 0).all(axis=1)
        nocov = sel & ~covered
        svc = self._region_svc(rr, h, R, work_tokens)
        ok = sel & covered & (svc > 0)
        fit = np.where(ok, np.floor(F.min(axis=1) / np.where(ok, svc, 1.0)), 0.0)
        served = np.where(ok, np.minimum(want, fit), 0).astype(np.int64)
        if served.any():
            inv = np.concatenate([np.zeros((R, 1)), np.cumsum(1.0 / np.maximum(F, 1e-12), axis=1)], axis=1)
            share = served[rr] * free * (inv[rr, e] - inv[rr, s])
            self.used[h] += svc[rr] * share / (e - s)
            self.credits[h] += share * (tokens[0] + tokens[1])
        return served, nocov

    def _demand(self, now: float, lost: list[tuple[int, int, int, int, int]]) -> None:
        f, scn, d = self.fleet, self.scn, self.scn.demand
        R = f.regions
        now_u = T0 + now
        dt = scn.step_s
        self.used[:] = 0.0
        hosts, bounds = self._online_index()
        tokens = (d.prompt_tokens, d.new_tokens)
        work = d.new_tokens + d.prompt_tokens * PREFILL_FRACTION
        # 1. failovers of sessions lost to abrupt stops: the remaining half of their work, on the span
        for i, r, s, e, sessions in lost:
            members = hosts[bounds[r]:bounds[r + 1]]
            if self.routed[r]:
                half = (d.prompt_tokens // 2, d.new_tokens // 2)
                ok, _ = self._route_assign(r, members, sessions, (s, e), half,
                                           now_u, banned=frozenset({f"car{i:08d}"}))
            else:
                ok, _ = self._fluid_one(r, members, sessions, (s, e), work / 2, tokens)
            self.h["failovers"] += sessions
            self.totals["failovers"] += sessions
            failed = sessions - ok
            self.h["failed"]["failover_failed"] += failed
            self.failed["failover_failed"] += failed
            self.h["served"] -= failed  # they had been counted as served when they started
            self.totals["served"] -= failed
        # 2. interactive arrivals
        hour = int(((now - dt / 2) % 86_400.0) // HOUR_S)
        lam = d.per_device_hour * d.curve[hour] * self.pop * dt / HOUR_S
        arrivals = self.rng.poisson(lam)
        total = int(arrivals.sum())
        self.h["arrived"] += total
        self.totals["arrived"] += total
        left = arrivals.copy()
        reason = np.full(R, -1, dtype=np.int8)  # index into FAIL_REASONS of the last failure
        for r in np.flatnonzero(self.routed & (arrivals > 0)).tolist():
            members = hosts[bounds[r]:bounds[r + 1]]
            if not len(members):
                reason[r] = 0
                continue
            ok, why = self._route_assign(r, members, int(arrivals[r]), (0, self.B), tokens, now_u)
            left[r] -= ok
            if why is not None:
                reason[r] = FAIL_REASONS.index(why)
        fluid_regions = np.flatnonzero(~self.routed)
        served, nocov = self._fluid_all(hosts, bounds, left, work, tokens, fluid_regions)
        left -= served
        reason = np.where(~self.routed & (left > 0), np.where(nocov, 0, 1), reason)
        served_home = int((arrivals - left).sum())
        for key, mask in (("routed", self.routed), ("bound", ~self.routed)):
            self.by_method[key][0] += int(arrivals[mask].sum())
            self.by_method[key][1] += int((arrivals - left)[mask].sum())
        # 3. what is left tries the sibling region (the clients' routing penalty for another region)
        remote = 0
        sib = self.sibling
        want = np.zeros(R, dtype=np.int64)
        has_sib = (left > 0) & (sib >= 0)
        np.add.at(want, sib[has_sib], left[has_sib])
        if want.any():
            got, _ = self._fluid_all(hosts, bounds, want, work, tokens, np.flatnonzero(want > 0))
            # hand back per origin region in order
            for r in np.flatnonzero(has_sib).tolist():
                t = sib[r]
                take = int(min(left[r], got[t]))
                got[t] -= take
                left[r] -= take
                remote += take
        for r in np.flatnonzero(left > 0).tolist():
            why = FAIL_REASONS[max(0, int(reason[r]))]
            self.h["failed"][why] += int(left[r])
            self.failed[why] += int(left[r])
        ok_total = served_home + remote
        self.h["served"] += ok_total
        self.h["served_remote"] += remote
        self.totals["served"] += ok_total
        self.totals["served_remote"] += remote
        self.h["tokens"] += ok_total * (d.prompt_tokens + d.new_tokens)
        self.totals["tokens"] += ok_total * (d.prompt_tokens + d.new_tokens)
        # 4. the overnight batch queue takes what capacity is left
        if d.batch_per_device > 0:
            bh = d.batch_hour * HOUR_S
            prev = now - dt
            if math.floor((prev - bh) / 86_400.0) != math.floor((now - bh) / 86_400.0):
                add = np.round(d.batch_per_device * self.pop).astype(np.int64)
                self.queue += add
                self.totals["batch_arrived"] += int(add.sum())
            if self.queue.any():
                btok = (d.prompt_tokens, d.batch_new_tokens)
                bwork = d.batch_new_tokens + d.prompt_tokens * PREFILL_FRACTION
                got, _ = self._fluid_all(hosts, bounds, self.queue, bwork, btok, np.flatnonzero(self.queue))
                self.queue -= got
                self.h["batch_served"] += int(got.sum())
                self.totals["batch_served"] += int(got.sum())
                self.h["tokens"] += int(got.sum()) * sum(btok)
                self.totals["tokens"] += int(got.sum()) * sum(btok)
        self.util = np.minimum(1.0, self.used / self.cap)
        self.served_s += self.used

    # -- gossip ------------------------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        f, scn = self.fleet, self.scn
        pol = scn.publish
        dt = scn.step_s
        now_u = T0 + now
        running = f.opted_in & self.parked & ~self.net_out
        started = running & ~self.running
        stopped = self.running & ~running
        self.h["dht_lookups"] += int(started.sum())  # a node joining the DHT looks itself up
        self.running = running
        state = self.action.copy()  # SERVE/DRAIN/STOP -> online/draining/offline
        blk = np.where(self.hosting, self.h_start * 10_000 + self.h_end, -1)
        load = self.util
        head = physics.headroom_c(f.limit_c, self.temp)
        plug = self._plug_now() > 0
        consent = f.opted_in & ~(T0 + np.nan_to_num(f.revoke_at, nan=np.inf) <= now_u)
        cur: tuple[np.ndarray, ...] = (state, plug, blk, self.announced, self.parked_since, consent,
                                       self.soc, head, load)
        old: tuple[np.ndarray, ...] = (self.pub_state, self.pub_plug, self.pub_blk, self.pub_ann,
                                       self.pub_since, self.pub_consent, self.pub_soc, self.pub_head,
                                       self.pub_load)
        if self.exact:
            check = running
        else:  # a superset of the cars whose record changed significantly (the policy decides)
            discrete = ((state != self.pub_state) | (plug != self.pub_plug) | (blk != self.pub_blk)
                        | ~_same(self.announced, self.pub_ann) | ~_same(self.parked_since, self.pub_since)
                        | (consent != self.pub_consent))
            continuous = ((np.abs(self.soc - self.pub_soc) >= pol.battery_delta)
                          | (np.abs(head - self.pub_head) >= pol.thermal_delta_c)
                          | (np.abs(load - self.pub_load) >= pol.load_delta))
            check = running & (~self.pub_valid | discrete | continuous)
        published = np.zeros(f.n, dtype=bool)
        names = self.region_names
        for i in np.flatnonzero(check).tolist():
            cand = self._view(i, now_u, cur, names)
            last = self._view(i, T0 + float(self.pub_t[i]), old, names) if self.pub_valid[i] else None
            why = should_publish(cast(CapacityRecord, last), cast(CapacityRecord, cand), now_u, pol)
            if why is not None and why != "refresh":
                published[i] = True
                self.publish_reasons[why] = self.publish_reasons.get(why, 0) + 1
        self.calls["should_publish"] += int(check.sum())
        # Unchanged records refresh every refresh_s between samples (the node samples every second);
        # a refresh sends the current state.
        idle = running & ~published & self.pub_valid
        n_ref = np.maximum(np.where(idle, np.floor((now - self.pub_t) / pol.refresh_s), 0.0), 0.0)
        refreshed = n_ref > 0
        self.pub_t = np.where(refreshed, self.pub_t + n_ref * pol.refresh_s, self.pub_t)
        self.publish_reasons["refresh"] = self.publish_reasons.get("refresh", 0) + int(n_ref.sum())
        self.publish_reasons["goodbye"] = self.publish_reasons.get("goodbye", 0) + int(stopped.sum())
        pubs = n_ref + published + stopped  # a node that leaves says goodbye (offline record)
        p = published | refreshed
        for dst, src in zip(old, cur, strict=True):
            dst[p] = src[p]
        self.pub_valid |= published
        self.pub_t[published] = now
        self.pub_valid[stopped] = False
        # bytes: real signed record size + pubsub framing; each subscriber gets up to D copies
        size = self.size_table[state * 4 + (blk >= 0) * 2 + ~np.isnan(self.announced)]
        msg_bytes = pubs * (size + scn.pubsub_overhead_bytes)
        R = f.regions
        region_bytes = np.bincount(f.region, weights=msg_bytes, minlength=R)
        region_msgs = np.bincount(f.region, weights=pubs, minlength=R)
        subs = np.bincount(f.region, weights=running.astype(float), minlength=R)
        copies = np.minimum(scn.gossip_degree, np.maximum(subs - 1, 0))
        self.hour_bytes += np.where(running, (region_bytes * copies)[f.region], 0.0)
        self.hour_msgs += np.where(running, region_msgs[f.region], 0.0)
        self.hour_run_s += np.where(running, dt, 0.0)
        self.h["publishes"] += int(pubs.sum())

    def _view(self, i: int, issued_u: float, v: tuple[np.ndarray, ...], names: list[str]) -> _RecordView:
        """Car ``i``'s record fields from the arrays ``v`` (current or last published)."""
        state, plug, blk, ann, since, consent, soc, head, load = (a[i] for a in v)
        return _RecordView(
            STATES[state], bool(plug), bool(consent), None, "wifi", bool(self.fleet.metered[i]),
            "sim", _blk(int(blk)), ("/ip4/203.0.113.7/tcp/4001",), names[self.fleet.region[i]],
            None if math.isnan(ann) else T0 + float(ann), None if math.isnan(since) else T0 + float(since),
            float(soc), float(head), float(load), 12_000, issued_u)

    # -- reporting ---------------------------------------------------------------------------------

    def _snapshot(self, now: float) -> None:
        f = self.fleet
        hosts, _ = self._online_index()
        R, B = f.regions, self.B
        W = B + 1
        rr = f.region[hosts]
        C = np.bincount(rr * W + self.h_start[hosts], minlength=R * W) - np.bincount(
            rr * W + self.h_end[hosts], minlength=R * W)
        C = np.cumsum(C.reshape(R, W), axis=1)[:, :B]
        populated = self.pop > 0
        cells = C[populated].ravel()
        # Capacity: interactive requests per hour the online hosts could carry (the capacity bound
        # with every host idle), in each region on its own.
        d = self.scn.demand
        svc = self._region_svc(rr, hosts, R, d.new_tokens + d.prompt_tokens * PREFILL_FRACTION)
        capacity = float(np.sum(np.where(C.min(axis=1) > 0, C.min(axis=1) * d.slots * HOUR_S
                                         / np.maximum(svc, 1e-9), 0.0)))
        consenting = f.opted_in & self.parked & (self.reason != _REASON_CODE["consent_revoked"])
        run_s = self.hour_run_s
        has = run_s > 0
        rate = self.hour_bytes[has] / run_s[has]
        msg_rate = self.hour_msgs[has] / run_s[has]
        running_n = max(1, int(has.sum()))
        h = self.h
        served, failed = h["served"], sum(h["failed"].values())
        self.hours.append({
            "hour": _r(now / HOUR_S, 6),
            "time_of_day": f"{int((now / HOUR_S) % 24):02d}:{round(now % HOUR_S / 60) % 60:02d}",
            "parked": int(self.parked.sum()),
            "consenting": int(consenting.sum()),
            "serving": len(hosts),
            "draining": int((self.hosting & (self.action == DRAIN)).sum()),
            "coverage_min": int(cells.min()) if cells.size else 0,
            "coverage_p1": _r(_pct(cells, 1)),
            "coverage_median": _r(_pct(cells, 50)),
            "regions_uncovered": int(((C == 0).any(axis=1) & populated).sum()),
            "requests": h["arrived"],
            "capacity_per_hour": _r(capacity),
            "served": served,
            "served_remote": h["served_remote"],
            "failed": dict(h["failed"]),
            "served_pct": _r(100.0 * served / max(1, served + failed), 6),
            "batch_served": h["batch_served"],
            "batch_pending": int(self.queue.sum()),
            "tokens": h["tokens"],
            "failovers": h["failovers"],
            "migrations": h["migrations"],
            "joins": h["joins"],
            "moves": h["moves"],
            "gossip_bytes_per_s_per_car": {"mean": _r(float(rate.mean()) if rate.size else 0.0),
                                           "p99": _r(_pct(rate, 99))},
            "gossip_msgs_per_s_per_car": _r(float(msg_rate.mean()) if msg_rate.size else 0.0),
            "publishes": h["publishes"],
            "dht_lookups_per_car": _r(h["dht_lookups"] / running_n),
            "compute_kwh": _r(h["compute_kwh"]),
        })
        self._hour_reset()

    # -- main loop ---------------------------------------------------------------------------------

    def step(self) -> None:
        scn = self.scn
        dt = scn.step_s
        t0, t1 = self.t, self.t + dt
        clock = time.perf_counter
        mark = clock()
        phase = self.phase_s

        def done(name: str) -> None:
            nonlocal mark
            now = clock()
            phase[name] = phase.get(name, 0.0) + now - mark
            mark = now

        self._physics(dt)
        departed, changed = self._events(t0, t1)
        self.t = t1
        done("physics")
        self._decide(t1, changed)
        done("policy")
        lost = self._hosting(departed)
        if scn.rebalance_s > 0:
            if t1 >= self.next_rebalance:
                self._rebalance()
                self.next_rebalance += scn.rebalance_s
            else:
                self._rebalance(gaps_only=True)
        done("placement")
        self._demand(t1, lost)
        done("demand")
        self._gossip(t1)
        done("gossip")

    def run(self) -> SimResult:
        scn = self.scn
        wall = time.perf_counter()
        steps = max(1, round(scn.hours * HOUR_S / scn.step_s))
        per_hour = max(1, round(HOUR_S / scn.step_s))
        for k in range(1, steps + 1):
            self.step()
            if k % per_hour == 0 or k == steps:
                self._snapshot(self.t)
                if self.progress is not None:
                    h = self.hours[-1]
                    g = h["gossip_bytes_per_s_per_car"]
                    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    self.progress(
                        f"{h['time_of_day']} parked {h['parked']} consenting {h['consenting']} serving "
                        f"{h['serving']} cov {h['coverage_min']}/{h['coverage_p1']:g}/"
                        f"{h['coverage_median']:g} "
                        f"requests {h['requests']} served {h['served_pct']:.3f}% capacity/h "
                        f"{h['capacity_per_hour']:.0f} tokens {h['tokens']} gossip B/s/car {g['mean']:.0f}/"
                        f"{g['p99']:.0f} dht/car {h['dht_lookups_per_car']:.3f} "
                        f"[wall {time.perf_counter() - wall:.0f}s, rss {rss:.0f} MB]")
        return SimResult(self._report(), self._timing(time.perf_counter() - wall))

    def _report(self) -> dict[str, Any]:
        f, scn = self.fleet, self.scn
        served = self.totals["served"]
        failed = sum(self.failed.values())
        arrived = self.totals["arrived"]
        ever = self.compute_kwh > 0  # hosted blocks at some point (idle draw included)
        kwh = self.compute_kwh[ever]
        cred = self.credits[ever]
        prof = np.bincount(f.profile, minlength=len(PROFILES))
        kinds = np.bincount(f.kind, minlength=len(KINDS))
        return {
            "scenario": scn.name,
            "description": scn.description,
            "cars": f.n,
            "hours": scn.hours,
            "seed": scn.seed,
            "start_hour": scn.start_hour,
            "step_s": scn.step_s,
            "regions": f.regions,
            "region_devices": {"mean": _r(float(self.pop.mean())), "max": int(self.pop.max())},
            "profiles": {p: int(c) for p, c in zip(PROFILES, prof, strict=True)},
            "kinds": {k: int(c) for k, c in zip(KINDS, kinds, strict=True)},
            "opted_in": int(f.opted_in.sum()),
            "model": {"blocks": self.B, "block_mb": scn.model.block_mb},
            "routing": {
                "routed_regions": int(self.routed.sum()),
                "capacity_bound_regions": int((~self.routed).sum()),
                "route_calls": self.calls["find_route"],
                # requests and the share served in their own region, by how they were placed
                **{f"{k}_requests": v[0] for k, v in self.by_method.items()},
                **{f"{k}_served_pct": _r(100.0 * v[1] / max(1, v[0]), 6) for k, v in self.by_method.items()},
                "hops": {"p50": _r(_pct(self.route_hops, 50)), "max": max(self.route_hops, default=0)},
                "candidates": {"p50": _r(_pct(self.route_cands, 50)),
                               "max": max(self.route_cands, default=0)},
            },
            "publishes_by_reason": dict(sorted(self.publish_reasons.items())),
            "record_bytes": {f"{STATES[s]}{'+blocks' if b else ''}{'+departure' if d else ''}": v
                             for (s, b, d), v in sorted(self.record_bytes.items())},
            "hourly": self.hours,
            "totals": {
                "requests": arrived,
                "served": served,
                "served_remote": self.totals["served_remote"],
                "failed": dict(self.failed),
                "served_pct": _r(100.0 * served / max(1, arrived), 6),
                "conserved": arrived == served + failed,
                "batch": {"queued": self.totals["batch_arrived"], "served": self.totals["batch_served"],
                          "pending": int(self.queue.sum())},
                "tokens": self.totals["tokens"],
                "failovers": self.totals["failovers"],
                "failovers_per_request": _r(self.totals["failovers"] / max(1, served)),
                "migrations": self.totals["migrations"],
                "abrupt_stops": self.totals["abrupt_stops"],
                "joins": self.totals["joins"],
                "moves": self.totals["moves"],
                "battery_floor_violations": self.floor_violations + self.floor_compute_violations,
                "energy_used_kwh": _r(float(self.compute_kwh.sum()), 6),
                "energy_from_battery_kwh": _r(self.battery_compute_kwh, 6),
                "charger_capacity_while_serving_kwh": _r(self.charger_kwh, 6),
                "energy_over_available_steps": self.energy_over,
                "min_soc_pct": _r(float(self.soc.min()) * 100),
            },
            "per_serving_car": {
                "cars": int(ever.sum()),
                "energy_kwh": _dist(kwh),
                "credits_block_tokens": _dist(cred),
            },
            "node_functions_called": dict(self.calls),
            "dht": {"lookup_messages": KAD_ALPHA * max(1, math.ceil(math.log2(max(2, f.n))
                                                                / KAD_BITS_PER_HOP)),
                    "model": "alpha x ceil(log2(N) / 3) messages per lookup (estimate)"},
        }

    def _timing(self, wall: float) -> dict[str, Any]:
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "wall_s": round(wall, 2),
            "build_s": round(self.t_build, 2),
            "phase_s": {k: round(v, 2) for k, v in self.phase_s.items()},
            "peak_rss_mb": round(rss_kb / 1024, 1),
            "route_ms": {"p50": round(_pct(self.route_ms, 50), 4), "p99": round(_pct(self.route_ms, 99), 4),
                         "max": round(max(self.route_ms, default=0.0), 4), "calls": len(self.route_ms)},
        }


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal candidate cache keys where the departure (index 4) may be NaN on both sides."""
    return a[:4] == b[:4] and a[5:] == b[5:] and math.isnan(a[4]) and math.isnan(b[4])


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = (a == b) | (np.isnan(a) & np.isnan(b))
    return out


def _blk(code: int) -> tuple[int, int] | None:
    return None if code < 0 else (code // 10_000, code % 10_000)


def _dist(values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0}
    return {"mean": _r(float(values.mean())), "p10": _r(_pct(values, 10)), "p50": _r(_pct(values, 50)),
            "p90": _r(_pct(values, 90))}


def _within(prefs: Preferences, now_u: float) -> bool:
    """Whether ``now_u`` is inside the owner's allowed hours (a flag input only; ``decide`` rules)."""
    minute = int(((now_u + prefs.utc_offset_s) % 86_400.0) // 60)
    for start, end in prefs.allowed_hours:
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False


def run_simulation(scn: Scenario, *, exact: bool = False,
                   progress: Callable[[str], None] | None = None) -> SimResult:
    """Run ``scn`` to the end. Deterministic ``report`` for a given scenario (and ``exact``)."""
    return Simulation(scn, exact=exact, progress=progress).run()
