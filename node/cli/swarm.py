"""``idlefleet swarm``: N real node processes on 127.0.0.1, bootstrapped off the first.

Each node is the same ``idlefleet node`` program in its own OS process, with its own key and a
different simulated vehicle. The swarm shows a live table from the status files the nodes write,
and on exit (``--duration`` or Ctrl-C) stops every node with SIGTERM so each publishes ``offline``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from idlefleet.node.cli.procs import tied_popen_kwargs
from idlefleet.node.faults import DEFAULT_KIND, ENV_GUARD, parse_fault
from idlefleet.node.files import write_json_atomic
from idlefleet.p2p.identity import load_or_create_key, peer_id_of
from idlefleet.protocols.errors import ConfigError

PROFILES = ("parked", "commuter", "taxi", "laptop", "phone")
#: ``--vehicle file``: every node reads DATA_DIR/vehicle.json, written with this state at start
#: (parked, plugged in, 80% charged); rewrite one file to change one car (``Swarm.write_vehicle``).
FILE_VEHICLE = "file"
START_VEHICLE = {"battery_soc": 0.8, "plugged_in": True, "charging_kw": 7.4, "thermal_headroom_c": 40.0,
                 "parked": True, "parked_since": None, "expected_departure": None}
# Room for 10 of SmolLM2's 30 blocks (14.2 MB each in fp32; 140 MiB = 146.8 MB):
# 3 nodes cover the model, 6 cover it twice.
SWARM_BUDGET_MB = 140


@dataclass
class SwarmNode:
    index: int
    proc: subprocess.Popen[bytes]
    status_file: Path
    log_file: Path

    def status(self) -> dict[str, Any] | None:
        try:
            status: dict[str, Any] = json.loads(self.status_file.read_text())
            return status
        except (OSError, ValueError):
            return None


def parse_faulty(spec: str, n: int) -> dict[int, str]:
    """``--faulty K[:KIND[:RATE]]`` -> {node index: fault spec} for the last K of ``n`` nodes (never
    node 0, the bootstrap node). KIND defaults to ``corrupt``. Raises ConfigError."""
    count, _, kind = spec.partition(":")
    try:
        k = int(count)
    except ValueError:
        raise ConfigError(f"--faulty must be K[:KIND[:RATE]], got {spec!r}") from None
    if not 1 <= k <= n - 1:
        raise ConfigError(f"--faulty K must be 1..{n - 1} (node 0, the bootstrap node, is never faulty), "
                          f"got {k}")
    kind = kind or DEFAULT_KIND
    parse_fault(kind)
    return {i: kind for i in range(n - k, n)}


def default_vehicle(index: int) -> str:
    """Varied simulated vehicles: a parked car, a commuter, a taxi, a laptop, a phone, ..."""
    return f"sim:{PROFILES[index % len(PROFILES)]}:seed={index}:scale=60"


def node_data_dir(workdir: Path, index: int) -> Path:
    """Node ``index``'s own data directory (key, consent log, event log, control socket)."""
    return workdir / f"node{index}"


def node_command(index: int, workdir: Path, bootstrap: str | None, extra: Sequence[str],
                 vehicle: str | None = None, port: int = 0) -> list[str]:
    data_dir = node_data_dir(workdir, index)
    if vehicle == FILE_VEHICLE:
        vehicle = f"file:{data_dir / 'vehicle.json'}"
    cmd = [sys.executable, "-m", "idlefleet.node.cli", "node",
           "--data-dir", str(data_dir),
           "--listen-host", "127.0.0.1", "--port", str(port),
           "--vehicle", vehicle or default_vehicle(index),
           "--consent", "--memory-budget-mb", str(SWARM_BUDGET_MB), "--rebalance", "10",
           "--status-file", str(workdir / f"node{index}.status.json"),
           ]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    return cmd + list(extra)


