"""Misbehaviour reports (docs/PROTOCOL.md section 7.5): what this node's client caught, gossiped on
``REPORT_TOPIC``, and what others report, checked before it lowers anyone in our routing.

``Reports`` owns who is accused (``accusations``, read by the client's routing), the digests of
reports already applied and each reporter's budget (a reporter accusing many peers is suspect).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

from idlefleet.p2p.errors import NetworkError
from idlefleet.p2p.guard import TokenBuckets
from idlefleet.protocols.errors import RecordRejected, RemoteProtocolError
from idlefleet.protocols.receipts import verify_report
from idlefleet.protocols.reports import (
    REPORT_TOPIC,
    Accusations,
    check_report_gossip,
    encode_report_gossip,
    report_digest,
    report_still_current,
)

if TYPE_CHECKING:
    from idlefleet.node.runtime.node import Node

log = logging.getLogger(__name__)

# Each reporter may have 3 reports accepted at once and 1 more per 10 minutes (catching a cheat is
# rare; a reporter accusing many peers is itself suspect); report digests are remembered for a day
# (bounded), so a report is applied once however often it is replayed.
REPORT_BURST = 3.0
REPORT_RATE_PER_S = 1 / 600
REPORT_MEMORY_S = 86400.0
MAX_REPORTS_REMEMBERED = 4096


class Reports:
    """This node's misbehaviour reports, both directions. Owned by ``Node`` (``node.reports``);
    subscribe ``on_gossip`` / ``still_current`` to ``REPORT_TOPIC``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.accusations = Accusations()
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # digest -> when applied
        self._budget = TokenBuckets(REPORT_RATE_PER_S, REPORT_BURST)

    async def report(self, report: bytes) -> None:
        """Act on a misbehaviour report this node's client made (``MisbehaviourReport.encode``):
        check it as any receiver would, lower the accused in our own routing, and gossip it. A
        report that does not verify is our own bug: logged, not sent. Never raises for a failed
        publish (logged; peers learn nothing)."""
        node, now = self.node, time.time()
        try:
            parsed, accused = verify_report(report)
        except RemoteProtocolError as e:
            log.error("not reporting misbehaviour: our own report does not verify: %s", e)
            return
        if parsed.reporter != node.peer_id:
            log.error("not reporting misbehaviour: the report is signed by %s, not by us", parsed.reporter)
            return
        digest = report_digest(report)
        if self._was_seen(digest):
            return  # already reported (and gossiped)
        self._remember(digest, now)
        self._apply(accused, parsed.reporter, now)
        try:
            await node.host.publish(REPORT_TOPIC, encode_report_gossip(report, node.key, now))
        except (NetworkError, trio.TooSlowError) as e:
            log.warning("gossiping a misbehaviour report about %s failed: %s", accused[-8:], e)

    def on_gossip(self, origin: str, data: bytes) -> bool:
        """Validator of ``REPORT_TOPIC`` (``protocols.reports.check_report_gossip``): only fully
        verified, fresh, first-seen reports within their reporter's budget are applied and forwarded."""
        node = self.node
        if origin == node.peer_id:
            return True  # our own (report applied it already)
        now = time.time()
        try:
            gossip = check_report_gossip(data, origin, now, seen=self._was_seen, budget=self._budget.take)
        except RecordRejected as e:
            node.intake.count_rejection(f"report_{e.reason}", origin, str(e))
            return False
        if gossip is None:
            return False  # a copy of a report already applied: not an attack, not forwarded
        self._remember(gossip.digest, now)
        self._apply(gossip.accused, gossip.report.reporter, now)
        node.intake.count_accepted()
        return True

    @staticmethod
    def still_current(data: bytes) -> bool:
        """GossipSub re-sends only reports a receiver would still accept."""
        return report_still_current(data, time.time())

    def prune(self, now: float) -> None:
        self.accusations.prune(now)

    def _was_seen(self, digest: bytes) -> bool:
        seen = self._seen.get(digest)
        return seen is not None and time.time() - seen < REPORT_MEMORY_S

    def _remember(self, digest: bytes, now: float) -> None:
        self._seen[digest] = now
        while len(self._seen) > MAX_REPORTS_REMEMBERED:
            self._seen.popitem(last=False)

    def _apply(self, accused: str, reporter: str, now: float) -> None:
        """Lower ``accused`` in this node's routing (``accusations``); about ourselves: log only."""
        node = self.node
        if accused == node.peer_id:
            log.warning("peer %s reports that this node returned wrong outputs (verified evidence); "
                        "check this device's model file and hardware", reporter[-8:])
            node.event("accused_us", by=reporter)
            return
        reporters = self.accusations.accuse(accused, reporter, now)
        until = self.accusations.until(accused, now)
        log.warning("peer %s accused of wrong outputs by %s (%d reporter(s)): avoided in routing",
                    accused[-8:], reporter[-8:], reporters)
        node.event("peer_accused", peer=accused, by=reporter, reporters=reporters, until=until)
