"""One idlefleet node: identity, libp2p host, gossip of signed capacity records, liveness.

Embedding API::

    async with open_node(config) as node:
        await node.wait_for_peers(2)
        for record in node.fleet():
            print(record.peer_id, record.battery_soc)

On exit the node publishes ``offline`` (so peers drop it at once), then stops its host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO, cast

import numpy as np
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.config import NodeConfig
from idlefleet.node.faults import FaultInjector
from idlefleet.node.owner.control import (
    ConsentLog,
    DataDir,
    OwnerControl,
    credits_report,
    grant_expiry,
    owner_report,
    serve_control,
    vehicle_reading,
)
from idlefleet.node.owner.ledger import Ledger, ReceiptDesk
from idlefleet.node.runtime.discovery import Discovery, DiscoveryConfig
from idlefleet.node.serve.hosting import BlockHosting, HostingConfig, available_memory_mb
from idlefleet.node.vehicle.providers import VehicleProvider, VehicleState, make_provider
from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.guard import TokenBuckets
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.p2p.identity import load_or_create_key, peer_id_of, raw_public_key
from idlefleet.p2p.liveness import Liveness, LivenessConfig
from idlefleet.p2p.mdns import run_mdns
from idlefleet.p2p.nat import Nat
from idlefleet.protocols import dhtkeys, wire
from idlefleet.protocols.errors import ConfigError, RecordRejected, RemoteProtocolError
from idlefleet.protocols.fleet import FleetView
from idlefleet.protocols.gossip import (
    PEER_DOWN_KIND,
    NoticeGossip,
    RecordGossip,
    capacity_topic,
    check_gossip,
    claimed_peer,
    still_current,
)
from idlefleet.protocols.membership import FORWARD, DialBudget, NoticeGate
from idlefleet.protocols.messages import (
    MAX_STATUS_RECORDS,
    StatusRequest,
    StatusResponse,
    message_from_envelope,
)
from idlefleet.protocols.notices import PeerDownNotice, encode_notice, notice_reason
from idlefleet.protocols.publish import PublishPolicy, should_publish
from idlefleet.protocols.receipts import verify_report
from idlefleet.protocols.records import CapacityRecord, encode_signed, record_to_dict, validate_record
from idlefleet.protocols.reports import (
    REPORT_TOPIC,
    Accusations,
    check_report_gossip,
    encode_report_gossip,
    report_digest,
    report_still_current,
)

if TYPE_CHECKING:
    from idlefleet.p2p.memory import MemoryNetwork

log = logging.getLogger(__name__)

STATUS_PROTOCOL = "/idlefleet/status/1.0.0"
BOOTSTRAP_TIMEOUT_S = 5.0  # one entry point: connect and status reply
MAX_ENTRY_POINTS = 16  # saved peers tried at once besides the configured bootstrap addresses
ALONE_IN_REGION_S = 5.0  # a node with no peer on its region's topic goes online after this
# Misbehaviour reports: each reporter may have 3 reports accepted at once and 1 more per 10 minutes
# (catching a cheat is rare; a reporter accusing many peers is itself suspect); report digests are
# remembered for a day (bounded), so a report is applied once however often it is replayed.
REPORT_BURST = 3.0
REPORT_RATE_PER_S = 1 / 600
REPORT_MEMORY_S = 86400.0
MAX_REPORTS_REMEMBERED = 4096
__all__ = ["STATUS_PROTOCOL", "Node", "capacity_topic", "fetch_status", "open_node", "request_status"]


def dht_record_key(peer_id: str) -> str:
    """DHT key under which a node stores its latest signed record (namespace ``idlefleet``)."""
    return dhtkeys.record_key(peer_id)


def measure_compute_gflops(size: int = 256, repeats: int = 5) -> float:
    """A quick fp32 matmul benchmark (~10 ms): this device's compute estimate, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return round(2 * size**3 / max(best, 1e-9) / 1e9, 2)


#: What a record says while no vehicle state was ever read (its policy says vehicle_unknown).
UNKNOWN_VEHICLE = VehicleState(battery_soc=0.0, plugged_in=False, charging_kw=0.0, thermal_headroom_c=0.0,
                               parked=False, parked_since=None, expected_departure=None)