class Swarm:
    """Starts, watches and stops the node processes. Use as a context manager."""

    def __init__(self, n: int, workdir: Path, extra_args: Sequence[str] = (), *,
                 env: dict[str, str] | None = None, vehicles: Sequence[str] | None = None,
                 first_args: Sequence[str] = (), faulty: dict[int, str] | None = None) -> None:
        if n < 1:
            raise ValueError("a swarm needs at least one node")
        if vehicles is not None and len(vehicles) != n:
            raise ValueError("give one vehicle spec per node")
        self.vehicles = list(vehicles) if vehicles is not None else [default_vehicle(i) for i in range(n)]
        self.n = n
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.first_args = list(first_args)  # node 0 only (e.g. --api-port)
        self.nodes: list[SwarmNode] = []
        # Per node index: a command prefix (tests: ``ip netns exec NS`` runs a node in a namespace).
        self.wrappers: dict[int, list[str]] = {}
        self.bootstrap: str | None = None  # node 0's multiaddr, once started
        self.env = dict(os.environ if env is None else env)
        # Test tooling: node index -> its --chaos-fault spec. The chaos guard is set in those
        # nodes' environment only, never inherited by the others.
        self.faulty = dict(faulty or {})
        if not all(0 < i < n for i in self.faulty):
            raise ValueError("faulty nodes must be among 1..n-1 (node 0 bootstraps the swarm)")
        self.env.pop(ENV_GUARD, None)
        # Several processes share the cores: one BLAS thread each, or they collapse (DESIGN.md).
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            self.env.setdefault(var, "1")

    def _spawn(self, index: int, bootstrap: str | None, port: int = 0) -> SwarmNode:
        log_file = self.workdir / f"node{index}.log"
        status_file = self.workdir / f"node{index}.status.json"
        status_file.unlink(missing_ok=True)
        node_data_dir(self.workdir, index).mkdir(mode=0o700, exist_ok=True)
        if self.vehicles[index] == FILE_VEHICLE:
            self.write_vehicle(index)
        with open(log_file, "ab") as logf:
            extra = self.extra_args + (self.first_args if index == 0 else [])
            env = self.env
            if index in self.faulty:
                extra = [*extra, "--chaos-fault", self.faulty[index]]
                env = {**self.env, ENV_GUARD: "yes"}
            cmd = self.wrappers.get(index, []) + node_command(index, self.workdir, bootstrap, extra,
                                                              self.vehicles[index], port)
            # Its own session (a terminal's Ctrl-C reaches only us; we stop it cleanly), tied to
            # this process: it leaves when we end, however we end (node.procs).
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    **tied_popen_kwargs(env))
        node = SwarmNode(index, proc, status_file, log_file)
        self.nodes.append(node)
        return node

    def write_vehicle(self, index: int, **changes: Any) -> dict[str, Any]:
        """(Re)write node ``index``'s vehicle.json atomically: the start state (parked_since =
        now) with ``changes``. Returns what was written."""
        state = {**START_VEHICLE, "parked_since": time.time(), **changes}
        if not state["parked"]:
            state["parked_since"] = None
        write_json_atomic(node_data_dir(self.workdir, index) / "vehicle.json", state)
        return state

    def touch_vehicles(self) -> None:
        """Keep ``--vehicle file`` states fresh (the swarm plays the car daemon for the demo)."""
        for i, spec in enumerate(self.vehicles):
            path = node_data_dir(self.workdir, i) / "vehicle.json"
            if spec == FILE_VEHICLE and path.exists():
                os.utime(path)

    def _wait_status(self, node: SwarmNode, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        touched = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - touched >= 1.0:  # loading takes a while: keep the states fresh
                self.touch_vehicles()
                touched = time.monotonic()
            st = node.status()
            if st is not None:
                return st
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited with {node.proc.returncode}; "
                                   f"log: {node.log_file}\n{tail(node.log_file)}")
            time.sleep(0.05)
        raise RuntimeError(f"node {node.index} did not start within {timeout}s; log: {node.log_file}")

    def start(self, *, stagger_s: float = 0.15, timeout: float = 60.0) -> None:
        """Start node 0, then the others bootstrapping off it (staggered: a burst of concurrent
        bootstraps overloads the bootstrap node's DHT). The others start as soon as node 0
        listens, while it still loads its blocks: its address is known in advance (its key is
        created here, as the node would create it, and its port chosen here)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        boot = self.bootstrap = self._start_first(timeout)
        for i in range(1, self.n):
            self._spawn(i, boot)
            time.sleep(stagger_s)
        for node in self.nodes:
            self._wait_status(node, timeout)

    def _start_first(self, timeout: float) -> str:
        """Spawn node 0 and return its multiaddr once it listens (its status file appears only
        once its blocks are loaded, seconds later). Falls back to waiting for the status file if
        the listening socket cannot be seen (no ``/proc/net/tcp``) or the chosen port was taken."""
        if ({"--key-file", "--port", "--listen-host"} & {*self.extra_args, *self.first_args}
                or 0 in self.wrappers):  # another address, or another network namespace
            return str(self._wait_status(self._spawn(0, None), timeout)["multiaddr"])  # not ours to guess
        data_dir = node_data_dir(self.workdir, 0)
        data_dir.mkdir(mode=0o700, exist_ok=True)
        key, _ = load_or_create_key(data_dir / "node.key")  # the node's own default key path
        port = _free_port()
        first = self._spawn(0, None, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and first.proc.poll() is None:
            listening = _listening(port)
            if listening is None:
                break  # cannot tell: wait for the status file
            if listening:
                return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(key)}"
            time.sleep(0.05)
        if first.proc.poll() is not None and "Address already in use" in tail(first.log_file):
            self.nodes.remove(first)  # someone took the port meanwhile: any free port, as before
            first = self._spawn(0, None)
        multiaddr: str = self._wait_status(first, max(1.0, deadline - time.monotonic()))["multiaddr"]
        return multiaddr

    def state(self) -> dict[str, Any]:
        """``{"nodes": [{"peer_id", "multiaddr", "pid", "data_dir", "faulty"}, ...]}``, bootstrap
        first; a faulty node (``--faulty``) also has ``"fault": "KIND[:RATE]"``."""
        out = []
        for node in self.nodes:
            st = node.status() or {}
            entry = {"peer_id": st.get("peer_id"), "multiaddr": st.get("multiaddr"),
                     "pid": node.proc.pid, "data_dir": str(node_data_dir(self.workdir, node.index)),
                     "faulty": node.index in self.faulty}
            if node.index in self.faulty:
                entry["fault"] = self.faulty[node.index]
            out.append(entry)
        return {"nodes": out}

    def faulty_summary(self) -> str | None:
        """One line naming the faulty nodes (None if there are none)."""
        if not self.faulty:
            return None
        names = []
        for node in self.nodes:
            if node.index in self.faulty:
                peer = (node.status() or {}).get("peer_id") or "?"
                names.append(f"#{node.index} ..{peer[-12:]} ({self.faulty[node.index]})")
        return (f"FAULTY nodes (test tooling: they return WRONG outputs): {', '.join(names)}")

    def stop(self, *, timeout: float = 20.0) -> dict[int, int | None]:
        """SIGTERM every node we started (by PID), wait, SIGKILL stragglers. Returns exit codes."""
        for node in self.nodes:
            if node.proc.poll() is None:
                try:
                    node.proc.send_signal(signal.SIGCONT)  # a frozen node cannot handle SIGTERM
                    node.proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        return {node.index: node.proc.returncode for node in self.nodes}

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool | None:
    """Whether a socket listens on 127.0.0.1:``port`` (from ``/proc/net/tcp``; None: cannot tell).
    Looks without connecting, so the node sees nothing."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    want = f"0100007F:{port:04X}"  # little-endian 127.0.0.1
    return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in lines) if len(f) > 3)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def render_table(swarm: Swarm) -> str:
    rows = [f"{'#':>2}  {'peer':<14} {'pid':>7}  {'state':<9} {'battery':>7}  {'plugged':<7} "
            f"{'peers known':>11}  {'blocks':<9}"]
    for node in swarm.nodes:
        st = node.status()
        code = node.proc.poll()
        if code is not None:
            rows.append(f"{node.index:>2}  {'-':<14} {node.proc.pid:>7}  exited ({code})")
            continue
        if st is None:
            rows.append(f"{node.index:>2}  {'...':<14} {node.proc.pid:>7}  starting")
            continue
        batt = "-" if st.get("battery_soc") is None else f"{st['battery_soc'] * 100:5.1f}%"
        plugged = {True: "yes", False: "no"}.get(bool(st["plugged_in"]), "-") if "plugged_in" in st else "-"
        if st.get("plugged_in") is None:
            plugged = "-"
        blocks = st.get("blocks")
        fault = f"  FAULTY ({swarm.faulty[node.index]})" if node.index in swarm.faulty else ""
        rows.append(f"{node.index:>2}  ..{st['peer_id'][-12:]:<12} {node.proc.pid:>7}  "
                    f"{st.get('state', '?'):<9} {batt:>7}  {plugged:<7} {st.get('peers_known', 0):>11}  "
                    f"{'-' if not blocks else f'{blocks[0]}-{blocks[1]}':<9}{fault}")
    return "\n".join(rows)


