"""Region size and refresh interval in the fleet simulator: gossip load and route-finding time.

For each devices-per-region value (and record refresh interval) it simulates two evening hours
(19:00-21:00, cars coming home) of the ``weekday`` scenario with every region routed through the
real ``find_route``, and prints per run: gossip bytes/s and messages/s per car (mean, p99 of the
last hour), the wall-clock time of ``find_route`` (p50, p99) at that region size with the number
of candidates it searched, hops per route, and the hosts per block per region. The time figures
depend on the machine (run it on a quiet one); the rest is deterministic per seed.

    python -m bench.sim_regions                   # region sizes 50..1000 x refresh 20 s, 60 s
    python -m bench.sim_regions --sizes 100,250 --refresh 20
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from idlefleet.node.sim import load_scenario, run_simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,100,250,1000", help="devices per region")
    ap.add_argument("--refresh", default="20,60", help="record refresh intervals, seconds")
    ap.add_argument("--regions", type=int, default=4, help="regions simulated (devices = regions x size)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for size in (int(x) for x in args.sizes.split(",")):
        for refresh in (float(x) for x in args.refresh.split(",")):
            scn = load_scenario("weekday").with_overrides(cars=size * args.regions, hours=2.0)
            scn = replace(scn, start_hour=19.0, fleet=replace(scn.fleet, region_cars=size),
                          publish=replace(scn.publish, refresh_s=refresh),
                          routing=replace(scn.routing, sample_regions=0))
            result = run_simulation(scn)
            last = result.report["hourly"][-1]
            rm = result.timing["route_ms"]
            row = {"region_devices": size, "refresh_s": refresh,
                   "gossip_bytes_per_s": last["gossip_bytes_per_s_per_car"],
                   "gossip_msgs_per_s": last["gossip_msgs_per_s_per_car"],
                   "route_ms": {"p50": rm["p50"], "p99": rm["p99"]}, "route_calls": rm["calls"],
                   "candidates_p50": result.report["routing"]["candidates"]["p50"],
                   "hops_p50": result.report["routing"]["hops"]["p50"],
                   "coverage": [last["coverage_min"], last["coverage_p1"], last["coverage_median"]],
                   "served_pct": result.report["totals"]["served_pct"]}
            rows.append(row)
            if not args.json:
                g = row["gossip_bytes_per_s"]
                print(f"region {size:>5} refresh {refresh:>4g}s  gossip B/s/car mean {g['mean']:>8g} "
                      f"p99 {g['p99']:>8g}  msgs/s {row['gossip_msgs_per_s']:>6g}  find_route p50 "
                      f"{rm['p50']:.2f} ms p99 {rm['p99']:.2f} ms ({rm['calls']} calls, "
                      f"{row['candidates_p50']:g} candidates, {row['hops_p50']:g} hops)  coverage "
                      f"{'/'.join(f'{c:g}' for c in row['coverage'])}  served {row['served_pct']:g}%",
                      flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
