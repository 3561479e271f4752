"""One idlefleet node: identity, libp2p host, gossip of signed capacity records, liveness.

Embedding API::

    async with open_node(config) as node:
        await node.wait_for_peers(2)
        for record in node.fleet():
            print(record.peer_id, record.battery_soc)

On exit the node publishes ``offline`` (so peers drop it at once), then stops its host.

``Node`` owns the lifecycle (``starting`` -> ``running`` -> ``draining`` -> ``closing``,
``protocols.serving``) and the fleet view; one collaborator per job does the rest:
``publisher`` (our record), ``intake`` (records and notices from peers), ``entry`` (bootstrap and
connections), ``reports`` (misbehaviour reports), ``owner_desk`` (vehicle, owner policy, control
socket), ``discovery`` (the DHT), ``nat``, ``liveness`` and, when serving, ``hosting``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.config import NodeConfig
from idlefleet.node.faults import FaultInjector
from idlefleet.node.owner.control import DataDir, serve_control
from idlefleet.node.runtime.discovery import Discovery, DiscoveryConfig, dht_select, dht_validate
from idlefleet.node.runtime.entry import Entry
from idlefleet.node.runtime.events import EventLog
from idlefleet.node.runtime.intake import Intake
from idlefleet.node.runtime.owner_desk import OwnerDesk, open_owner, open_receipts
from idlefleet.node.runtime.publisher import Publisher
from idlefleet.node.runtime.reports import Reports
from idlefleet.node.runtime.status import STATUS_PROTOCOL, fetch_status, request_status, status_handler
from idlefleet.node.serve.hosting import BlockHosting, HostingConfig
from idlefleet.node.serve.server import ServerConfig
from idlefleet.node.vehicle.spec import make_provider
from idlefleet.node.vehicle.state import VehicleProvider
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.identity import load_or_create_key, peer_id_of, raw_public_key
from idlefleet.p2p.liveness import Liveness, LivenessConfig
from idlefleet.p2p.mdns import run_mdns
from idlefleet.p2p.nat import Nat
from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.fleet import FleetView
from idlefleet.protocols.gossip import capacity_topic
from idlefleet.protocols.membership import DialBudget, NoticeGate
from idlefleet.protocols.records import CapacityRecord
from idlefleet.protocols.reports import REPORT_TOPIC, Accusations
from idlefleet.protocols.serving import LIFECYCLE_STATE, Serving, serving_decision

if TYPE_CHECKING:
    from idlefleet.p2p.memory import MemoryNetwork

log = logging.getLogger(__name__)

ALONE_IN_REGION_S = 5.0  # a node with no peer on its region's topic goes online after this
__all__ = ["STATUS_PROTOCOL", "Node", "capacity_topic", "fetch_status", "open_node", "request_status"]


class Node:
    """A running node. Created by ``open_node``; its methods are the embedding API."""

    def __init__(self, config: NodeConfig, key: Ed25519PrivateKey, host: Host,
                 vehicle: VehicleProvider, nursery: trio.Nursery,
                 data_dir: DataDir | None = None) -> None:
        self.config = config
        self.peer_id = peer_id_of(key)
        self.public_key = raw_public_key(key)
        self.host = host
        self.vehicle = vehicle
        self.data_dir = data_dir
        self.view = FleetView()
        self.topic = capacity_topic(config.region)
        self.lifecycle = "starting"  # protocols.serving.LIFECYCLES; only Node changes it
        self.hosting: BlockHosting | None = None  # owns blocks, model_id, load when serving
        self.fault: FaultInjector | None = None  # test tooling (--chaos-fault), set by open_node
        self._key = key
        self._nursery = nursery
        self._started = time.time()
        self._changed = trio.Event()
        self._events = EventLog(config.events_path)
        # The one owner of "may this node serve now" (consent, battery, driving, thermal, ...).
        self.owner = open_owner(config, key, data_dir, now=self._started, event=self.event,
                                on_change=self.request_publish)
        self.ledger, self.receipts = open_receipts(key, self.peer_id, data_dir)
        self.owner_desk = OwnerDesk(self)
        self.intake = Intake(self)
        self.reports = Reports(self)
        self.entry = Entry(self)
        self.publisher = Publisher(self)
        self.discovery = Discovery(self, DiscoveryConfig(
            refresh_s=config.dht_refresh_s, peers_file=config.peers_file and config.peers_file.expanduser()))
        # Reachability (AutoNAT) and, when we cannot be dialled, a relay slot (p2p/nat.py).
        self.nat = Nat(host, config.nat_config, self.entry.relay_candidates, self.request_publish)
        self.liveness = Liveness(host, self.intake.on_peer_dead, LivenessConfig(
            interval_s=config.heartbeat_s, timeout_s=config.heartbeat_timeout_s,
            misses=config.heartbeat_misses), on_alive=self.intake.on_peer_alive)

    # -- embedding API ---------------------------------------------------------------------------
    @property
    def multiaddrs(self) -> list[str]:
        return self.host.multiaddrs()

    def fleet(self) -> list[CapacityRecord]:
        """The current validated view: every peer considered alive (this node included)."""
        return [e.record for e in self.view.alive(time.time())]

    def routable(self) -> list[CapacityRecord]:
        """Live peers this node completed a liveness round trip with (and itself): records earn
        routability, a signed record alone proves only that someone holds a key. Which of them may
        carry a hop is ``protocols.serving.peer_usable(record, "route", ...)``."""
        measured = self.liveness.min_rtt_s
        return [r for r in self.fleet() if r.peer_id in measured or r.peer_id == self.peer_id]

    async def wait_for_peers(self, n: int, *, timeout: float = 30.0) -> list[CapacityRecord]:
        """Wait until at least ``n`` other peers are alive in the view. Raises trio.TooSlowError."""
        with trio.fail_after(timeout):
            while True:
                others = [r for r in self.fleet() if r.peer_id != self.peer_id]
                if len(others) >= n:
                    return others
                await self._wait_changed(1.0)

    async def wait_for(self, predicate: Callable[[list[CapacityRecord]], Any], *,
                       timeout: float = 30.0) -> None:
        """Wait until ``predicate(fleet)`` is true. Raises trio.TooSlowError."""
        with trio.fail_after(timeout):
            while not predicate(self.fleet()):
                await self._wait_changed(1.0)

    def statistics(self) -> dict[str, Any]:
        now = time.time()
        return {
            "peer_id": self.peer_id,
            "state": self.state,
            "alive": len(self.view.alive(now)),
            "connected": len(self.host.connected_peers()),
            "published": self.host.stats.gossip_published,
            "rejected": dict(self.rejected),
            "evictions": self.host.stats.evictions,
            "misbehaviour": self.host.misbehaviour.statistics(),  # per reason, worst peers
            "seq": self.publisher.seq,
            "policy": None if self.owner.decision is None else self.owner.decision.action,
            "accused": {p: round(until - now, 1) for p, until in self.accusations.accused(now).items()},
            "nat": self.nat.statistics(),
        }

    # What this node serves: owned and published by its hosting component (None: serves nothing).
    @property
    def blocks(self) -> tuple[int, int] | None:
        return self.hosting.blocks if self.hosting is not None else None

    @property
    def model_id(self) -> str:
        return self.hosting.model_id if self.hosting is not None else ""

    @property
    def load(self) -> float:
        return self.hosting.load if self.hosting is not None else 0.0

    @property
    def nursery(self) -> trio.Nursery:
        """The node's own nursery: tasks started here end when the node stops."""
        return self._nursery

    @property
    def key(self) -> Ed25519PrivateKey:
        """This node's Ed25519 identity: it signs records, step commitments and reports."""
        return self._key

    @property
    def state(self) -> str:
        """The lifecycle in the record's words: joining, online, draining or offline."""
        return LIFECYCLE_STATE[self.lifecycle]

    def serving(self) -> Serving:
        """What this node announces and whether its stage servers admit work now (their gate):
        ``protocols.serving.serving_decision`` of the lifecycle, the owner's decision and hosting."""
        return serving_decision(self.lifecycle, self.owner.decision, hosting_readiness(self.hosting))

    def advance_lifecycle(self, now: float) -> None:
        """``starting`` -> ``running`` once the blocks (if any) are served and someone will hear
        us: the "online" record is then published into a formed topic, so every node learns of us
        without waiting for a refresh. The first node of a region has no topic peers: clients find
        it through the DHT."""
        if self.lifecycle == "starting" and (self.hosting is None or self.hosting.ready) and (
                not self.config.bootstrap or self.host.gossip_peers(self.topic)
                or now - self._started > ALONE_IN_REGION_S):
            self.lifecycle = "running"

    async def drain(self, timeout: float = 15.0) -> None:
        """Announce ``draining``: no new sessions; clients move theirs; wait (bounded) for them."""
        if self.lifecycle in ("draining", "closing"):
            return
        self.lifecycle = "draining"
        await self.publish_record("state")
        if self.hosting is not None:
            await self.hosting.drain(timeout)

    def request_publish(self) -> None:
        """Publish a fresh record soon (e.g. after the hosted blocks changed)."""
        self.publisher.request()

    async def publish_record(self, reason: str) -> CapacityRecord:
        """Sign and gossip a fresh record now; also store it in the DHT (``Discovery``)."""
        return await self.publisher.publish(reason)

    async def report_misbehaviour(self, report: bytes) -> None:
        """Act on a misbehaviour report this node's client made (``Reports.report``)."""
        await self.reports.report(report)

    def accept_relayed(self, raw: bytes) -> CapacityRecord | None:
        """Accept a record relayed by a third party (status reply, DHT) if it validates and is
        newer than ours. Returns it, or None if it was rejected."""
        return self.intake.accept_relayed(raw)

    def connect_soon(self, record: CapacityRecord) -> None:
        """Connect to the peer of ``record`` in the background if we want more connections."""
        self.entry.connect_soon(record)

    def evaluate_policy(self, now: float) -> bool:
        """Read the vehicle and let the owner policy decide (``OwnerDesk.evaluate_policy``)."""
        return self.owner_desk.evaluate_policy(now)

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one owner control request (``idlefleet owner ...`` over the control socket)."""
        return self.owner_desk.control(request, time.time())

    def owner_status(self, now: float) -> dict[str, Any]:
        return self.owner_desk.status(now)

    def event(self, event: str, **fields: Any) -> None:
        """Append one event to the node's JSON-lines event log (the owner's audit trail)."""
        self._events.write(event, **fields)

    def notify_changed(self) -> None:
        """The view changed: wake ``wait_for`` / ``wait_for_peers``."""
        self._changed.set()
        self._changed = trio.Event()

    # Counters and state published by the collaborators that own them.
    @property
    def rejected(self) -> Counter[str]:
        return self.intake.rejected

    @property
    def gossip_accepted(self) -> int:
        return self.intake.accepted

    @property
    def notices(self) -> NoticeGate:
        return self.intake.notices

    @property
    def accusations(self) -> Accusations:
        return self.reports.accusations

    @property
    def dials(self) -> DialBudget:
        return self.entry.dials

    @property
    def _seq(self) -> int:  # tests/test_dht.py reads the last sequence number published
        return self.publisher.seq

    # -- internals -------------------------------------------------------------------------------
    async def _wait_changed(self, at_most: float) -> None:
        with trio.move_on_after(at_most):
            await self._changed.wait()

    async def _maintain(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Every few seconds: forget expired state; keep enough connections (re-bootstrap)."""
        task_status.started()
        while True:
            await trio.sleep(2.0)
            now = time.time()
            before = {e.record.peer_id for e in self.view.alive(now)}
            self.view.prune(now)
            self.notices.prune(now)
            self.reports.prune(now)
            for gone in before - {e.record.peer_id for e in self.view.alive(now)}:
                self.event("peer_expired", peer=gone)
                self.notify_changed()
            if not self.host.connected_peers():
                await self.entry.bootstrap(quiet=True)

    async def _goodbye(self) -> None:
        """Publish ``offline`` so peers drop us now rather than at record expiry."""
        self.lifecycle = "closing"
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await self.publish_record("state")
            await trio.sleep(0.2)  # let the message leave before the sockets close

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        self._events.close()


