"""``idlefleet simulate``: run a scenario and print or write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from idlefleet.node.sim.engine import run_simulation
from idlefleet.node.sim.report import to_json, to_text, write_charts
from idlefleet.node.sim.scenario import ScenarioError, builtin_scenarios, load_scenario

__all__ = ["add_parser", "run_simulate"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    names = ", ".join(builtin_scenarios()) or "none installed"
    p = sub.add_parser("simulate", help="simulate a large fleet with the node's own policy, placement, "
                                        "routing and publishing code")
    p.add_argument("--cars", type=int, help="devices in the fleet (default: the scenario's)")
    p.add_argument("--hours", type=float, help="simulated hours (default: the scenario's)")
    p.add_argument("--seed", type=int, help="random seed (default: the scenario's); same seed, same report")
    p.add_argument("--scenario", metavar="NAME|FILE", help=f"a built-in scenario ({names}) or a TOML file")
    p.add_argument("--route-sample", type=int, metavar="N",
                   help="route with find_route in N regions, the capacity bound elsewhere "
                        "(default: the scenario's, 8; 0 = every region)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write report.json, report.txt and PNG charts here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_simulate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    scn = load_scenario(args.scenario).with_overrides(cars=args.cars, hours=args.hours, seed=args.seed)
    if args.route_sample is not None:
        if args.route_sample < 0:
            raise ScenarioError("--route-sample must be >= 0")
        scn = replace(scn, routing=replace(scn.routing, sample_regions=args.route_sample))
    if args.out is not None:
        # Fail before a long run, not after it.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from idlefleet.node.sim.report import ChartsUnavailable

            raise ChartsUnavailable("--out needs matplotlib for the charts: "
                                    "pip install 'idlefleet[sim]' (or matplotlib)") from None
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_simulation(scn, progress=progress)
    text = to_text(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(to_json(result) + "\n", encoding="utf-8")
        (args.out / "report.txt").write_text(text + "\n", encoding="utf-8")
        write_charts(result, args.out)
    print(to_json(result) if args.json else text)
    return 0