class Node:
    """A running node. Created by ``open_node``; its methods are the embedding API."""

    def __init__(self, config: NodeConfig, key: Ed25519PrivateKey, host: Host,
                 vehicle: VehicleProvider, nursery: trio.Nursery,
                 data_dir: DataDir | None = None) -> None:
        self.config = config
        self.peer_id = peer_id_of(key)
        self.host = host
        self.vehicle = vehicle
        self.view = FleetView()
        self.rejected: Counter[str] = Counter()
        self.gossip_accepted = 0  # gossip messages from peers that passed validation
        self._key = key
        self._public_key = raw_public_key(key)
        self._nursery = nursery
        self.hosting: BlockHosting | None = None  # owns blocks, model_id, load when serving
        self.fault: FaultInjector | None = None  # test tooling (--chaos-fault), set by open_node
        self._state = "joining"
        self._last_record: CapacityRecord | None = None
        self._last_vehicle: VehicleState | None = None
        self._vehicle_error = ""
        self._seq = 0
        self._started = time.time()
        self._compute_gflops = measure_compute_gflops()
        self._changed = trio.Event()
        self._publish_now = trio.Event()
        self._topic = capacity_topic(config.region)
        self._policy = PublishPolicy(refresh_s=config.refresh_s, naive=config.publish_policy == "naive")
        self._events: TextIO | None = None
        events = config.events_path
        if events is not None:
            events.parent.mkdir(parents=True, exist_ok=True)
            self._events = open(events, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.discovery = Discovery(self, DiscoveryConfig(refresh_s=config.dht_refresh_s,
                                                         peers_file=config.peers_file and
                                                         config.peers_file.expanduser()))
        # Reachability (AutoNAT) and, when we cannot be dialled, a relay slot (p2p/nat.py).
        self.nat = Nat(host, config.nat_config, self._relay_candidates, self.request_publish)
        self.notices = NoticeGate(self.peer_id)
        # Misbehaviour reports (protocols/reports.py): who is accused, reports already applied
        # (digest -> when), and each reporter's budget (a reporter accusing many peers is suspect).
        self.accusations = Accusations()
        self._reports_seen: OrderedDict[bytes, float] = OrderedDict()
        self._report_budget = TokenBuckets(REPORT_RATE_PER_S, REPORT_BURST)
        self.dials = DialBudget()
        # The one owner of "may this node serve now" (consent, battery, driving, thermal, ...).
        self.data_dir = data_dir
        self.owner = OwnerControl(
            config.preferences,
            ConsentLog(data_dir.consent_log, key) if data_dir is not None else None,
            event=self.event)
        if config.consent:  # consent given on the command line / config file: log it
            self.owner.grant(self._started, grant_expiry(self._started, config.consent_hours, None),
                             by="node --consent")
        self.owner.on_change = self.request_publish  # later changes publish at once
        # Signed work receipts, both as a server and as a client (DATA_DIR/ledger.sqlite).
        self.ledger = open_ledger(data_dir) if data_dir is not None else None
        self.receipts = ReceiptDesk(key, self.peer_id, self.ledger)
        self.liveness = Liveness(host, self._on_peer_dead, LivenessConfig(
            interval_s=config.heartbeat_s, timeout_s=config.heartbeat_timeout_s,
            misses=config.heartbeat_misses), on_alive=self._on_peer_alive)

    # -- embedding API ---------------------------------------------------------------------------
    @property
    def multiaddrs(self) -> list[str]:
        return self.host.multiaddrs()

    def fleet(self) -> list[CapacityRecord]:
        """The current validated view: every peer considered alive (this node included)."""
        return [e.record for e in self.view.alive(time.time())]

    def routable(self) -> list[CapacityRecord]:
        """Live peers this node completed a liveness round trip with (and itself): records earn
        routability, a signed record alone proves only that someone holds a key."""
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

    async def wait_for(self, predicate: Any, *, timeout: float = 30.0) -> None:
        """Wait until ``predicate(fleet)`` is true. Raises trio.TooSlowError."""
        with trio.fail_after(timeout):
            while not predicate(self.fleet()):
                await self._wait_changed(1.0)

    def statistics(self) -> dict[str, Any]:
        now = time.time()
        return {
            "peer_id": self.peer_id,
            "state": self._state,
            "alive": len(self.view.alive(time.time())),
            "connected": len(self.host.connected_peers()),
            "published": self.host.stats.gossip_published,
            "rejected": dict(self.rejected),
            "evictions": self.host.stats.evictions,
            "misbehaviour": self.host.misbehaviour.statistics(),  # per reason, worst peers
            "seq": self._seq,
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
    def state(self) -> str:
        return self._state

    async def drain(self, timeout: float = 15.0) -> None:
        """Announce ``draining``: no new sessions; clients move theirs; wait (bounded) for them."""
        if self._state in ("draining", "offline"):
            return
        self._state = "draining"
        await self.publish_record("state")
        if self.hosting is not None:
            await self.hosting.drain(timeout)

    def request_publish(self) -> None:
        """Publish a fresh record soon (e.g. after the hosted blocks changed)."""
        self._publish_now.set()

    # -- internals -------------------------------------------------------------------------------
    async def _wait_changed(self, at_most: float) -> None:
        with trio.move_on_after(at_most):
            await self._changed.wait()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def event(self, event: str, **fields: Any) -> None:
        """Append one event to the node's JSON-lines event log (the owner's audit trail)."""
        if self._events is not None:
            self._events.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")

    def _next_seq(self) -> int:
        # Milliseconds since the epoch: monotonic across restarts with the same key, so peers that
        # remember our last sequence number do not reject us as a replay after a reboot.
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        return self._seq

    def _build_record(self, now: float, vehicle: VehicleState) -> CapacityRecord:
        grant = self.owner.consent()
        consent = grant.active(now)
        decision = self.owner.decision
        policy, reason = (decision.action, decision.reason) if decision else ("stop", "starting")
        state = self._state
        if state == "online" and self.hosting is not None:
            if self.hosting.server is None:
                state = "joining"  # (re)loading blocks: not routable until they are served
            elif policy != "serve":
                state = "draining"  # the owner's policy says no new sessions
        # Relayed addresses first: a node advertises them only when it cannot be dialled.
        addrs = tuple(self.nat.relayed_addrs + [a.split("/p2p/")[0] for a in self.host.multiaddrs()])[:8]
        return CapacityRecord(
            peer_id=self.peer_id, public_key=self._public_key, addrs=addrs,
            region=self.config.region, state=state,
            battery_soc=vehicle.battery_soc, plugged_in=vehicle.plugged_in,
            charging_kw=vehicle.charging_kw, thermal_headroom_c=vehicle.thermal_headroom_c,
            parked_since=vehicle.parked_since, expected_departure=vehicle.expected_departure,
            consent=consent, consent_expires=grant.expires_at if consent else None,
            link_kind=self.config.link_kind, link_metered=self.config.link_metered,
            compute_gflops=self._compute_gflops, free_memory_mb=available_memory_mb(),
            load=min(1.0, max(0.0, self.load)), model_id=self.model_id, blocks=self.blocks,
            seq=self._seq, issued_at=now, expires_at=now + self.config.record_ttl_s,
            policy=policy, policy_reason=reason,
        )

    @property
    def key(self) -> Ed25519PrivateKey:
        """This node's Ed25519 identity: it signs records, step commitments and reports."""
        return self._key

    async def report_misbehaviour(self, report: bytes) -> None:
        """Act on a misbehaviour report this node's client made (``MisbehaviourReport.encode``):
        check it as any receiver would, lower the accused in our own routing, and gossip it on
        ``REPORT_TOPIC`` (docs/PROTOCOL.md section 7.5). A report that does not verify is our own
        bug: logged, not sent. Never raises for a failed publish (logged; peers learn nothing)."""
        now = time.time()
        try:
            parsed, accused = verify_report(report)
        except RemoteProtocolError as e:
            log.error("not reporting misbehaviour: our own report does not verify: %s", e)
            return
        if parsed.reporter != self.peer_id:
            log.error("not reporting misbehaviour: the report is signed by %s, not by us", parsed.reporter)
            return
        digest = report_digest(report)
        if self._seen_report(digest):
            return  # already reported (and gossiped)
        self._remember_report(digest, now)
        self._apply_report(accused, parsed.reporter, now)
        try:
            await self.host.publish(REPORT_TOPIC, encode_report_gossip(report, self._key, now))
        except (NetworkError, trio.TooSlowError) as e:
            log.warning("gossiping a misbehaviour report about %s failed: %s", accused[-8:], e)

    def _seen_report(self, digest: bytes) -> bool:
        seen = self._reports_seen.get(digest)
        return seen is not None and time.time() - seen < REPORT_MEMORY_S

    def _remember_report(self, digest: bytes, now: float) -> None:
        self._reports_seen[digest] = now
        while len(self._reports_seen) > MAX_REPORTS_REMEMBERED:
            self._reports_seen.popitem(last=False)

    def _apply_report(self, accused: str, reporter: str, now: float) -> None:
        """Lower ``accused`` in this node's routing (``accusations``); about ourselves: log only."""
        if accused == self.peer_id:
            log.warning("peer %s reports that this node returned wrong outputs (verified evidence); "
                        "check this device's model file and hardware", reporter[-8:])
            self.event("accused_us", by=reporter)
            return
        reporters = self.accusations.accuse(accused, reporter, now)
        until = self.accusations.until(accused, now)
        log.warning("peer %s accused of wrong outputs by %s (%d reporter(s)): avoided in routing",
                    accused[-8:], reporter[-8:], reporters)
        self.event("peer_accused", peer=accused, by=reporter, reporters=reporters, until=until)

    def _on_report_gossip(self, origin: str, data: bytes) -> bool:
        """Validator of ``REPORT_TOPIC`` (``protocols.reports.check_report_gossip``): only fully
        verified, fresh, first-seen reports within their reporter's budget are applied and forwarded."""
        if origin == self.peer_id:
            return True  # our own (report_misbehaviour applied it already)
        now = time.time()
        try:
            gossip = check_report_gossip(data, origin, now, seen=self._seen_report,
                                         budget=self._report_budget.take)
        except RecordRejected as e:
            self._count_rejection(f"report_{e.reason}", origin, str(e))
            return False
        if gossip is None:
            return False  # a copy of a report already applied: not an attack, not forwarded
        self._remember_report(gossip.digest, now)
        self._apply_report(gossip.accused, gossip.report.reporter, now)
        self.gossip_accepted += 1
        return True

    async def publish_record(self, reason: str) -> CapacityRecord:
        """Sign and gossip a fresh record now; also store it in the DHT (``Discovery``)."""
        now = time.time()
        vehicle = self._last_vehicle or UNKNOWN_VEHICLE
        record = dataclasses.replace(self._build_record(now, vehicle), seq=self._next_seq())
        raw = encode_signed(record, self._key)
        self.view.accept(record, raw, now)
        self.view.mark_verified(self.peer_id, now)
        self._last_record = record
        envelope = wire.encode_envelope("capacity", {"record": raw})
        try:
            await self.host.publish(self._topic, envelope)
        except (NetworkError, trio.TooSlowError) as e:
            log.warning("publishing our record failed: %s", e)
        self.event("published", seq=record.seq, reason=reason, battery_soc=record.battery_soc,
                    state=record.state)
        self._notify_changed()
        self.discovery.record_published(record.seq, raw)  # every record: the DHT copy stays fresh
        return record

    def _on_gossip(self, origin: str, data: bytes) -> bool:
        """Topic validator: ``_validate_gossip``, counting what it accepts from peers."""
        accepted = self._validate_gossip(origin, data)
        self.gossip_accepted += accepted and origin != self.peer_id
        return accepted

    def _validate_gossip(self, origin: str, data: bytes) -> bool:
        """Topic validator: only valid, fresh, correctly attributed messages enter the view and
        get forwarded (``protocols.gossip.check_gossip``). Every rejection is counted by reason."""
        if origin == self.peer_id:
            return True
        now = time.time()
        try:
            message = check_gossip(data, origin, self.peer_id, now, last_seq=self.view.last_seq,
                                   held=self._held_raw)
        except RecordRejected as e:
            self._count_rejection(e.reason, origin, str(e))
            return False
        if message is None:
            return False  # a duplicate (gossip replays its cache to new peers): not an attack
        if isinstance(message, RecordGossip):
            return self._take_record(message, origin, now)
        assert isinstance(message, NoticeGossip)
        return self._take_notice(message.notice, now)

    def _held_raw(self, peer_id: str) -> bytes | None:
        entry = self.view.get(peer_id)
        return None if entry is None else entry.raw

    def _take_record(self, message: RecordGossip, origin: str, now: float) -> bool:
        record = message.record
        was_alive = self.view.is_alive(record.peer_id, now)
        self.view.accept(record, message.raw, now)
        if self.view.get(record.peer_id) is None:
            self._count_rejection("view_full", origin, "fleet view full of live, verified peers")
            return False
        if not was_alive:
            self.event("peer_up", peer=record.peer_id, seq=record.seq)
        self.event("record", peer=record.peer_id, seq=record.seq,
                   battery_soc=record.battery_soc, state=record.state)
        self._notify_changed()
        self._maybe_connect(record)
        return True

    def _take_notice(self, notice: PeerDownNotice, now: float) -> bool:
        """A peer-down notice is a hint: rate-limited per reporter, checked before believed."""
        verdict, _ = self.notices.on_notice(notice.reporter, notice.subject, notice.subject_seq,
                                             now, last_seen_seq=self.view.last_seq(notice.subject))
        if verdict == "rate_limited":
            self._count_rejection("rate_limited", notice.reporter, "too many peer-down notices")
        elif verdict == "refute":
            log.info("peer %s reported us dead (%s); refuting", notice.reporter[-8:], notice.reason)
            self._publish_now.set()  # the publisher keeps its minimum interval
        elif verdict == "check":
            self._nursery.start_soon(self._check_notice, notice)
        return verdict in FORWARD

    async def _check_notice(self, notice: PeerDownNotice) -> None:
        """Probe the subject (directly and through others, never through the reporter); evict
        it only if nobody gets an answer. Nobody to ask: keep it (its record expires anyway)."""
        alive = await self.liveness.check(notice.subject, exclude={notice.reporter})
        covered = self.notices.on_check_done(notice.subject, alive is not False, time.time())
        if covered is not None and self.view.mark_down(notice.subject, covered, time.time()):
            self.event("peer_down", peer=notice.subject, by=notice.reporter, reason=notice.reason)
            self._notify_changed()
        elif covered is None:
            self.event("notice_refuted", peer=notice.subject, by=notice.reporter,
                       checked="alive" if alive else "unverifiable")

    def _still_current(self, data: bytes) -> bool:
        """GossipSub re-sends only what a receiver would still accept (``protocols.gossip``)."""
        return still_current(data, time.time(), held=self._held_record)

    def _held_record(self, peer_id: str) -> tuple[bytes, float] | None:
        entry = self.view.get(peer_id)  # our own latest record is in the view too
        return None if entry is None else (entry.raw, entry.record.expires_at)

    def _count_rejection(self, reason: str, origin: str, detail: str) -> None:
        self.rejected[reason] += 1
        # Aggregated (issue 8): the host's misbehaviour log writes one summary line per interval
        # instead of a log line and an event per message. GossipSub replays its recent-message
        # cache to new peers, so stale (and, late on a loaded machine, expired) records are
        # routine: counted, not held against the peer.
        routine = reason in ("stale_sequence", "expired")
        self.host.misbehaviour.note(origin, f"gossip_{reason}", penalty=0 if routine else 1, detail=detail)

    def connect_soon(self, record: CapacityRecord) -> None:
        """Connect to the peer of ``record`` in the background if we want more connections."""
        self._maybe_connect(record)

    def _maybe_connect(self, record: CapacityRecord) -> None:
        """Dial a record's peer if we want more connections, within the dial budget (one dial
        per peer at a time, back-off after failures, each address once per period, rate-limited)."""
        connected = self.host.connected_peers()
        if (record.peer_id not in connected and record.state != "offline"
                and len(connected) < self.config.target_peers):
            addrs = self.dials.plan(record.peer_id, record.addrs, time.monotonic())
            if addrs:
                self._nursery.start_soon(self._connect_quietly, record.peer_id, addrs)

    async def _connect_quietly(self, peer_id: str, addrs: list[str]) -> None:
        ok = False
        try:
            await self.host.connect_peer(peer_id, addrs, timeout=3.0)
            ok = True
        except NetworkError as e:
            log.debug("could not connect to %s: %s", peer_id[-8:], e)
        finally:
            self.dials.done(peer_id, ok, time.monotonic(), addrs)

    def _on_peer_alive(self, peer_id: str) -> None:
        self.view.mark_verified(peer_id, time.time())

    def _on_peer_dead(self, peer_id: str, reason: str) -> None:
        now = time.time()
        seq = self.view.last_seq(peer_id)
        if self.view.mark_down(peer_id, seq if seq is not None else 0, now):
            self.event("peer_down", peer=peer_id, by=self.peer_id, reason=reason)
            self._notify_changed()
        if seq is not None:
            self._nursery.start_soon(self._announce_down, peer_id, seq, reason)

    async def _announce_down(self, peer_id: str, seq: int, reason: str) -> None:
        notice = PeerDownNotice(self.peer_id, peer_id, seq, time.time(), notice_reason(reason))
        data = wire.encode_envelope(PEER_DOWN_KIND, {"notice": encode_notice(notice, self._key)})
        try:
            await self.host.publish(self._topic, data)
        except (NetworkError, trio.TooSlowError) as e:
            log.info("could not announce %s down: %s", peer_id[-8:], e)

    async def _handle_status(self, peer_id: str, env: wire.Envelope) -> tuple[str, dict[str, Any]]:
        message_from_envelope(env)  # a status_request has an empty body; anything else is refused
        # Live peers seen alive by this node first: strangers' records cannot crowd them out.
        raws = tuple(e.raw for e in self.view.preferred(time.time(), MAX_STATUS_RECORDS))
        reply = StatusResponse(raws)
        return reply.KIND, reply.to_body()

    async def _publisher(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the vehicle every ``vehicle_poll_s``; publish per the policy."""
        task_status.started()
        while True:
            with trio.move_on_after(self.config.vehicle_poll_s):
                await self._publish_now.wait()
            forced = self._publish_now.is_set()
            self._publish_now = trio.Event()
            if forced and self._last_record is not None:
                # A forced publish (a refutation, new blocks) still keeps the minimum interval:
                # a flood of notices about us must not make us flood the topic.
                await trio.sleep_until(trio.current_time() + max(
                    0.0, self._last_record.issued_at + self._policy.min_interval_s - time.time()))
            now = time.time()
            if self.evaluate_policy(now):
                forced = True
            if self._state == "joining" and (self.hosting is None or self.hosting.ready) and (
                    not self.config.bootstrap or self.host.gossip_peers(self._topic)
                    or now - self._started > ALONE_IN_REGION_S):
                # Online once someone will hear us: the "online" record is then published into a
                # formed topic, so every node learns of us without waiting for a refresh. The
                # first node of a region has no topic peers: clients find it through the DHT.
                self._state = "online"
            candidate = self._build_record(now, self._last_vehicle or UNKNOWN_VEHICLE)
            reason = "forced" if forced else should_publish(self._last_record, candidate, now, self._policy)
            if reason is not None:
                await self.publish_record(reason)

    def evaluate_policy(self, now: float) -> bool:
        """Read the vehicle and let the owner policy decide; tell hosting when the action changed.
        Returns whether it changed. A missing, invalid or stale vehicle source is ``unknown``."""
        try:
            self._last_vehicle = self.vehicle.read(now)
        except Exception as e:  # a broken sensor must not stop the node (it stops serving)
            (log.warning if str(e) != self._vehicle_error else log.debug)(
                "reading vehicle state (%s) failed: %s", self.vehicle.name, e)
            self._vehicle_error = str(e)
            reading = None
        else:
            reading = vehicle_reading(self.vehicle, self._last_vehicle, now,
                                      link_metered=self.config.link_metered)
            if reading is None:
                log.debug("vehicle state unknown: %s", getattr(self.vehicle, "last_error", None))
        before = self.owner.decision
        decision = self.owner.evaluate(now, reading)
        if before is not None and before.action == decision.action:
            return False
        if self.hosting is not None:
            self.hosting.policy_changed(decision)
        return True

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one owner control request (``idlefleet owner ...`` over the control socket)."""
        op, now = request.get("op"), time.time()
        if op == "consent":
            hours, until = request.get("hours"), request.get("until")
            entry = self.owner.grant(now, grant_expiry(now, hours, until), by="owner consent")
            self.evaluate_policy(now)  # takes effect now, not at the next poll
            return {"ok": True, "entry": entry, **self.owner_status(now)}
        if op == "revoke":
            entry = self.owner.revoke(now, by="owner revoke")
            self.evaluate_policy(now)
            return {"ok": True, "entry": entry, **self.owner_status(now)}
        if op == "status":
            return {"ok": True, **self.owner_status(now)}
        if op == "report":
            since = request.get("since")
            if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
                raise ValueError("since must be a unix time")
            events = self.config.events_path
            if events is None:
                raise ValueError("this node keeps no event log")
            report = owner_report(events, since=since, power_w=self.config.power_w)
            report["credits"] = credits_report(self.ledger, since=since)
            return {"ok": True, "report": report}
        raise ValueError(f"unknown op {op!r}; expected consent, revoke, status or report")

    def owner_status(self, now: float) -> dict[str, Any]:
        hosting = self.hosting
        server = hosting.server if hosting is not None else None
        return {
            "running": True, "peer_id": self.peer_id, "state": self._state,
            "blocks": list(self.blocks) if self.blocks else None,
            "sessions": server.active_sessions if server is not None else 0,
            "data_dir": None if self.data_dir is None else str(self.data_dir.path),
            **self.owner.status(now),
        }

    async def _maintain(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Every few seconds: forget expired state; keep enough connections (re-bootstrap)."""
        task_status.started()
        while True:
            await trio.sleep(2.0)
            now = time.time()
            before = {e.record.peer_id for e in self.view.alive(now)}
            self.view.prune(now)
            self.notices.prune(now)
            self.accusations.prune(now)
            for gone in before - {e.record.peer_id for e in self.view.alive(now)}:
                self.event("peer_expired", peer=gone)
                self._notify_changed()
            if not self.host.connected_peers():
                await self._bootstrap(quiet=True)

    async def _bootstrap(self, *, quiet: bool = False) -> int:
        """Connect to the entry points (``bootstrap`` addresses, then peers saved in ``peers_file``)
        in parallel, each within a deadline, and copy the views of those that answer (each record
        verified here), so a new node knows the fleet at once instead of after everyone's next
        refresh. Returns how many answered."""
        entries = list(dict.fromkeys(
            a for a in (*self.config.bootstrap, *self.discovery.entry_points()[:MAX_ENTRY_POINTS])
            if not a.endswith(self.peer_id)))
        answered: list[str] = []

        async def _try(addr: str) -> None:
            if await self._join_through(addr, quiet=quiet or addr not in self.config.bootstrap):
                answered.append(addr)

        async with trio.open_nursery() as nursery:
            for addr in entries:
                nursery.start_soon(_try, addr)
        if entries and not answered and not quiet:
            log.warning("none of %d entry point(s) answered", len(entries))
        return len(answered)

    async def _join_through(self, addr: str, *, quiet: bool = True) -> bool:
        """Connect to the entry point ``addr`` and copy its view (each record verified here), within
        a deadline. Returns whether it answered."""
        try:
            with trio.fail_after(BOOTSTRAP_TIMEOUT_S):
                peer = await self.host.connect(addr, timeout=BOOTSTRAP_TIMEOUT_S)
                status = await request_status(self.host, peer, timeout=BOOTSTRAP_TIMEOUT_S)
        except (NetworkError, RemoteProtocolError, trio.TooSlowError) as e:
            (log.debug if quiet else log.warning)("entry point %s unreachable: %s", addr, e)
            return False
        for raw in status.records:
            self._accept_relayed(raw)
        return True

    def _relay_candidates(self) -> list[str]:
        """Peers to ask for a dial-back or a relay slot: directly connected, reachable by their
        record (no relayed address of their own), lowest heartbeat RTT first."""
        relayed = self.host.relayed_peers()
        out = []
        for pid in self.host.connected_peers() - relayed:
            entry = self.view.get(pid)
            if entry is not None and not any("/p2p-circuit" in a for a in entry.record.addrs):
                out.append(pid)
        rtts = self.liveness.rtt_s
        return sorted(out, key=lambda p: (p not in rtts, rtts.get(p, 0.0), p))

    def _on_lan_peer(self, peer_id: str, addrs: list[str]) -> None:
        """mDNS found a peer on the LAN: join through it unless already connected."""
        if peer_id != self.peer_id and peer_id not in self.host.connected_peers():
            self.event("lan_peer", peer=peer_id)

            async def _join() -> None:
                for addr in addrs[:4]:
                    if await self._join_through(addr):
                        return

            self._nursery.start_soon(_join)

    def accept_relayed(self, raw: bytes) -> CapacityRecord | None:
        """Accept a record relayed by a third party (status reply, DHT) if it validates and is
        newer than ours. Returns it, or None if it was rejected."""
        return self._accept_relayed(raw)

    def _accept_relayed(self, raw: bytes) -> CapacityRecord | None:
        now = time.time()
        try:
            pid = claimed_peer(raw)
            record = validate_record(raw, now, last_seq=self.view.last_seq(pid) if pid else None)
        except RecordRejected as e:
            if e.reason != "stale_sequence":
                self._count_rejection(e.reason, "status", str(e))
            return None
        if record.peer_id == self.peer_id:
            return None
        was_alive = self.view.is_alive(record.peer_id, now)
        self.view.accept(record, raw, now)
        if self.view.get(record.peer_id) is None:
            self._count_rejection("view_full", "status", "fleet view full of live, verified peers")
            return None
        if not was_alive:
            self.event("peer_up", peer=record.peer_id, seq=record.seq)
        self._notify_changed()
        self._maybe_connect(record)
        return record

    async def _goodbye(self) -> None:
        """Publish ``offline`` so peers drop us now rather than at record expiry."""
        self._state = "offline"
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await self.publish_record("state")
            await trio.sleep(0.2)  # let the message leave before the sockets close

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        if self._events is not None:
            self._events.close()
            self._events = None


def open_ledger(data_dir: DataDir) -> Ledger:
    """The node's ledger; ConfigError (one line, exit 2) if the file is not a usable SQLite ledger."""
    try:
        return Ledger(data_dir.ledger)
    except sqlite3.Error as e:
        raise ConfigError(f"receipt ledger {data_dir.ledger} is unusable ({e}); move it aside to "
                          "start a new one") from None


def _dht_validate(key: str, value: bytes) -> None:
    record = validate_record(value, time.time())
    if key != dht_record_key(record.peer_id):
        raise RecordRejected("signer_mismatch", f"record of {record.peer_id} stored under {key}")


def _dht_select(key: str, values: list[bytes]) -> int:
    best, best_seq = 0, -1
    for i, v in enumerate(values):
        try:
            seq = validate_record(v, time.time()).seq
        except RecordRejected:
            continue
        if seq > best_seq:
            best, best_seq = i, seq
    return best


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
    host_config = HostConfig(listen_host=config.listen_host, port=config.port)
    # A MemoryHost offers Host's public surface without being one (tests/test_mem_network.py).
    opened = (open_host(key, host_config) if network is None
              else cast(Any, network.open_host(key, host_config)))
    async with opened as host, trio.open_nursery() as nursery:
        node = Node(config, key, host, vehicle, nursery, data_dir)
        node.fault = fault
        try:
            if fault is not None:
                log.warning("CHAOS FAULT ON: this node returns WRONG outputs (%s on %.0f%% of steps); "
                            "test tooling, never for real use", fault.kind, fault.rate * 100)
                node.event("chaos_fault", kind=fault.kind, rate=fault.rate)
            node.evaluate_policy(time.time())  # reported at start-up: e.g. an unknown vehicle state
            if data_dir is not None:
                await nursery.start(serve_control, data_dir.socket, node.control)
            host.register_dht_namespace("idlefleet", _dht_validate, _dht_select)
            host.set_request_handler(STATUS_PROTOCOL, "status_request", node._handle_status)
            await host.subscribe(node._topic, node._on_gossip, still_current=node._still_current)
            await host.subscribe(REPORT_TOPIC, node._on_report_gossip,
                                 still_current=lambda data: report_still_current(data, time.time()))
            await node._bootstrap()
            if config.mdns and network is None:  # peers on the LAN, no bootstrap needed (p2p/mdns.py)
                await nursery.start(partial(run_mdns, host, node._on_lan_peer))
            if network is None:
                await nursery.start(node.nat.run)
            await nursery.start(node.liveness.run)
            await nursery.start(node.discovery.run)
            await nursery.start(node._publisher)
            await nursery.start(node._maintain)
            node.request_publish()
            # Loads and serves blocks only while the owner policy allows it. Without consent at
            # start and without a data dir (no control socket: consent cannot arrive later) there
            # is nothing to host: an embedded client node stays out of it.
            if config.serve and (config.consent or data_dir is not None):
                from idlefleet.node.serve.server import ServerConfig

                node.hosting = BlockHosting(node, HostingConfig(
                    model=config.model, memory_budget_mb=config.memory_budget_mb,
                    rebalance_s=config.rebalance_s,
                    server=ServerConfig(max_sessions=config.max_sessions,
                                        kv_budget_bytes=int(config.kv_budget_mb * 1024 * 1024),
                                        idle_timeout_s=config.session_idle_s),
                    unload_grace_s=config.unload_grace_s, fault=fault))
                await nursery.start(node.hosting.run)
            yield node
            node.discovery.save_peers()
            await node._goodbye()
        finally:
            nursery.cancel_scope.cancel()
            node.close()


async def fetch_status(bootstrap: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Ask the node at ``bootstrap`` for its fleet view; verify every record ourselves.

    Uses a throwaway identity. Returns JSON-friendly dicts sorted by peer id. Raises NetworkError.
    """
    if "/p2p/" not in bootstrap or not bootstrap.startswith("/"):
        raise ConfigError(f"{bootstrap!r} is not a peer multiaddr like /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...")
    key = Ed25519PrivateKey.generate()
    async with open_host(key, HostConfig()) as host:
        deadline = trio.current_time() + timeout
        peer = await host.connect(bootstrap, timeout=timeout)
        status = await request_status(host, peer, timeout=max(0.1, deadline - trio.current_time()))
    now = time.time()
    out = []
    for raw in status.records:
        try:
            out.append(record_to_dict(validate_record(raw, now)))
        except RecordRejected as e:
            log.warning("status: %s sent an invalid record: %s", bootstrap, e)
    return sorted(out, key=lambda d: d["peer_id"])


async def request_status(host: Host, peer: str, *, timeout: float) -> StatusResponse:
    """Ask ``peer`` for its fleet view (records unverified: check each with validate_record).
    Raises NetworkError, or RemoteProtocolError for a malformed reply."""
    request = StatusRequest()
    env = await host.request(peer, STATUS_PROTOCOL, request.KIND, request.to_body(), timeout=timeout)
    reply = message_from_envelope(env)
    if not isinstance(reply, StatusResponse):
        raise RemoteProtocolError(f"expected status_response, got {env.kind}")
    return reply

