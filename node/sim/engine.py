"""The fleet simulator: fixed time steps over numpy arrays, with the node's own decisions.

Each step of ``step_s`` seconds:

1. **Physics** (vectorised, ``node/vehicle/physics.py``): battery (driving, charging with its taper,
   standby, compute) and temperature relax towards a target (ambient, sun, charging, driving,
   serving heat). A car serving on battery stops drawing compute at its hard floor, as the node
   would within a second.
2. **Trips**: departures and arrivals in the step (``fleet.Schedule``); scenario outages.
3. **Owner policy** (``owner``): ``protocols.policy.decide`` — the node's function — for every car
   whose ``policy.DecisionInputs`` changed, computed field by field in numpy; a car with the same
   inputs gets the same action and reason (``exact=True`` calls ``decide`` for every car every step
   and checks the fields; the tests check both give the same result).
4. **Hosting** (``hosting``): a car that starts serving claims ``protocols.placement.choose_range``
   of its region's coverage; a car that stops abruptly (drove off, battery floor, overheated) loses
   its in-flight sessions, which fail over; a draining car's sessions migrate. Every
   ``rebalance_s``, ``rebalance_checks`` hosts (distinct budget and range) of each region whose
   coverage changed ask ``placement.should_move``; in a region with a block nobody hosts, every host
   asks at every step. Answers are memoised (a pure function of the coverage without the host, its
   range and how many blocks fit).
5. **Demand** (``demand``): Poisson arrivals per region from the daily curve, an overnight batch
   queue. In a routed region every request goes through ``protocols.routing.find_route`` over that
   region's online hosts (their load included; a found route takes as many requests as its busiest
   hop has room for, then the search repeats); service time from ``routing.hop_cost``. Other regions
   (``RoutingSpec.sample_regions``) use the per-block capacity bound: ``n`` requests fit if every
   block's free slot-seconds cover them. Unserved requests try the sibling region, then fail with a
   reason.
6. **Gossip** (``gossip``): ``protocols.publish.should_publish`` for every running node whose record
   changed; unchanged records refresh every ``refresh_s``. Bytes from the real signed record size
   (``records.encode_signed``) and the GossipSub mesh degree of the regional topic.

Snapshots and the report: ``summary``. Nothing here imports trio or libp2p; it is deterministic for
a given scenario (wall-clock timings are reported apart, under ``timing``)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from idlefleet.node.sim import demand, gossip, hosting, owner, summary
from idlefleet.node.sim.demand import FAIL_REASONS
from idlefleet.node.sim.fleet import HOUR_S, MB, T0, build_fleet, region_name
from idlefleet.node.sim.gossip import STATES, record_sizes
from idlefleet.node.sim.owner import DRAIN, REASON_CODE, SERVE, STOP
from idlefleet.node.sim.scenario import Scenario
from idlefleet.node.vehicle import physics
from idlefleet.protocols.routing import Candidate, hop_cost

__all__ = ["FAIL_REASONS", "SimResult", "Simulation", "run_simulation"]

@dataclass
class SimResult:
    """``report`` is JSON-ready and deterministic; ``timing`` holds wall-clock measurements."""

    report: dict[str, Any]
    timing: dict[str, Any]








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
        self.reason = np.full(n, REASON_CODE["no_consent"], dtype=np.int8)
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
        self.hour_reset()
        self.totals: dict[str, int] = {"arrived": 0, "served": 0, "served_remote": 0, "batch_arrived": 0,
                                       "batch_served": 0, "failovers": 0, "migrations": 0, "moves": 0,
                                       "joins": 0, "abrupt_stops": 0, "tokens": 0}
        self.failed = dict.fromkeys(FAIL_REASONS, 0)
        self.by_method = {"routed": [0, 0], "bound": [0, 0]}  # [requests, served in their region]
        self.batch_failed = dict.fromkeys(FAIL_REASONS, 0)

    def hour_reset(self) -> None:
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
        plug = self.plug_now()
        # Cars sit outside (sun on the roof, charging heat); phones and laptops indoors.
        out: np.ndarray = physics.target_temp_c(
            t, ambient_c=f.ambient_c, diurnal_c=np.where(is_car, 6.0, 1.0),
            idle_rise_c=np.where(is_car, 2.0, 3.0), driving=~self.parked,
            drive_rise_c=np.where(is_car, 25.0, 9.0), unplugged=plug <= 0,
            solar_c=np.where(is_car, 12.0, 0.0), charge=self._charge_kw(plug),
            charge_rise_c=np.where(is_car, 20.0, 0.0), charge_ref_kw=50.0,
            serve_rise_c=f.serve_rise_c, util=util)
        return out

    def plug_now(self) -> np.ndarray:
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
        plug = self.plug_now()
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







    # -- hosting -----------------------------------------------------------------------------------





    # -- demand and routing ------------------------------------------------------------------------










    # -- gossip ------------------------------------------------------------------------------------



    # -- reporting ---------------------------------------------------------------------------------


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
        owner.decide_all(self, t1, changed)
        done("policy")
        lost = hosting.hosting(self, departed)
        if scn.rebalance_s > 0:
            if t1 >= self.next_rebalance:
                hosting.rebalance(self)
                self.next_rebalance += scn.rebalance_s
            else:
                hosting.rebalance(self, gaps_only=True)
        done("placement")
        demand.demand(self, t1, lost)
        done("demand")
        gossip.gossip(self, t1)
        done("gossip")

    def run(self) -> SimResult:
        scn = self.scn
        wall = time.perf_counter()
        steps = max(1, round(scn.hours * HOUR_S / scn.step_s))
        per_hour = max(1, round(HOUR_S / scn.step_s))
        for k in range(1, steps + 1):
            self.step()
            if k % per_hour == 0 or k == steps:
                summary.snapshot(self, self.t)
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
        return SimResult(summary.report(self), summary.timing(self, time.perf_counter() - wall))














def run_simulation(scn: Scenario, *, exact: bool = False,
                   progress: Callable[[str], None] | None = None) -> SimResult:
    """Run ``scn`` to the end. Deterministic ``report`` for a given scenario (and ``exact``)."""
    return Simulation(scn, exact=exact, progress=progress).run()
