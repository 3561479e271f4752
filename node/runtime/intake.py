"""Intake: what peers tell this node about the fleet, checked before it is believed.

- capacity records and peer-down notices on the region's topic (``on_gossip``, the topic's
  validator: only valid, fresh, correctly attributed messages enter the view and are forwarded);
- records relayed by a third party (status replies, the DHT: ``accept_relayed``);
- liveness verdicts (``on_peer_alive`` / ``on_peer_dead``): a dead peer is dropped from the view
  and announced down to the region.

``Intake`` owns the rejection counts (``rejected``, by reason), the count of gossip accepted from
peers, and the peer-down notice gate (``notices``). The fleet view itself is the node's
(``node.view``); intake is the only writer of other peers' entries.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import trio

from idlefleet.p2p.errors import NetworkError
from idlefleet.protocols import wire
from idlefleet.protocols.errors import RecordRejected
from idlefleet.protocols.gossip import (
    PEER_DOWN_KIND,
    NoticeGossip,
    RecordGossip,
    check_gossip,
    claimed_peer,
    still_current,
)
from idlefleet.protocols.membership import FORWARD, NoticeGate
from idlefleet.protocols.notices import PeerDownNotice, encode_notice, notice_reason
from idlefleet.protocols.records import CapacityRecord, validate_record

if TYPE_CHECKING:
    from idlefleet.node.runtime.node import Node

log = logging.getLogger(__name__)


class Intake:
    """Validates and takes in records and notices for ``node`` (owned by it: ``node.intake``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.rejected: Counter[str] = Counter()
        self.accepted = 0  # gossip messages from peers that passed validation
        self.notices = NoticeGate(node.peer_id)

    def count_accepted(self) -> None:
        self.accepted += 1

    def count_rejection(self, reason: str, origin: str, detail: str) -> None:
        """Count a rejected message by ``reason`` and note it against its sender."""
        self.rejected[reason] += 1
        # Aggregated (issue 8): the host's misbehaviour log writes one summary line per interval
        # instead of a log line and an event per message. GossipSub replays its recent-message
        # cache to new peers, so stale (and, late on a loaded machine, expired) records are
        # routine: counted, not held against the peer.
        routine = reason in ("stale_sequence", "expired")
        self.node.host.misbehaviour.note(origin, f"gossip_{reason}", penalty=0 if routine else 1,
                                         detail=detail)

    # -- the region topic ------------------------------------------------------------------------
    def on_gossip(self, origin: str, data: bytes) -> bool:
        """Topic validator (``protocols.gossip.check_gossip``), counting what it accepts from peers.
        Every rejection is counted by reason."""
        accepted = self._validate(origin, data)
        self.accepted += accepted and origin != self.node.peer_id
        return accepted

    def _validate(self, origin: str, data: bytes) -> bool:
        view = self.node.view
        if origin == self.node.peer_id:
            return True
        now = time.time()
        try:
            message = check_gossip(data, origin, self.node.peer_id, now, last_seq=view.last_seq,
                                   held=self._held_raw)
        except RecordRejected as e:
            self.count_rejection(e.reason, origin, str(e))
            return False
        if message is None:
            return False  # a duplicate (gossip replays its cache to new peers): not an attack
        if isinstance(message, RecordGossip):
            return self._take_record(message.record, message.raw, origin, now) is not None
        assert isinstance(message, NoticeGossip)
        return self._take_notice(message.notice, now)

    def still_current(self, data: bytes) -> bool:
        """GossipSub re-sends only what a receiver would still accept (``protocols.gossip``)."""
        return still_current(data, time.time(), held=self._held_record)

    def _held_raw(self, peer_id: str) -> bytes | None:
        entry = self.node.view.get(peer_id)
        return None if entry is None else entry.raw

    def _held_record(self, peer_id: str) -> tuple[bytes, float] | None:
        entry = self.node.view.get(peer_id)  # our own latest record is in the view too
        return None if entry is None else (entry.raw, entry.record.expires_at)

    def _take_record(self, record: CapacityRecord, raw: bytes, origin: str, now: float,
                     *, gossiped: bool = True) -> CapacityRecord | None:
        """Put a validated record in the view and dial its peer if we want more connections.
        None if the view is full of live, verified peers (counted as ``view_full``)."""
        node = self.node
        was_alive = node.view.is_alive(record.peer_id, now)
        node.view.accept(record, raw, now)
        if node.view.get(record.peer_id) is None:
            self.count_rejection("view_full", origin, "fleet view full of live, verified peers")
            return None
        if not was_alive:
            node.event("peer_up", peer=record.peer_id, seq=record.seq)
        if gossiped:
            node.event("record", peer=record.peer_id, seq=record.seq,
                       battery_soc=record.battery_soc, state=record.state)
        node.notify_changed()
        node.entry.connect_soon(record)
        return record

    def accept_relayed(self, raw: bytes) -> CapacityRecord | None:
        """Accept a record relayed by a third party (status reply, DHT) if it validates and is
        newer than ours. Returns it, or None if it was rejected."""
        now = time.time()
        try:
            pid = claimed_peer(raw)
            record = validate_record(raw, now, last_seq=self.node.view.last_seq(pid) if pid else None)
        except RecordRejected as e:
            if e.reason != "stale_sequence":
                self.count_rejection(e.reason, "status", str(e))
            return None
        if record.peer_id == self.node.peer_id:
            return None
        return self._take_record(record, raw, "status", now, gossiped=False)

    # -- peer-down notices -----------------------------------------------------------------------
    def _take_notice(self, notice: PeerDownNotice, now: float) -> bool:
        """A peer-down notice is a hint: rate-limited per reporter, checked before believed."""
        node = self.node
        verdict, _ = self.notices.on_notice(notice.reporter, notice.subject, notice.subject_seq,
                                            now, last_seen_seq=node.view.last_seq(notice.subject))
        if verdict == "rate_limited":
            self.count_rejection("rate_limited", notice.reporter, "too many peer-down notices")
        elif verdict == "refute":
            log.info("peer %s reported us dead (%s); refuting", notice.reporter[-8:], notice.reason)
            node.request_publish()  # the publisher keeps its minimum interval
        elif verdict == "check":
            node.nursery.start_soon(self._check_notice, notice)
        return verdict in FORWARD

    async def _check_notice(self, notice: PeerDownNotice) -> None:
        """Probe the subject (directly and through others, never through the reporter); evict
        it only if nobody gets an answer. Nobody to ask: keep it (its record expires anyway)."""
        node = self.node
        alive = await node.liveness.check(notice.subject, exclude={notice.reporter})
        covered = self.notices.on_check_done(notice.subject, alive is not False, time.time())
        if covered is not None and node.view.mark_down(notice.subject, covered, time.time()):
            node.event("peer_down", peer=notice.subject, by=notice.reporter, reason=notice.reason)
            node.notify_changed()
        elif covered is None:
            node.event("notice_refuted", peer=notice.subject, by=notice.reporter,
                       checked="alive" if alive else "unverifiable")

    # -- liveness verdicts -----------------------------------------------------------------------
    def on_peer_alive(self, peer_id: str) -> None:
        self.node.view.mark_verified(peer_id, time.time())

    def on_peer_dead(self, peer_id: str, reason: str) -> None:
        """Liveness gave up on ``peer_id``: drop it from the view and tell the region."""
        node, now = self.node, time.time()
        seq = node.view.last_seq(peer_id)
        if node.view.mark_down(peer_id, seq if seq is not None else 0, now):
            node.event("peer_down", peer=peer_id, by=node.peer_id, reason=reason)
            node.notify_changed()
        if seq is not None:
            node.nursery.start_soon(self._announce_down, peer_id, seq, reason)

    async def _announce_down(self, peer_id: str, seq: int, reason: str) -> None:
        node = self.node
        notice = PeerDownNotice(node.peer_id, peer_id, seq, time.time(), notice_reason(reason))
        data = wire.encode_envelope(PEER_DOWN_KIND, {"notice": encode_notice(notice, node.key)})
        try:
            await node.host.publish(node.topic, data)
        except (NetworkError, trio.TooSlowError) as e:
            log.info("could not announce %s down: %s", peer_id[-8:], e)
