"""The simulator's hourly snapshots, its deterministic report and its wall-clock timings."""

from __future__ import annotations

import math
import resource
from typing import TYPE_CHECKING, Any

import numpy as np

from idlefleet.node.sim.demand import PREFILL_FRACTION, online_index, region_svc
from idlefleet.node.sim.fleet import HOUR_S, KINDS
from idlefleet.node.sim.gossip import STATES
from idlefleet.node.sim.owner import DRAIN, REASON_CODE
from idlefleet.node.sim.scenario import PROFILES

if TYPE_CHECKING:
    from idlefleet.node.sim.engine import Simulation

KAD_ALPHA, KAD_BITS_PER_HOP = 3, 3  # DHT estimate: alpha parallel queries, ~3 bits closer per hop


def _pct(values: np.ndarray | list[float] | list[int], q: float) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else 0.0


def _r(x: float, digits: int = 4) -> float:
    """Round for the report (stable JSON across platforms' last-bit differences)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else 0.0


def _dist(values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0}
    return {"mean": _r(float(values.mean())), "p10": _r(_pct(values, 10)), "p50": _r(_pct(values, 50)),
            "p90": _r(_pct(values, 90))}


def snapshot(sim: Simulation, now: float) -> None:
    f = sim.fleet
    hosts, _ = online_index(sim)
    R, B = f.regions, sim.B
    W = B + 1
    rr = f.region[hosts]
    C = np.bincount(rr * W + sim.h_start[hosts], minlength=R * W) - np.bincount(
        rr * W + sim.h_end[hosts], minlength=R * W)
    C = np.cumsum(C.reshape(R, W), axis=1)[:, :B]
    populated = sim.pop > 0
    cells = C[populated].ravel()
    # Capacity: interactive requests per hour the online hosts could carry (the capacity bound
    # with every host idle), in each region on its own.
    d = sim.scn.demand
    svc = region_svc(sim, rr, hosts, R, d.new_tokens + d.prompt_tokens * PREFILL_FRACTION)
    capacity = float(np.sum(np.where(C.min(axis=1) > 0, C.min(axis=1) * d.slots * HOUR_S
                                     / np.maximum(svc, 1e-9), 0.0)))
    consenting = f.opted_in & sim.parked & (sim.reason != REASON_CODE["consent_revoked"])
    run_s = sim.hour_run_s
    has = run_s > 0
    rate = sim.hour_bytes[has] / run_s[has]
    msg_rate = sim.hour_msgs[has] / run_s[has]
    running_n = max(1, int(has.sum()))
    h = sim.h
    served, failed = h["served"], sum(h["failed"].values())
    sim.hours.append({
        "hour": _r(now / HOUR_S, 6),
        "time_of_day": f"{int((now / HOUR_S) % 24):02d}:{round(now % HOUR_S / 60) % 60:02d}",
        "parked": int(sim.parked.sum()),
        "consenting": int(consenting.sum()),
        "serving": len(hosts),
        "draining": int((sim.hosting & (sim.action == DRAIN)).sum()),
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
        "batch_pending": int(sim.queue.sum()),
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
    sim.hour_reset()


def report(sim: Simulation) -> dict[str, Any]:
    f, scn = sim.fleet, sim.scn
    served = sim.totals["served"]
    failed = sum(sim.failed.values())
    arrived = sim.totals["arrived"]
    ever = sim.compute_kwh > 0  # hosted blocks at some point (idle draw included)
    kwh = sim.compute_kwh[ever]
    cred = sim.credits[ever]
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
        "region_devices": {"mean": _r(float(sim.pop.mean())), "max": int(sim.pop.max())},
        "profiles": {p: int(c) for p, c in zip(PROFILES, prof, strict=True)},
        "kinds": {k: int(c) for k, c in zip(KINDS, kinds, strict=True)},
        "opted_in": int(f.opted_in.sum()),
        "model": {"blocks": sim.B, "block_mb": scn.model.block_mb},
        "routing": {
            "routed_regions": int(sim.routed.sum()),
            "capacity_bound_regions": int((~sim.routed).sum()),
            "route_calls": sim.calls["find_route"],
            # requests and the share served in their own region, by how they were placed
            **{f"{k}_requests": v[0] for k, v in sim.by_method.items()},
            **{f"{k}_served_pct": _r(100.0 * v[1] / max(1, v[0]), 6) for k, v in sim.by_method.items()},
            "hops": {"p50": _r(_pct(sim.route_hops, 50)), "max": max(sim.route_hops, default=0)},
            "candidates": {"p50": _r(_pct(sim.route_cands, 50)),
                           "max": max(sim.route_cands, default=0)},
        },
        "publishes_by_reason": dict(sorted(sim.publish_reasons.items())),
        "record_bytes": {f"{STATES[s]}{'+blocks' if b else ''}{'+departure' if d else ''}": v
                         for (s, b, d), v in sorted(sim.record_bytes.items())},
        "hourly": sim.hours,
        "totals": {
            "requests": arrived,
            "served": served,
            "served_remote": sim.totals["served_remote"],
            "failed": dict(sim.failed),
            "served_pct": _r(100.0 * served / max(1, arrived), 6),
            "conserved": arrived == served + failed,
            "batch": {"queued": sim.totals["batch_arrived"], "served": sim.totals["batch_served"],
                      "pending": int(sim.queue.sum())},
            "tokens": sim.totals["tokens"],
            "failovers": sim.totals["failovers"],
            "failovers_per_request": _r(sim.totals["failovers"] / max(1, served)),
            "migrations": sim.totals["migrations"],
            "abrupt_stops": sim.totals["abrupt_stops"],
            "joins": sim.totals["joins"],
            "moves": sim.totals["moves"],
            "battery_floor_violations": sim.floor_violations + sim.floor_compute_violations,
            "energy_used_kwh": _r(float(sim.compute_kwh.sum()), 6),
            "energy_from_battery_kwh": _r(sim.battery_compute_kwh, 6),
            "charger_capacity_while_serving_kwh": _r(sim.charger_kwh, 6),
            "energy_over_available_steps": sim.energy_over,
            "min_soc_pct": _r(float(sim.soc.min()) * 100),
        },
        "per_serving_car": {
            "cars": int(ever.sum()),
            "energy_kwh": _dist(kwh),
            "credits_block_tokens": _dist(cred),
        },
        "node_functions_called": dict(sim.calls),
        "dht": {"lookup_messages": KAD_ALPHA * max(1, math.ceil(math.log2(max(2, f.n))
                                                            / KAD_BITS_PER_HOP)),
                "model": "alpha x ceil(log2(N) / 3) messages per lookup (estimate)"},
    }


def timing(sim: Simulation, wall: float) -> dict[str, Any]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "wall_s": round(wall, 2),
        "build_s": round(sim.t_build, 2),
        "phase_s": {k: round(v, 2) for k, v in sim.phase_s.items()},
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "route_ms": {"p50": round(_pct(sim.route_ms, 50), 4), "p99": round(_pct(sim.route_ms, 99), 4),
                     "max": round(max(sim.route_ms, default=0.0), 4), "calls": len(sim.route_ms)},
    }
