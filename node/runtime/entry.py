"""Entry: how this node gets into the fleet and stays connected.

- ``bootstrap``: connect to the entry points (configured ``bootstrap`` addresses, then peers saved
  in ``peers_file``) in parallel, each within a deadline, and copy the views of those that answer;
- ``on_lan_peer``: mDNS found a peer on the LAN: join through it;
- ``connect_soon``: dial a record's peer while we want more connections, within the dial budget;
- ``relay_candidates``: whom to ask for a dial-back or a relay slot (``p2p.nat``).

``Entry`` owns the dial budget (``dials``). Records it copies go through ``node.intake``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from idlefleet.node.runtime.status import request_status
from idlefleet.p2p.errors import NetworkError
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.membership import DialBudget
from idlefleet.protocols.records import CapacityRecord
from idlefleet.protocols.serving import peer_usable

if TYPE_CHECKING:
    from idlefleet.node.runtime.node import Node

log = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT_S = 5.0  # one entry point: connect and status reply
MAX_ENTRY_POINTS = 16  # saved peers tried at once besides the configured bootstrap addresses


class Entry:
    """Joins and connections of ``node`` (owned by it: ``node.entry``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.dials = DialBudget()

    async def bootstrap(self, *, quiet: bool = False) -> int:
        """Join through every entry point at once, so a new node knows the fleet at once instead
        of after everyone's next refresh. Returns how many answered."""
        node = self.node
        entries = list(dict.fromkeys(
            a for a in (*node.config.bootstrap, *node.discovery.entry_points()[:MAX_ENTRY_POINTS])
            if not a.endswith(node.peer_id)))
        answered: list[str] = []

        async def _try(addr: str) -> None:
            if await self.join_through(addr, quiet=quiet or addr not in node.config.bootstrap):
                answered.append(addr)

        async with trio.open_nursery() as nursery:
            for addr in entries:
                nursery.start_soon(_try, addr)
        if entries and not answered and not quiet:
            log.warning("none of %d entry point(s) answered", len(entries))
        return len(answered)

    async def join_through(self, addr: str, *, quiet: bool = True) -> bool:
        """Connect to the entry point ``addr`` and copy its view (each record verified here), within
        a deadline. Returns whether it answered; never raises for an unreachable or bad peer."""
        node = self.node
        try:
            with trio.fail_after(BOOTSTRAP_TIMEOUT_S):
                peer = await node.host.connect(addr, timeout=BOOTSTRAP_TIMEOUT_S)
                status = await request_status(node.host, peer, timeout=BOOTSTRAP_TIMEOUT_S)
        except (NetworkError, RemoteProtocolError, trio.TooSlowError) as e:
            (log.debug if quiet else log.warning)("entry point %s unreachable: %s", addr, e)
            return False
        for raw in status.records:
            node.intake.accept_relayed(raw)
        return True

    def on_lan_peer(self, peer_id: str, addrs: list[str]) -> None:
        """mDNS found a peer on the LAN: join through it unless already connected."""
        node = self.node
        if peer_id != node.peer_id and peer_id not in node.host.connected_peers():
            node.event("lan_peer", peer=peer_id)

            async def _join() -> None:
                for addr in addrs[:4]:
                    if await self.join_through(addr):
                        return

            node.nursery.start_soon(_join)

    def connect_soon(self, record: CapacityRecord) -> None:
        """Dial a record's peer in the background if we want more connections, within the dial
        budget (one dial per peer at a time, back-off after failures, each address once per
        period, rate-limited)."""
        node = self.node
        connected = node.host.connected_peers()
        if (record.peer_id not in connected and peer_usable(record, "dial") is None
                and len(connected) < node.config.target_peers):
            addrs = self.dials.plan(record.peer_id, record.addrs, time.monotonic())
            if addrs:
                node.nursery.start_soon(self._connect_quietly, record.peer_id, addrs)

    async def _connect_quietly(self, peer_id: str, addrs: list[str]) -> None:
        ok = False
        try:
            await self.node.host.connect_peer(peer_id, addrs, timeout=3.0)
            ok = True
        except NetworkError as e:
            log.debug("could not connect to %s: %s", peer_id[-8:], e)
        finally:
            self.dials.done(peer_id, ok, time.monotonic(), addrs)

    def relay_candidates(self) -> list[str]:
        """Peers to ask for a dial-back or a relay slot: directly connected, reachable by their
        record (no relayed address of their own), lowest heartbeat RTT first."""
        node = self.node
        relayed = node.host.relayed_peers()
        out = []
        for pid in node.host.connected_peers() - relayed:
            entry = node.view.get(pid)
            if entry is not None and not any("/p2p-circuit" in a for a in entry.record.addrs):
                out.append(pid)
        rtts = node.liveness.rtt_s
        return sorted(out, key=lambda p: (p not in rtts, rtts.get(p, 0.0), p))
