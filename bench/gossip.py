"""Gossip benchmark: how fast a vehicle change reaches every node, and what an idle node costs.

For each swarm size (default 5, 10 and 20 node *processes* on 127.0.0.1) and each publishing policy
(``adaptive``, the default, and the ``naive`` 1 Hz baseline, measured in the same run), this starts a
real ``node.swarm.Swarm`` whose nodes read their state from ``file:`` vehicles written here, waits
until every node knows every other, then:

1. rounds: pick a node, move its battery by 10 points and flip its plug (one atomic file write);
   find that node's ``published`` event carrying the new battery value, then each other node's first
   ``record`` event from that peer with at least that sequence number.
   *publish -> everywhere* = max over other nodes of (receive time - publish time);
   *sensor -> everywhere* = the same from the file write, so it includes up to one vehicle poll (1 s).
   A round that does not reach every node within ``--round-timeout`` is a failure (reported).
2. idle: no changes for ``--idle`` seconds; CPU per node from ``/proc/<pid>/stat`` (utime + stime)
   as % of one core, median over nodes.

Prints a table, adaptive/naive ratios and the goal check (at 20 nodes on 2 cores: a change seen
everywhere within 3 s p99, idle CPU per node under 5 %), then one JSON line (``--json``: only that).

Nodes run with ``--no-serve`` (gossip only; ``--serve`` lets them host model blocks too).
Every wait is bounded; only processes this script started are signalled (by PID, via ``Swarm``).

    python -m bench.gossip                 # full run (~7-9 minutes on 2 cores)
    python -m bench.gossip --quick         # smoke run: 5 nodes, 3 rounds, short idle window
    python -m bench.gossip --sizes 5,10 --rounds 20 --keep /tmp/gossip-logs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CLK_TCK, cpu_ticks, machine_ticks, work_root
from idlefleet.node.cli.swarm import Swarm, tail
from idlefleet.node.files import write_json_atomic

POLICIES = ("adaptive", "naive")
BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
GOAL_NODES, GOAL_P99_S, GOAL_CPU_PCT = 20, 3.0, 5.0
GIVE_UP_AFTER = 3  # consecutive failed rounds after which a phase stops changing things


# -- event logs ------------------------------------------------------------------------------------
class EventTail:
    """Incrementally reads one node's JSON-lines event log (tolerates a half-written last line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def since(self, t: float) -> Iterator[dict[str, Any]]:
        return (e for e in self.events if e.get("t", 0.0) >= t)


# -- vehicles --------------------------------------------------------------------------------------
def initial_vehicle(index: int, now: float) -> dict[str, Any]:
    return {"battery_soc": 0.40 + 0.01 * (index % 20), "plugged_in": True, "charging_kw": 7.2,
            "thermal_headroom_c": 40.0, "parked": True, "parked_since": now - 3600.0,
            "expected_departure": now + 8 * 3600.0}


def changed_vehicle(state: dict[str, Any]) -> dict[str, Any]:
    """10 points of battery (up or down, staying in range) and a flipped plug."""
    soc = state["battery_soc"]
    soc = round(soc + 0.10 if soc + 0.10 <= 0.95 else soc - 0.10, 4)
    plugged = not state["plugged_in"]
    return {**state, "battery_soc": soc, "plugged_in": plugged, "charging_kw": 7.2 if plugged else 0.0}


# -- measurement -----------------------------------------------------------------------------------
@dataclass
class Round:
    node: int
    ok: bool
    publish_to_all_s: float | None = None
    sensor_to_all_s: float | None = None
    sensor_to_publish_s: float | None = None
    reached: int = 0  # other nodes that got the change within the timeout


