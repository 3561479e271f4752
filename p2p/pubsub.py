"""The host's GossipSub: a tuned router, the gossip budget before signature checks, replay filtering.

``new_pubsub`` builds py-libp2p's GossipSub router and a strictly signing ``Pubsub`` with every
received message passed through the crash boundary's budget (``Boundary.wrap_push_msg``).
``Gossip`` is the gossip half of the ``Host`` facade: subscribe with a validator, publish, and
re-send only messages a topic's ``still_current`` filter keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub

from .boundary import Boundary
from .config import HostConfig
from .interface import GossipValidator

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]


def new_pubsub(lhost: Any, config: HostConfig, boundary: Boundary) -> tuple[Pubsub, GossipSub]:
    """A strictly signing Pubsub over a GossipSub router tuned by ``config``; every received
    message goes through ``boundary``'s gossip budget and crash boundary first. The caller runs
    both as services."""
    router = GossipSub(
        protocols=GOSSIP_PROTOCOLS,
        degree=config.gossip_degree,
        degree_low=config.gossip_degree_low,
        degree_high=config.gossip_degree_high,
        heartbeat_interval=config.gossip_heartbeat_s,
        max_messages_per_topic_per_second=config.gossip_max_msgs_per_topic_s,
    )
    pubsub = Pubsub(lhost, router, strict_signing=True)
    # py-libp2p runs push_msg as a detached task for every received message: an exception there
    # ends the pubsub service, and the budget must be spent before its signature check.
    pubsub.push_msg = boundary.wrap_push_msg(pubsub.push_msg)  # type: ignore[method-assign,assignment]
    return pubsub, router


class Gossip:
    """Topics this host joined and what it publishes. Subscriptions' queues are drained by tasks
    in ``nursery`` (the host's), which end with it."""

    def __init__(self, pubsub: Pubsub, config: HostConfig, boundary: Boundary,
                 nursery: trio.Nursery) -> None:
        self._pubsub = pubsub
        self._config = config
        self._boundary = boundary
        self._nursery = nursery
        self._replay_filters: dict[str, Callable[[bytes], bool]] = {}  # topic -> still_current
        _filter_replays(pubsub.router, self._replay_filters)

    async def subscribe(self, topic: str, validator: GossipValidator, *,
                        still_current: Callable[[bytes], bool] | None = None) -> None:
        """Join ``topic``. Every message goes through ``validator(source_peer_id, data)`` first;
        it must return True to accept (and forward) it. Delivery happens in the validator, so the
        subscription queue is drained and discarded here.

        GossipSub also re-sends messages it already forwarded: its message cache to a peer that just
        subscribed or asks after an IHAVE, and the queue it kept while a new peer identified. With
        ``still_current``, only messages for which ``still_current(data)`` holds *now* are re-sent
        or advertised, so a receiver is not handed records that were superseded or expired meanwhile.
        """
        if still_current is not None:
            self._replay_filters[topic] = still_current

        def _validate(source: ID, msg: Any) -> bool:
            try:
                origin = ID(msg.from_id).to_base58()
            except Exception:
                return False
            try:
                return validator(origin, bytes(msg.data))
            except Exception as e:  # a validator bug must not end the pubsub service
                self._boundary.crashed(source.to_base58(), f"gossip validator {topic}", e)
                return False

        self._pubsub.set_topic_validator(topic, _validate, False)
        sub = await self._pubsub.subscribe(topic)
        self._nursery.start_soon(self._drain, sub)

    async def _drain(self, sub: Any) -> None:
        while True:
            await sub.get()

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish to ``topic`` (our own validator sees it first, like everyone else's). Raises
        trio.TooSlowError past ``config.request_timeout_s``."""
        with trio.fail_after(self._config.request_timeout_s):
            await self._pubsub.publish(topic, data)
        self._boundary.stats.gossip_published += 1

    def peers(self, topic: str) -> set[str]:
        """Peers we know subscribed to ``topic``."""
        return {p.to_base58() for p in self._pubsub.peer_topics.get(topic, set())}


def _filter_replays(router: Any, filters: dict[str, Callable[[bytes], bool]]) -> None:
    """Make ``router`` (py-libp2p 0.8.1 GossipSub) re-send only messages its topic's filter keeps.

    Two places re-send old messages: ``mcache.window(topic)`` (replayed to a newly subscribed peer,
    and advertised in IHAVE, answered from the cache on IWANT) and ``_pending_messages`` (queued
    for a peer whose identify or subscription had not arrived yet, flushed when it does).
    """
    cache = router.mcache
    window = cache.window

    def kept(topic: str, data: bytes) -> bool:
        keep = filters.get(topic)
        try:
            return keep is None or keep(data)
        except Exception:  # a filter never breaks gossip: when in doubt, do not re-send
            return False

    def filtered_window(topic: str) -> list[bytes]:
        mids: list[bytes] = window(topic)
        if topic not in filters:
            return mids
        return [mid for mid in mids if (msg := cache.get(mid)) is not None and kept(topic, bytes(msg.data))]

    cache.window = filtered_window
    flush = router.flush_pending_messages

    async def filtered_flush(peer_id: Any) -> None:
        queue = router._pending_messages.get(peer_id)
        if queue:
            queue[:] = [(ts, rpc) for ts, rpc in queue
                        if all(kept(topic, bytes(m.data)) for m in rpc.publish for topic in m.topicIDs)]
        await flush(peer_id)

    router.flush_pending_messages = filtered_flush