def hosting_readiness(hosting: BlockHosting | None) -> str:
    """``protocols.serving.HOSTING`` of ``hosting``: ``ready`` while a stage server serves the
    announced range (blocks claimed but still loading, or unloaded: ``loading``)."""
    if hosting is None:
        return "none"
    return "loading" if hosting.server is None else "ready"


def _hosting_config(config: NodeConfig, fault: FaultInjector | None) -> HostingConfig:
    return HostingConfig(
        model=config.model, memory_budget_mb=config.memory_budget_mb, rebalance_s=config.rebalance_s,
        server=ServerConfig(max_sessions=config.max_sessions,
                            kv_budget_bytes=int(config.kv_budget_mb * 1024 * 1024),
                            idle_timeout_s=config.session_idle_s),
        unload_grace_s=config.unload_grace_s, fault=fault)


async def _start(node: Node, nursery: trio.Nursery, *, libp2p: bool = True) -> None:
    """Register the node's protocols and topics, join the fleet and start every component
    (NAT traversal and mDNS only over libp2p: an in-memory host has neither)."""
    config, host = node.config, node.host
    if node.fault is not None:
        log.warning("CHAOS FAULT ON: this node returns WRONG outputs (%s on %.0f%% of steps); "
                    "test tooling, never for real use", node.fault.kind, node.fault.rate * 100)
        node.event("chaos_fault", kind=node.fault.kind, rate=node.fault.rate)
    node.evaluate_policy(time.time())  # reported at start-up: e.g. an unknown vehicle state
    if node.data_dir is not None:
        await nursery.start(serve_control, node.data_dir.socket, node.control)
    host.register_dht_namespace("idlefleet", dht_validate, dht_select)
    host.set_request_handler(STATUS_PROTOCOL, "status_request", status_handler(node.view))
    await host.subscribe(node.topic, node.intake.on_gossip, still_current=node.intake.still_current)
    await host.subscribe(REPORT_TOPIC, node.reports.on_gossip, still_current=node.reports.still_current)
    await node.entry.bootstrap()
    if config.mdns and libp2p:  # peers on the LAN, no bootstrap needed (p2p/mdns.py)
        await nursery.start(partial(run_mdns, host, node.entry.on_lan_peer))
    if libp2p:
        await nursery.start(node.nat.run)
    await nursery.start(node.liveness.run)
    await nursery.start(node.discovery.run)
    await nursery.start(node.publisher.run)
    await nursery.start(node._maintain)
    node.request_publish()
    # Loads and serves blocks only while the owner policy allows it. Without consent at start and
    # without a data dir (no control socket: consent cannot arrive later) there is nothing to
    # host: an embedded client node stays out of it.
    if config.serve and (config.consent or node.data_dir is not None):
        node.hosting = BlockHosting(node, _hosting_config(config, node.fault))
        await nursery.start(node.hosting.run)