@dataclass
class PhaseResult:
    nodes: int
    policy: str
    start_s: float | None = None  # None: the swarm did not start
    converged: bool = False
    converge_s: float | None = None
    rounds: list[Round] = field(default_factory=list)
    idle_window_s: float = 0.0
    cpu_pct: list[float] = field(default_factory=list)  # per node, % of one core over the idle window
    connected: list[int] = field(default_factory=list)  # per node, open connections after the window
    publishes_per_node_s: float = 0.0  # during the idle window
    records_per_node_s: float = 0.0  # accepted peer records per node per second, idle window
    system_busy_pct: float | None = None  # whole machine, all cores, idle window
    crashed: list[str] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def times(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.rounds if r.ok]

    @property
    def failures(self) -> int:
        return sum(not r.ok for r in self.rounds)

    def summary(self) -> dict[str, Any]:
        pub, sensor = self.times("publish_to_all_s"), self.times("sensor_to_all_s")
        return {
            "nodes": self.nodes, "policy": self.policy, "converged": self.converged,
            "converge_s": _r(self.converge_s), "rounds": len(self.rounds), "failures": self.failures,
            "publish_to_all_p50_s": _r(pct(pub, 50)), "publish_to_all_p99_s": _r(pct(pub, 99)),
            "sensor_to_all_p50_s": _r(pct(sensor, 50)), "sensor_to_all_p99_s": _r(pct(sensor, 99)),
            "idle_cpu_pct_median": _r(statistics.median(self.cpu_pct) if self.cpu_pct else None, 2),
            "idle_cpu_pct_max": _r(max(self.cpu_pct) if self.cpu_pct else None, 2),
            "idle_window_s": _r(self.idle_window_s, 1),
            "idle_cpu_pct_per_node": [round(c, 2) for c in self.cpu_pct],
            "connected_per_node": self.connected,
            "publishes_per_node_s": _r(self.publishes_per_node_s),
            "records_per_node_s": _r(self.records_per_node_s),
            "system_busy_pct": _r(self.system_busy_pct, 1),
            "crashed": self.crashed, "notes": self.notes,
        }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def pct(values: Sequence[float], q: float) -> float | None:
    """Percentile with linear interpolation (with 10 rounds, p99 is about the worst round)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Bench:
    def __init__(self, n: int, policy: str, workdir: Path, args: argparse.Namespace,
                 log: Any) -> None:
        self.n, self.policy, self.workdir, self.args, self.log = n, policy, workdir, args, log
        self.files = [workdir / f"vehicle{i}.json" for i in range(n)]
        now = time.time()
        self.states = [initial_vehicle(i, now) for i in range(n)]
        for path, state in zip(self.files, self.states, strict=True):
            write_json_atomic(path, state)
        env = dict(os.environ)
        env.update({var: "1" for var in BLAS_VARS})
        extra = ["--log-level", "WARNING", "--serve" if args.serve else "--no-serve"]
        if policy == "naive":
            extra += ["--publish-policy", "naive"]
        self.swarm = Swarm(n, workdir, extra, env=env, vehicles=[f"file:{p}" for p in self.files])
        self.tails = [EventTail(workdir / f"node{i}" / "events.jsonl") for i in range(n)]
        self.peer_ids: list[str] = []
        self.result = PhaseResult(n, policy)

    def alive(self) -> bool:
        return all(node.proc.poll() is None for node in self.swarm.nodes)

    def run(self) -> PhaseResult:
        res = self.result
        t0 = time.monotonic()
        try:
            self.swarm.start(timeout=self.args.start_timeout)
            res.start_s = time.monotonic() - t0
            self.log(f"  started {self.n} processes in {res.start_s:.1f}s; waiting for convergence")
            self.wait_converged()
            if not res.converged:
                res.notes.append("did not converge; measuring anyway")
            self.peer_ids = [(node.status() or {}).get("peer_id", "") for node in self.swarm.nodes]
            for k in range(self.args.rounds):
                if not self.alive():
                    res.notes.append("a node exited; rounds stopped")
                    break
                if len(res.rounds) >= GIVE_UP_AFTER and not any(r.ok for r in res.rounds[-GIVE_UP_AFTER:]):
                    res.notes.append(f"{GIVE_UP_AFTER} rounds failed in a row; "
                                     f"skipped the other {self.args.rounds - k} (keeps the run bounded)")
                    break
                rnd = self.one_round(k)
                res.rounds.append(rnd)
                self.log(f"  round {k + 1}/{self.args.rounds}: node {rnd.node} "
                         + (f"publish->all {rnd.publish_to_all_s:.3f}s sensor->all {rnd.sensor_to_all_s:.3f}s"
                            if rnd.ok else f"FAILED (reached {rnd.reached}/{self.n - 1})"))
            time.sleep(self.args.settle)
            self.measure_idle()
        except RuntimeError as e:  # a node failed to start
            res.notes.append(f"start failed: {e}".splitlines()[0])
        finally:
            for node in self.swarm.nodes:
                if node.proc.poll() is not None:
                    res.crashed.append(f"node{node.index} exited {node.proc.returncode}: "
                                       + tail(node.log_file, 3).replace("\n", " | ")[-300:])
            codes = self.swarm.stop()
            res.exit_codes = [codes[i] for i in sorted(codes)]
        return res

    def wait_converged(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + (self.args.converge_timeout or 20.0 + 3.0 * self.n)
        known: list[int] = []
        while time.monotonic() < deadline and self.alive():
            known = [(node.status() or {}).get("peers_known", -1) for node in self.swarm.nodes]
            if all(k == self.n - 1 for k in known):
                self.result.converged = True
                self.result.converge_s = time.monotonic() - t0
                return
            time.sleep(0.25)
        self.result.notes.append(f"peers_known at convergence timeout: {known}")

    def one_round(self, k: int) -> Round:
        target = (k * 7 + 1) % self.n  # walks over the nodes, the bootstrap node included
        peer = self.peer_ids[target]
        new = changed_vehicle(self.states[target])
        self.states[target] = new
        write_json_atomic(self.files[target], new)
        t_write = time.time()
        deadline = time.monotonic() + self.args.round_timeout
        pub: dict[str, Any] | None = None
        got: dict[int, float] = {}
        others = [i for i in range(self.n) if i != target]
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if pub is None:
                self.tails[target].poll()
                pub = next((e for e in self.tails[target].since(t_write)
                            if e.get("event") == "published"
                            and abs(e.get("battery_soc", -1) - new["battery_soc"]) < 1e-6), None)
                if pub is None:
                    continue
            for i in others:
                if i in got:
                    continue
                self.tails[i].poll()
                hit = next((e for e in self.tails[i].since(t_write)
                            if e.get("event") == "record" and e.get("peer") == peer
                            and e.get("seq", -1) >= pub["seq"]), None)
                if hit is not None:
                    got[i] = hit["t"]
            if len(got) == len(others):
                break
        rnd = Round(target, ok=pub is not None and len(got) == len(others), reached=len(got))
        if pub is not None:
            rnd.sensor_to_publish_s = pub["t"] - t_write
        if rnd.ok and pub is not None:
            last = max(got.values())
            rnd.publish_to_all_s = last - pub["t"]
            rnd.sensor_to_all_s = last - t_write
        # Space the rounds: at least `spacing` after the write, and a moment after the last receipt.
        time.sleep(max(0.5, t_write + self.args.spacing - time.time()))
        return rnd

    def measure_idle(self) -> None:
        res = self.result
        pids = [node.proc.pid for node in self.swarm.nodes]
        t_wall0, sys0 = time.time(), machine_ticks()
        mono0 = time.monotonic()
        before = [cpu_ticks(pid) for pid in pids]
        time.sleep(self.args.idle)
        after = [cpu_ticks(pid) for pid in pids]
        elapsed = time.monotonic() - mono0
        sys1 = machine_ticks()
        res.idle_window_s = elapsed
        res.connected = [(node.status() or {}).get("connected", -1) for node in self.swarm.nodes]
        res.cpu_pct = [100.0 * (a - b) / CLK_TCK / elapsed
                       for a, b in zip(after, before, strict=True) if a is not None and b is not None]
        if len(res.cpu_pct) < len(pids):
            res.notes.append(f"{len(pids) - len(res.cpu_pct)} node(s) vanished during the idle window")
        total = sys1[1] - sys0[1]
        res.system_busy_pct = 100.0 * (sys1[0] - sys0[0]) / total if total else None
        t_wall1 = t_wall0 + elapsed
        pubs = recs = 0
        for tl in self.tails:
            tl.poll()
            for e in tl.since(t_wall0):
                if e["t"] > t_wall1:
                    continue
                pubs += e.get("event") == "published"
                recs += e.get("event") == "record"
        res.publishes_per_node_s = pubs / self.n / elapsed
        res.records_per_node_s = recs / self.n / elapsed


# -- reporting -------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    try:
        from importlib.metadata import version
        libp2p = version("libp2p")
    except Exception:
        libp2p = "?"
    return {
        "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "blas_threads_per_process": 1, "python": platform.python_version(), "libp2p": libp2p,
        "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def fmt(x: float | None, unit: str = "", nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def report(env: dict[str, Any], results: list[PhaseResult], args: argparse.Namespace) -> str:
    out = [f"environment: {env['usable_cores']} usable core(s) of {env['cores']}, BLAS threads = 1 per "
           f"process ({', '.join(v + '=1' for v in BLAS_VARS)}), Python {env['python']}, "
           f"libp2p {env['libp2p']}, load avg at start {env['loadavg_at_start']}",
           f"rounds per phase: {args.rounds} (spacing {args.spacing}s, timeout {args.round_timeout}s), "
           f"idle window {args.idle}s; times in seconds; CPU in % of one core; conn = median open "
           f"connections per node; machine = whole machine busy during the idle window (all cores, "
           f"other work included)",
           "",
           f"{'nodes':>5} {'policy':<8} {'start':>6} {'conv':>5} {'ok':>5}  "
           f"{'pub->all p50':>12} {'p99':>6}  {'sensor->all p50':>15} {'p99':>6}  "
           f"{'idle CPU/node med':>17} {'max':>6} {'conn':>4}  {'pub/node/s':>10} {'recv/node/s':>11} "
           f"{'machine':>7}"]
    for r in results:
        s = r.summary()
        out.append(
            f"{r.nodes:>5} {r.policy:<8} {fmt(r.start_s, 's', 1) if r.start_s is not None else 'FAIL':>6} "
            f"{fmt(r.converge_s, 's', 0) if r.converged else 'NO':>5} "
            f"{len(r.rounds) - r.failures:>2}/{len(r.rounds):<2}  "
            f"{fmt(s['publish_to_all_p50_s']):>12} {fmt(s['publish_to_all_p99_s']):>6}  "
            f"{fmt(s['sensor_to_all_p50_s']):>15} {fmt(s['sensor_to_all_p99_s']):>6}  "
            f"{fmt(s['idle_cpu_pct_median'], '%'):>17} {fmt(s['idle_cpu_pct_max'], '%', 1):>6} "
            f"{statistics.median(r.connected) if r.connected else '-':>4}  "
            f"{fmt(s['publishes_per_node_s']):>10} {fmt(s['records_per_node_s']):>11} "
            f"{fmt(s['system_busy_pct'], '%', 0):>7}")
    out.append("")
    out.append("adaptive vs naive (ratio < 1: adaptive is lower):")
    by = {(r.nodes, r.policy): r.summary() for r in results}
    for n in sorted({r.nodes for r in results}):
        a, b = by.get((n, "adaptive")), by.get((n, "naive"))
        if a is None or b is None:
            continue
        out.append(f"  {n:>2} nodes: idle CPU {ratio(a['idle_cpu_pct_median'], b['idle_cpu_pct_median'])}, "
                   f"publish->all p50 {ratio(a['publish_to_all_p50_s'], b['publish_to_all_p50_s'])} "
                   f"p99 {ratio(a['publish_to_all_p99_s'], b['publish_to_all_p99_s'])}, "
                   f"sensor->all p99 {ratio(a['sensor_to_all_p99_s'], b['sensor_to_all_p99_s'])}, "
                   f"messages published {ratio(a['publishes_per_node_s'], b['publishes_per_node_s'])}")
    out.append("")
    out.extend(goal_lines(results, env))
    for r in results:
        for note in r.notes + r.crashed:
            out.append(f"note ({r.nodes} nodes, {r.policy}): {note}")
        bad = [c for c in r.exit_codes if c not in (0, None)]
        if bad:
            out.append(f"note ({r.nodes} nodes, {r.policy}): non-zero exit codes on stop: {r.exit_codes}")
    return "\n".join(out)


def goal(results: list[PhaseResult]) -> dict[str, Any] | None:
    """The goal check, on the largest adaptive swarm measured (the goal is stated for 20 nodes)."""
    adaptive = [r for r in results if r.policy == "adaptive"]
    if not adaptive:
        return None
    r = max(adaptive, key=lambda r: r.nodes)
    s = r.summary()
    p99, cpu = s["publish_to_all_p99_s"], s["idle_cpu_pct_median"]
    latency_ok = r.failures == 0 and bool(r.rounds) and p99 is not None and p99 <= GOAL_P99_S
    cpu_ok = cpu is not None and cpu < GOAL_CPU_PCT
    return {"nodes": r.nodes, "p99_s": p99, "sensor_p99_s": s["sensor_to_all_p99_s"],
            "failures": r.failures, "measured_rounds": len(r.rounds), "latency_ok": latency_ok,
            "idle_cpu_pct": cpu, "cpu_ok": cpu_ok,
            "ok": latency_ok and cpu_ok and r.nodes >= GOAL_NODES}


def goal_lines(results: list[PhaseResult], env: dict[str, Any]) -> list[str]:
    g = goal(results)
    if g is None:
        return ["goal check: no adaptive phase measured"]
    if g["measured_rounds"] == 0:
        return [f"goal check at {g['nodes']} nodes: not measured (no rounds ran; see the notes)"]
    caveat = ("" if g["nodes"] >= GOAL_NODES
              else f" (goal is stated for {GOAL_NODES} nodes; measured {g['nodes']})")
    sensor_ok = g["sensor_p99_s"] is not None and g["sensor_p99_s"] <= GOAL_P99_S
    return [
        f"goal check at {g['nodes']} nodes on {env['usable_cores']} core(s){caveat}:",
        f"  change seen everywhere within {GOAL_P99_S:.0f}s p99: publish->all p99 {fmt(g['p99_s'])}s, "
        f"{g['failures']} failed round(s) -> {'PASS' if g['latency_ok'] else 'FAIL'}"
        f"   (sensor->all p99 {fmt(g['sensor_p99_s'])}s, incl. up to 1s poll: "
        f"{'within' if sensor_ok else 'over'} {GOAL_P99_S:.0f}s)",
        f"  idle CPU per node under {GOAL_CPU_PCT:.0f}%: median {fmt(g['idle_cpu_pct'], '%')} -> "
        f"{'PASS' if g['cpu_ok'] else 'FAIL'}",
        f"  overall: {'PASS' if g['ok'] else 'FAIL' if g['nodes'] >= GOAL_NODES else 'not evaluated'}"
        + ("" if g["nodes"] >= GOAL_NODES else f" (needs a {GOAL_NODES}-node run)"),
    ]


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gossip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated swarm sizes (default 5,10,20)")
    p.add_argument("--rounds", type=int, default=None, help="changes per phase (default 10)")
    p.add_argument("--idle", type=float, default=None, help="idle CPU window in seconds (default 20)")
    p.add_argument("--policies", default=",".join(POLICIES), help="default: adaptive,naive")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 nodes, 3 rounds, 6 s idle window")
    p.add_argument("--spacing", type=float, default=2.5, help="seconds between changes (default 2.5)")
    p.add_argument("--round-timeout", type=float, default=15.0)
    p.add_argument("--settle", type=float, default=3.0, help="pause before the idle window")
    p.add_argument("--start-timeout", type=float, default=90.0, help="per node process")
    p.add_argument("--converge-timeout", type=float, default=None, help="default 20 + 3 s per node")
    p.add_argument("--serve", action="store_true",
                   help="let nodes host model blocks too (default: --no-serve, gossip only)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep keys, logs and event logs under DIR")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    sizes = args.sizes or ("5" if args.quick else "5,10,20")
    try:
        args.sizes = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {sizes!r}")
    if not args.sizes or min(args.sizes) < 2:
        p.error("every size must be at least 2")
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if not set(args.policies) <= set(POLICIES) or not args.policies:
        p.error(f"--policies must be a subset of {','.join(POLICIES)}")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 10
    if args.idle is None:
        args.idle = 6.0 if args.quick else 20.0
    if args.quick:
        args.settle = min(args.settle, 1.0)
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through Swarm.stop() in every phase's finally


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    env = environment()
    results: list[PhaseResult] = []
    t_start = time.monotonic()
    interrupted = False
    with contextlib.ExitStack() as stack:
        root = work_root(stack, args.keep)
        try:
            for n in args.sizes:
                for policy in args.policies:
                    log(f"[{time.monotonic() - t_start:6.1f}s] {n} nodes, {policy} publishing")
                    workdir = root / f"n{n}-{policy}"
                    workdir.mkdir(parents=True, exist_ok=True)
                    results.append(Bench(n, policy, workdir, args, log).run())
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: reporting what was measured")
    if not args.json:
        print(report(env, results, args))
        kept = f"; logs kept in {args.keep}" if args.keep else ""
        print(f"total {time.monotonic() - t_start:.0f}s{kept}")
    g = goal(results)
    print(json.dumps({"bench": "gossip", "environment": env, "interrupted": interrupted,
                      "config": {"sizes": args.sizes, "rounds": args.rounds, "idle_s": args.idle,
                                 "spacing_s": args.spacing, "round_timeout_s": args.round_timeout},
                      "results": [r.summary() for r in results],
                      "per_round": [{"nodes": r.nodes, "policy": r.policy,
                                     "rounds": [asdict(x) for x in r.rounds]} for r in results],
                      "goal": g}))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
