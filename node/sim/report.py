"""Reports of a simulation run: a text summary, JSON, and PNG charts (matplotlib, optional)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idlefleet.node.sim.engine import FAIL_REASONS, SimResult
from idlefleet.protocols.errors import ConfigError

__all__ = ["ChartsUnavailable", "to_json", "to_text", "write_charts"]


class ChartsUnavailable(ConfigError):
    """``--out`` needs matplotlib, which is not installed."""


def to_json(result: SimResult, *, timing: bool = True) -> str:
    """The report as one JSON document; ``timing`` (wall clock, RSS) is the only part that varies
    between runs of the same scenario."""
    doc: dict[str, Any] = dict(result.report)
    if timing:
        doc["timing"] = result.timing
    return json.dumps(doc, indent=1, sort_keys=False)


def to_text(result: SimResult) -> str:
    """A human summary: the run, one line per simulated hour, then the per-run figures."""
    r, t = result.report, result.timing
    tot = r["totals"]
    lines = [
        f"scenario {r['scenario']}: {r['description']}",
        f"{r['cars']:,} devices in {r['regions']:,} regions (mean {r['region_devices']['mean']:g}, "
        f"max {r['region_devices']['max']}), {r['opted_in']:,} opted in; {r['hours']:g} h from "
        f"{r['start_hour']:05.2f}h, step {r['step_s']:g} s, seed {r['seed']}",
        f"model: {r['model']['blocks']} blocks of {r['model']['block_mb']:g} MB; routing: "
        f"{r['routing']['routed_regions']} region(s) through find_route, "
        f"{r['routing']['capacity_bound_regions']} by the per-block capacity bound",
        "",
        f"{'time':>5} {'parked':>8} {'consent':>8} {'serving':>8} {'cov min/p1/med':>15} "
        f"{'requests':>9} {'capacity':>9} {'served%':>8} {'failed':>7} {'failover':>8} {'tokens/h':>11} "
        f"{'gossip B/s/car':>15} {'DHT/car':>7}",
    ]
    for h in r["hourly"]:
        g = h["gossip_bytes_per_s_per_car"]
        lines.append(
            f"{h['time_of_day']:>5} {h['parked']:>8,} {h['consenting']:>8,} {h['serving']:>8,} "
            f"{h['coverage_min']:>4}/{h['coverage_p1']:>4g}/{h['coverage_median']:>4g} "
            f"{h['requests']:>9,} {h['capacity_per_hour']:>9,.0f} {h['served_pct']:>8.3f} "
            f"{sum(h['failed'].values()):>7,} "
            f"{h['failovers']:>8,} {h['tokens']:>11,} {g['mean']:>7.0f}/{g['p99']:<7.0f} "
            f"{h['dht_lookups_per_car']:>7.3f}")
    failed = ", ".join(f"{k} {tot['failed'][k]:,}" for k in FAIL_REASONS)
    pc = r["per_serving_car"]
    e, c = pc["energy_kwh"], pc["credits_block_tokens"]
    rm = t["route_ms"]
    lines += [
        "",
        f"requests: {tot['requests']:,}, served {tot['served']:,} ({tot['served_pct']:g}%, "
        f"{tot['served_remote']:,} in the sibling region), failed: {failed}; conserved: {tot['conserved']}",
        f"batch: {tot['batch']['queued']:,} queued, {tot['batch']['served']:,} served, "
        f"{tot['batch']['pending']:,} pending; tokens {tot['tokens']:,}",
        f"failovers: {tot['failovers']:,} ({tot['failovers_per_request']:g} per served request), "
        f"migrations {tot['migrations']:,}, abrupt stops {tot['abrupt_stops']:,}, joins {tot['joins']:,}, "
        f"range moves {tot['moves']:,}",
        f"route finding (find_route, wall clock): p50 {rm['p50']:.3f} ms, p99 {rm['p99']:.3f} ms over "
        f"{rm['calls']:,} calls; candidates p50 {r['routing']['candidates']['p50']:g}, "
        f"hops p50 {r['routing']['hops']['p50']:g}",
        f"per serving car ({pc['cars']:,}): energy kWh mean {e['mean']:g} (p10 {e['p10']:g}, "
        f"p50 {e['p50']:g}, p90 {e['p90']:g}); credits (block-tokens) p10 {c['p10']:g}, "
        f"p50 {c['p50']:g}, p90 {c['p90']:g}",
        f"energy: {tot['energy_used_kwh']:g} kWh of compute, {tot['energy_from_battery_kwh']:g} kWh of it "
        f"from batteries; steps over the available energy: {tot['energy_over_available_steps']}; "
        f"battery floor violations: {tot['battery_floor_violations']}",
        "node functions called: " + ", ".join(f"{k} {v:,}" for k, v in r["node_functions_called"].items()),
        f"signed record on the wire: {min(r['record_bytes'].values())}-"
        f"{max(r['record_bytes'].values())} bytes; "
        f"DHT lookup ~{r['dht']['lookup_messages']} messages",
        f"wall {t['wall_s']:g} s, peak RSS {t['peak_rss_mb']:g} MB",
    ]
    return "\n".join(lines)


def write_charts(result: SimResult, out: Path) -> list[Path]:
    """PNG charts of the hourly figures into ``out`` (created). Raises ``ChartsUnavailable`` when
    matplotlib is missing (``pip install 'idlefleet[sim]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ChartsUnavailable(
            "--out needs matplotlib for the charts: pip install 'idlefleet[sim]' (or matplotlib)") from None
    out.mkdir(parents=True, exist_ok=True)
    hours = result.report["hourly"]
    x = [h["hour"] for h in hours]
    name = result.report["scenario"]
    charts = [
        ("devices.png", "devices",
         [("parked", "parked"), ("consenting", "consenting"), ("serving", "serving")]),
        ("coverage.png", "hosts per block per region",
         [("coverage_min", "min"), ("coverage_p1", "p1"), ("coverage_median", "median")]),
        ("requests.png", "requests per hour", [("requests", "arrived"), ("served", "served"),
                                               ("failovers", "failovers")]),
        ("gossip.png", "gossip bytes/s per car", [("gossip_bytes_per_s_per_car.mean", "mean"),
                                                  ("gossip_bytes_per_s_per_car.p99", "p99")]),
    ]
    written = []
    for filename, ylabel, series in charts:
        fig, ax = plt.subplots(figsize=(8, 4))
        for key, label in series:
            ax.plot(x, [_get(h, key) for h in hours], label=label, marker=".")
        if filename == "requests.png":
            ax.plot(x, [sum(h["failed"].values()) for h in hours], label="failed", marker=".")
        ax.set_xlabel("simulated hour")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _get(row: dict[str, Any], key: str) -> float:
    value: Any = row
    for part in key.split("."):
        value = value[part]
    return float(value)
