"""Morning-rush sweep: what keeps >= 99.9% of requests served while 40% of the cars leave.

Runs the ``morning-rush`` scenario (examples/sim) with one setting changed at a time — devices per
region, the owners' departure margin, how many departures are announced, memory per car (blocks
per host, so replication), demand — and prints one row per run: requests served overall and from the rush
on, the hosts per block per region after the rush (min / p1 / median over region x block), and the
failovers. Deterministic per seed; wall time depends on the machine and is printed apart.

    python -m bench.sim_rush                  # the sweep in docs/SCALE.md (~15 runs of 3,000 devices)
    python -m bench.sim_rush --cars 1000 --only region_cars
    python -m bench.sim_rush --json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

from idlefleet.node.sim import Scenario, load_scenario, run_simulation

SWEEPS: dict[str, list[tuple[str, Any]]] = {
    "region_cars": [("region_cars", v) for v in (50, 100, 150, 250)],
    "departure_margin_s": [("departure_margin_s", v) for v in (0.0, 900.0, 1800.0, 3600.0)],
    "announce_departure": [("announce_departure", v) for v in (0.5, 0.8, 1.0)],
    "car_memory_mb": [("car_memory_mb", v) for v in ((4_000.0, 8_000.0), (8_000.0, 16_000.0),
                                                      (16_000.0, 32_000.0))],
    "per_device_hour": [("per_device_hour", v) for v in (1.0, 10.0, 30.0)],
}
BASE_REGION_CARS = 100  # the other sweeps hold the region size here


def configure(scn: Scenario, key: str, value: Any) -> Scenario:
    if key in ("region_cars", "announce_departure"):
        return replace(scn, fleet=replace(scn.fleet, **{key: value}))
    if key == "departure_margin_s":
        return replace(scn, policy=replace(scn.policy, departure_margin_s=value))
    if key == "car_memory_mb":
        return replace(scn, model=replace(scn.model, car_memory_mb=value))
    if key == "per_device_hour":
        return replace(scn, demand=replace(scn.demand, per_device_hour=value))
    raise ValueError(key)


def summarise(report: dict[str, Any], rush_h: float) -> dict[str, Any]:
    after = [h for h in report["hourly"] if h["hour"] - report["start_hour"] > rush_h]
    served = sum(h["served"] for h in after)
    failed = sum(sum(h["failed"].values()) for h in after)
    tot = report["totals"]
    return {
        "served_pct": tot["served_pct"],
        "served_pct_from_rush": round(100.0 * served / max(1, served + failed), 3),
        "cov_after_rush": min((h["coverage_min"], h["coverage_p1"], h["coverage_median"]) for h in after),
        "failovers_per_request": tot["failovers_per_request"],
        "failover_failed": tot["failed"]["failover_failed"],
        "no_coverage": tot["failed"]["no_coverage"],
        "overloaded": tot["failed"]["overloaded"],
        "abrupt_stops": tot["abrupt_stops"],
        "migrations": tot["migrations"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cars", type=int, default=3_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--route-sample", type=int, default=4, help="regions routed through find_route")
    ap.add_argument("--only", choices=sorted(SWEEPS), action="append")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = load_scenario("morning-rush").with_overrides(cars=args.cars, seed=args.seed)
    base = replace(base, fleet=replace(base.fleet, region_cars=BASE_REGION_CARS),
                   routing=replace(base.routing, sample_regions=args.route_sample))
    rows = []
    for sweep in args.only or list(SWEEPS):
        for key, value in SWEEPS[sweep]:
            t = time.perf_counter()
            result = run_simulation(configure(base, key, value))
            row = {"sweep": sweep, "value": value, **summarise(result.report, base.events.rush_at_h),
                   "wall_s": round(time.perf_counter() - t, 1)}
            rows.append(row)
            if not args.json:
                cov = "/".join(f"{c:g}" for c in row["cov_after_rush"])
                print(f"{sweep:>20} {value!s:>18}  served {row['served_pct']:8.3f}%  from rush "
                      f"{row['served_pct_from_rush']:8.3f}%  cov after rush {cov:>10}  failovers/req "
                      f"{row['failovers_per_request']:.4f}  failover_failed {row['failover_failed']:4d}  "
                      f"no_coverage {row['no_coverage']:5d}  overloaded {row['overloaded']:5d}  "
                      f"abrupt {row['abrupt_stops']:4d}  "
                      f"migrations {row['migrations']:4d}  ({row['wall_s']:.0f} s)", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