@asynccontextmanager
async def open_node(config: NodeConfig, *, key: Ed25519PrivateKey | None = None,
                    network: MemoryNetwork | None = None) -> AsyncIterator[Node]:
    """Start a node: load (or create) its key, start the host, join the fleet, begin gossiping.

    With ``network`` the host is an in-memory one (p2p/memory.py: tests on virtual time); NAT
    traversal and mDNS, which need libp2p, are off there.

    Raises ConfigError for bad configuration or key files. Returns once the node is listening and
    has tried its bootstrap peers; the node stops (publishing ``offline``) when the block exits.
    """
    try:  # before the key: a bad vehicle spec must not leave a new identity behind
        vehicle = make_provider(config.vehicle, now=time.time())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Test tooling: refused (ConfigError) unless IDLEFLEET_CHAOS=yes is in the environment too.
    fault = FaultInjector(config.chaos_fault) if config.chaos_fault is not None else None
    data_dir = DataDir.open(config.data_dir) if config.data_dir is not None else None
    if key is None:
        key, created = load_or_create_key(config.key_path)
        if created:
            log.info("created a new identity in %s", config.key_path)
    # The host: the node's one libp2p endpoint.
    host_config = HostConfig(listen_host=config.listen_host, port=config.port)
    # A MemoryHost offers Host's public surface without being one (tests/test_mem_network.py).
    opened = (open_host(key, host_config) if network is None
              else cast(Any, network.open_host(key, host_config)))
    async with opened as host, trio.open_nursery() as nursery:
        node = Node(config, key, host, vehicle, nursery, data_dir)
        node.fault = fault
        try:
            await _start(node, nursery, libp2p=network is None)
            yield node
            node.discovery.save_peers()
            await node._goodbye()
        finally:
            nursery.cancel_scope.cancel()
            node.close()
