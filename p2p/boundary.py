"""The crash boundary under every inbound stream and gossip message, and the host's counters.

``Boundary`` wraps py-libp2p's one common inbound stream handler and ``Pubsub.push_msg``: nothing
a peer sends (to our handlers or into py-libp2p's own parsers) raises past it. It also enforces
the per-peer inbound stream cap and spends the gossip budget before any signature check.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from .config import HostConfig
from .guard import Misbehaviour, TokenBuckets

log = logging.getLogger(__name__)

#: Penalties added to a peer's misbehaviour score (Misbehaviour.note).
PENALTY_CRASH = 10  # its input raised something no handler expected
PENALTY_REJECTED = 1  # invalid input, refused with a reason


@dataclass
class HostStatistics:
    """The host's counters; the host, its boundary, DHT bounds and gossip each add their own."""

    gossip_published: int = 0
    gossip_rejected: dict[str, int] = field(default_factory=dict)
    gossip_checked: int = 0  # received gossip messages handed to py-libp2p's checks (signature first)
    gossip_rate_limited: int = 0  # dropped by the per-sender budget before any check
    requests_served: int = 0
    requests_rejected: int = 0
    evictions: int = 0
    handler_crashes: int = 0  # unexpected exceptions caught by the crash boundary
    streams_refused: int = 0  # over the per-peer inbound stream cap
    dht_refused: int = 0  # DHT values or provider records refused by our bounds
    relay_dials: int = 0  # connections opened through a relay (circuit v2)


class Boundary:
    """The crash boundary under every inbound stream and every gossip message.

    No exception raised while handling a peer's input (by our handlers or inside py-libp2p:
    pubsub RPC parsing, Kademlia, identify, ping, the muxer) leaves here: the stream is reset,
    the peer's misbehaviour score goes up, and the event is counted and logged in the aggregated
    summary line. It also enforces the per-peer inbound stream cap and the gossip budget.
    """

    def __init__(self, config: HostConfig, stats: HostStatistics, misbehaviour: Misbehaviour,
                 my_id: ID) -> None:
        self._config = config
        self.stats = stats
        self.misbehaviour = misbehaviour
        self._my_id = my_id
        self._inbound: dict[str, int] = {}  # peer id -> inbound streams being handled
        self._senders = TokenBuckets(config.gossip_sender_rate, config.gossip_sender_burst)
        self._origins = TokenBuckets(config.gossip_origin_rate, config.gossip_origin_burst)

    def inbound_streams(self, peer_id: str) -> int:
        """Inbound streams from ``peer_id`` being handled now."""
        return self._inbound.get(peer_id, 0)

    def crashed(self, peer_id: str, where: str, e: BaseException) -> None:
        """Count and score an unexpected exception raised by ``peer_id``'s input at ``where``."""
        self.stats.handler_crashes += 1
        self.misbehaviour.note(peer_id, f"crash:{where}", penalty=PENALTY_CRASH, detail=repr(e)[:200])
        log.debug("crash boundary: %s from %s", where, peer_id[-8:], exc_info=e)

    def wrap_streams(self, inner: Callable[[INetStream], Awaitable[None]]
                     ) -> Callable[[INetStream], Awaitable[None]]:
        """Wrap py-libp2p's common inbound stream handler (negotiation, then the protocol's)."""

        async def guarded(stream: INetStream) -> None:
            try:
                peer = stream.muxed_conn.peer_id.to_base58()
            except Exception:
                peer = "unknown"
            active = self._inbound.get(peer, 0)
            if active >= self._config.max_inbound_streams_per_peer:
                self.stats.streams_refused += 1
                self.misbehaviour.note(peer, "stream_limit", penalty=PENALTY_REJECTED)
                await reset_quietly(stream)
                return
            self._inbound[peer] = active + 1
            try:
                await inner(stream)
            except Exception as e:
                self.crashed(peer, str(stream.get_protocol() or "negotiation"), e)
                await reset_quietly(stream)
            finally:
                left = self._inbound.get(peer, 1) - 1
                if left > 0:
                    self._inbound[peer] = left
                else:
                    self._inbound.pop(peer, None)

        return guarded

    def wrap_push_msg(self, inner: Callable[[ID, Any], Awaitable[None]]
                      ) -> Callable[[ID, Any], Awaitable[None]]:
        """Wrap ``Pubsub.push_msg``: budget first (before the signature check), never raise."""

        async def guarded(forwarder: ID, msg: Any) -> None:
            if forwarder != self._my_id:
                sender = forwarder.to_base58()
                if not (self._senders.take(sender) and self._origins.take((sender, bytes(msg.from_id)))):
                    self.stats.gossip_rate_limited += 1
                    self.misbehaviour.note(sender, "gossip_rate_limited", penalty=0)
                    return
                self.stats.gossip_checked += 1
            try:
                await inner(forwarder, msg)
            except Exception as e:
                self.crashed(forwarder.to_base58(), "pubsub push_msg", e)

        return guarded


async def reset_quietly(stream: INetStream) -> None:
    """Reset ``stream``, within 1 s, ignoring whatever a dead stream raises."""
    with trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception as e:  # resetting a dead stream may raise anything
            log.debug("reset after crash: %r", e)
