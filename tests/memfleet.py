"""A fleet of real nodes in one process, on ``p2p.memory.MemoryNetwork`` and trio's virtual clock.

A test module defines a ``mem`` fixture returning ``virtual_world(tmp_path, monkeypatch)``; its
tests take ``autojump_clock`` and ``mem``:
``async with mem.fleet() as fleet: await fleet.start(3)`` starts
three full nodes (publisher, gossip intake, liveness, discovery, hosting, owner control, stage
server) bootstrapped off the first; ``mem.kill(i)`` / ``mem.network.freeze(peer)`` inject faults.

What makes it deterministic, and why each choice:

- **Virtual time everywhere.** The test runs under ``autojump_clock`` (``MockClock`` with an
  autojump threshold of 0: the clock jumps to the next deadline as soon as every task is blocked).
  Nodes also read the wall clock (``time.time``: record issue/expiry, consent, the publisher's
  minimum interval) and ``time.monotonic`` (dial back-off); both are patched for the test to
  follow trio's clock (``start + trio.current_time()``), so a record's 60 s TTL passes in
  virtual time exactly as its heartbeats do. ``time.perf_counter`` (measurements only) is left.
- **Compute inline on the loop.** Stage compute, block loading, the client's LM head, the
  verifier's re-computation and ledger writes go through ``trio.to_thread.run_sync``
  (node/model/batcher.py, node/serve/hosting.py and server.py, node/client/). With autojump a task
  waiting on a worker thread counts as blocked, so the clock would jump past every deadline while
  a thread computes a stage: steps "time out" at random. Under this fixture ``to_thread.run_sync``
  runs the function on the loop (after a checkpoint, under its limiter): compute then takes no
  virtual time at all, and no deadline can fire during it. An autojump *threshold* (jump only
  after N real ms idle) was rejected: it still depends on how fast the machine computes, i.e. on
  load, which is the flakiness this fixture exists to remove. A node/config knob was not needed:
  the client's threads (node/client/, not ours to edit) would have stayed.
- **No libp2p, no sockets**: NAT and mDNS are off (open_node's ``network``), so nothing waits on
  real I/O; the control socket is not opened (no data dir): owner tests call ``node.control``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from idlefleet.node.config import NodeConfig
from idlefleet.node.runtime.node import Node, open_node
from idlefleet.p2p.memory import MemoryNetwork

BUDGET_MB = 140  # MiB: ten 14.2 MB blocks, so three nodes cover SmolLM2's 30 blocks


def install_virtual_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``time.time``/``time.monotonic`` follow trio's clock inside a run (see the module doc)."""
    wall0, mono0 = time.time(), time.monotonic()
    base: list[float] = []  # trio's clock when first read (a MockClock starts anywhere)
    last = [0.0]

    def elapsed() -> float:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside the trio run (setup, teardown): time stands still
            return last[0]
        if not base:
            base.append(now)
        last[0] = now - base[0]
        return last[0]

    monkeypatch.setattr(time, "time", lambda: wall0 + elapsed())
    monkeypatch.setattr(time, "monotonic", lambda: mono0 + elapsed())


async def _run_inline(fn: Callable[..., Any], *args: Any, limiter: Any = None, **_: Any) -> Any:
    """``trio.to_thread.run_sync`` on the loop itself: no virtual time passes while it runs."""
    await trio.lowlevel.checkpoint()
    if limiter is None:
        return fn(*args)
    async with limiter:
        return fn(*args)


def install_inline_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio.to_thread, "run_sync", _run_inline)


FLEET_VIRTUAL_LIMIT_S = 900.0  # virtual seconds a test fleet may live (each test needs < 200)


class MemFleet:
    """Nodes on one ``MemoryNetwork``; each runs in its own task so that it can be killed."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, network: MemoryNetwork) -> None:
        self.tmp_path = tmp_path
        self.network = network
        self.nodes: list[Node] = []
        self._nursery = nursery
        self._scopes: dict[str, trio.CancelScope] = {}
        self._stop: dict[str, trio.Event] = {}
        self._count = 0

    def config(self, i: int, *, serve: bool = False, **overrides: Any) -> NodeConfig:
        """Node ``i``'s config: parked, consenting, bootstrapped off the first node."""
        fields: dict[str, Any] = {
            "key_file": self.tmp_path / f"n{i}.key", "vehicle": "sim:parked", "consent": True,
            "serve": serve, "event_log": self.tmp_path / f"n{i}.events.jsonl",
            "bootstrap": (self.nodes[0].multiaddrs[0],) if self.nodes else (),
        }
        if serve:
            fields.update(memory_budget_mb=BUDGET_MB, rebalance_s=5.0)
        fields.update(overrides)
        return NodeConfig(**fields)

    async def add(self, config: NodeConfig | None = None, **overrides: Any) -> Node:
        """Start one more node (``config``, or ``self.config(next index, **overrides)``)."""
        i = self._count
        self._count += 1
        cfg = config if config is not None else self.config(i, **overrides)
        node: Node = await self._nursery.start(self._run, cfg)
        self.nodes.append(node)
        return node

    async def start(self, n: int, **overrides: Any) -> list[Node]:
        return [await self.add(**overrides) for _ in range(n)]

    async def _run(self, config: NodeConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with open_node(config, network=self.network) as node:
                self._scopes[node.peer_id] = scope
                self._stop[node.peer_id] = stop = trio.Event()
                task_status.started(node)
                await stop.wait()

    def kill(self, node: Node) -> None:
        """SIGKILL: links end in EOF at once, the node's tasks stop without a goodbye."""
        self.network.kill(node.peer_id)
        self._scopes[node.peer_id].cancel()
        self.nodes.remove(node)

    def stop(self, node: Node) -> None:
        """A clean exit: the node publishes ``offline`` and leaves."""
        self._stop[node.peer_id].set()
        self.nodes.remove(node)


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 60.0, every: float = 0.1) -> float:
    """Poll ``predicate`` on virtual time; returns how long it took. Raises trio.TooSlowError."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(every)
    return trio.current_time() - started


class _Factory:
    """What the ``mem`` fixture yields: ``async with mem.fleet() as fleet`` (or ``mem.network``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def fleet(self, *, link_delay_s: float = 0.0) -> Any:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def _open() -> AsyncIterator[MemFleet]:
            # A wait that nothing will ever end does not hang on virtual time: the fleet's own
            # timers keep the clock jumping, so this deadline fires and names where it waits.
            # (A task that spins on checkpoints stops the clock instead: no deadline can fire.)
            with trio.fail_after(FLEET_VIRTUAL_LIMIT_S):
                async with trio.open_nursery() as nursery:
                    fleet = MemFleet(self.tmp_path, nursery, MemoryNetwork(link_delay_s=link_delay_s))
                    try:
                        yield fleet
                    finally:
                        # Every car off at once: links close while every node is still whole, so
                        # no node hears of a disconnection in the middle of its own shutdown.
                        for node in fleet.nodes:
                            fleet.network.kill(node.peer_id)
                        nursery.cancel_scope.cancel()

        return _open()


def virtual_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Factory:
    """For a test module's ``mem`` fixture: wall clocks follow trio's, compute runs inline (see
    the module doc). pytest-trio takes the clock only from the test's own arguments: a test using
    ``mem`` also asks for ``autojump_clock`` itself."""
    install_virtual_time(monkeypatch)
    install_inline_compute(monkeypatch)
    return _Factory(tmp_path)
