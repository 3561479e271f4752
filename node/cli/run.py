"""Running one node as an OS process: signals, logging, and a status file for supervisors."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from idlefleet.node.cli.procs import lifeline_fd
from idlefleet.node.config import NodeConfig
from idlefleet.node.files import write_json_atomic
from idlefleet.node.runtime.node import Node, open_node

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def node_status(node: Node) -> dict[str, Any]:
    """What a supervisor (``idlefleet swarm``) shows about this node."""
    me = node.view.get(node.peer_id)
    rec = me.record if me else None
    server = node.hosting.server if node.hosting is not None else None
    return {
        "peer_id": node.peer_id,
        "multiaddr": node.multiaddrs[0],
        "pid": os.getpid(),
        "time": time.time(),
        "state": rec.state if rec else "joining",
        "battery_soc": rec.battery_soc if rec else None,
        "plugged_in": rec.plugged_in if rec else None,
        "peers_known": len(node.fleet()) - 1,
        "connected": len(node.host.connected_peers()),
        "rejected": sum(node.rejected.values()),
        "model_id": node.model_id,
        "blocks": list(node.blocks) if node.blocks else None,
        "policy": rec.policy if rec else None,
        "policy_reason": rec.policy_reason if rec else None,
        # Test tooling (--chaos-fault): the fault and how many steps it falsified so far.
        "chaos_fault": node.config.chaos_fault,
        "faulted": node.fault.faulted if node.fault is not None else 0,
        "reachability": node.nat.status,
        "relayed_addrs": list(node.nat.relayed_addrs),
        "relayed_peers": sorted(node.host.relayed_peers()),
        "nat": node.nat.statistics(),  # relay, hole punching and relayed-bytes counters
        # Stage serving since start: steps / batches is the mean batch size of the step batcher.
        "serving": None if server is None else {
            "sessions": server.active_sessions, "steps": server.stats.steps,
            "tokens": server.stats.tokens, "batches": server.stats.batches,
            "batch_sizes": {str(k): v for k, v in sorted(server.stats.batch_sizes.items())},
            "compute_s": round(server.stats.compute_s, 3),
            "gather_s": round(server.batch_gather_s, 3),  # batch leaders' waits for batch-mates
            # Chaining: steps forwarded to the next hop (in relay_frames frames: several steps
            # ready together share one), chained steps that failed here, and relayed steps
            # dropped unanswered (by reason: unknown session, stale, malformed).
            "relayed": server.stats.relayed, "chain_failed": server.stats.chain_failed,
            "relay_frames": node.hosting.relay.frames if node.hosting is not None else 0,
            "relay_dropped": dict(server.stats.relay_dropped)},
    }


async def run_node(config: NodeConfig, *, status_file: Path | None = None,
                   status_interval_s: float = 1.0, drain_s: float = 8.0, api_port: int | None = None) -> None:
    """Run until SIGINT/SIGTERM/SIGHUP (or the launcher's lifeline closes), then leave cleanly:
    drain (sessions move elsewhere), publish
    ``offline``, stop. A signal during start-up stops the node as soon as it is up; a second
    signal cuts the drain short. With ``api_port`` the node also serves the HTTP API, dashboard
    and metrics on 127.0.0.1 (``node.api``)."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as outer:
            drain_scope = trio.CancelScope()

            async def _watch_signals() -> None:
                async for signum in signals:
                    if stop.is_set():
                        drain_scope.cancel()
                        continue
                    log.info("received %s: draining, then leaving the fleet",
                             signal.Signals(signum).name)
                    stop.set()

            outer.start_soon(_watch_signals)
            lifeline = lifeline_fd()
            if lifeline is not None:
                outer.start_soon(_watch_lifeline, lifeline, stop)
            async with open_node(config) as node, trio.open_nursery() as nursery:
                log.info("node %s listening on %s", node.peer_id, " ".join(node.multiaddrs))
                extra = {}
                if api_port is not None:
                    from idlefleet.node.api.server import ApiConfig, serve_node_api

                    extra["api_url"] = await nursery.start(serve_node_api, node, ApiConfig(port=api_port),
                                                           config.model)
                nursery.start_soon(_write_status, node, status_file, status_interval_s, extra)
                await stop.wait()
                with drain_scope, trio.move_on_after(drain_s):
                    await node.drain(timeout=drain_s)
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    if status_file is not None:
        with contextlib.suppress(FileNotFoundError):
            await trio.Path(status_file).unlink()


async def _watch_lifeline(fd: int, stop: trio.Event) -> None:
    """Leave the fleet (as on SIGTERM) once the process that started us is gone: the write end of
    the lifeline pipe (``node.procs``) closes when it ends, however it ends."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            continue
        except OSError as e:
            log.warning("lifeline fd %d unusable (%s); not watching the launcher", fd, e)
            return
        if not data:
            break
    if not stop.is_set():
        log.info("the process that started this node is gone: draining, then leaving the fleet")
        stop.set()


async def _write_status(node: Node, status_file: Path | None, interval_s: float,
                        extra: dict[str, Any] | None = None) -> None:
    while True:
        if status_file is not None:
            write_json_atomic(status_file, {**node_status(node), **(extra or {})})
        await trio.sleep(interval_s)