def covered(swarm: Swarm, n_blocks: int = 30) -> bool:
    """Whether the online nodes' hosted blocks cover ``[0, n_blocks)``."""
    hosted = [0] * n_blocks
    for node in swarm.nodes:
        st = node.status()
        if st and st.get("state") == "online" and st.get("blocks"):
            for b in range(*st["blocks"]):
                if b < n_blocks:
                    hosted[b] += 1
    return min(hosted) > 0


def generate_across(swarm: Swarm, prompt: str, max_new_tokens: int, out: TextIO) -> int:
    """Run ``idlefleet generate --bootstrap`` against the swarm; its text streams to ``out``."""
    boot = (swarm.nodes[0].status() or {}).get("multiaddr")
    deadline = time.monotonic() + 120
    while not covered(swarm) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(render_table(swarm), file=out)
    print(f"\n>>> {prompt}", end="", file=out, flush=True)
    cmd = [sys.executable, "-m", "idlefleet.node.cli", "generate", "--bootstrap", str(boot), prompt,
           "--max-new-tokens", str(max_new_tokens)]
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, timeout=300,
                          **tied_popen_kwargs(swarm.env))
    print(f"\n{proc.stderr.strip()}\n", file=out, flush=True)
    return proc.returncode


def run_swarm(n: int, *, duration: float | None, state_file: Path | None, workdir: Path | None,
              extra_args: Sequence[str] = (), out: TextIO = sys.stdout, prompt: str | None = None,
              max_new_tokens: int = 48, api_port: int | None = None, vehicle: str | None = None,
              faulty: str | None = None) -> int:
    """The ``idlefleet swarm`` command. Returns the exit code.

    With ``prompt``, once the swarm covers the model it generates text across it (showing the
    route), then stops unless a ``duration`` or an ``api_port`` was given. With ``api_port`` the
    first node serves the HTTP API and the dashboard on 127.0.0.1:``api_port``. With ``faulty``
    (``K[:KIND[:RATE]]``, test tooling) the last K nodes run with ``--chaos-fault KIND``.
    Raises ConfigError for a bad ``faulty``.
    """
    faulty_nodes = parse_faulty(faulty, n) if faulty is not None else {}
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="idlefleet-swarm-")
        workdir = Path(tmp.name)
    swarm = Swarm(n, workdir, extra_args, vehicles=None if vehicle is None else [vehicle] * n,
                  first_args=() if api_port is None else ("--api-port", str(api_port)),
                  faulty=faulty_nodes)
    live = out.isatty() and prompt is None
    started = time.monotonic()
    code = 0
    previous = _stop_on_signals()
    try:
        print(f"starting {n} node processes (logs in {workdir})", file=out, flush=True)
        swarm.start()
        if state_file is not None:
            write_json_atomic(state_file, swarm.state())
        if (line := swarm.faulty_summary()) is not None:
            print(line, file=out, flush=True)
        started = time.monotonic()
        code = 0
        url = None
        if api_port is not None:  # the URL the node reports (the real port, also for --api-port 0)
            url = (swarm.nodes[0].status() or {}).get("api_url", f"http://127.0.0.1:{api_port}")
            print(f"open {url}/ for the live dashboard (OpenAI-compatible API: {url}/v1)",
                  file=out, flush=True)
        if prompt is not None:
            code = generate_across(swarm, prompt, max_new_tokens, out)
            if duration is None and api_port is None:
                return code
        while duration is None or time.monotonic() - started < duration:
            table = render_table(swarm)
            elapsed = time.monotonic() - started
            if live:
                out.write("\x1b[H\x1b[2J")
            print(f"idlefleet swarm: {n} nodes, {elapsed:5.1f}s"
                  f"{'' if duration is None else f' of {duration:.0f}s'}  (Ctrl-C to stop)"
                  f"{'' if url is None else f'  open {url}/'}\n{table}\n",
                  file=out, flush=True)
            swarm.touch_vehicles()
            time.sleep(1.0 if live else 5.0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=out)
    except _Stopped as e:
        print(f"\nreceived {e}", file=out)
    except RuntimeError as e:
        print(f"swarm failed: {e}", file=sys.stderr)
        return 1
    finally:
        print("stopping every node ...", file=out, flush=True)
        codes = swarm.stop()
        print(f"stopped: exit codes {sorted(set(codes.values()), key=str)}", file=out, flush=True)
        if state_file is not None:
            state_file.unlink(missing_ok=True)
        if tmp is not None:
            tmp.cleanup()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


class _Stopped(Exception):
    """The launcher received SIGTERM or SIGHUP (a supervisor, CI, ``timeout``, a closed terminal)."""


def _stop_on_signals() -> dict[int, Any]:
    """Turn the first SIGTERM/SIGHUP into ``_Stopped`` (so ``run_swarm`` stops every node cleanly);
    a second one ends the launcher at once, and its nodes still leave (their lifeline closes)."""
    def handler(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        raise _Stopped(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # signal handlers can only be set from the main thread
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, handler)
    return previous
