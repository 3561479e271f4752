"""``HostLike``: the host's surface that ``node/`` relies on, as a typed Protocol.

``p2p.host.Host`` (libp2p) implements it; another network (an in-memory one for tests and the
simulator) can implement it too and stand in wherever ``node/`` only needs these members.
``tests/test_host_interface.py`` checks both directions: ``Host`` has every member with the same
signature, and ``node/`` calls nothing on a host outside this Protocol. (``p2p.liveness``,
``p2p.nat`` and ``p2p.mdns`` use more of ``Host``: ``evict``, ``on_disconnect``, ``peer_id`` and
the libp2p host underneath.)

Errors, for every implementation: PeerUnreachable, DeadlineExceeded, RemoteError and
NetworkError from ``p2p.errors``; RemoteProtocolError for garbage from a peer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from idlefleet.protocols.wire import Envelope

    from .boundary import HostStatistics
    from .framing import FramedStream
    from .guard import Misbehaviour

#: Serves one request: ``(peer_id, request) -> (reply kind, reply body)``.
RequestHandler = Callable[[str, "Envelope"], Awaitable[tuple[str, dict[str, Any]]]]
#: Serves one inbound stream; the stream is closed when it returns.
StreamHandler = Callable[["FramedStream"], Awaitable[None]]
#: ``(origin peer id, data) -> accept and forward?``
GossipValidator = Callable[[str, bytes], bool]
#: Called with a peer id once its last connection closed.
DisconnectCallback = Callable[[str], None]


class HostLike(Protocol):
    """What ``node/`` calls on a host. Every operation takes a deadline (``timeout`` None: the
    host's configured default) and raises the ``p2p.errors`` it names past it."""

    @property
    def stats(self) -> HostStatistics:
        """The host's counters (published by the host; readers never write them)."""
        ...

    @property
    def misbehaviour(self) -> Misbehaviour:
        """Per-peer misbehaviour scores; components ``note`` their own rejections there."""
        ...

    # -- addresses and connections
    def multiaddrs(self) -> list[str]: ...

    def connected_peers(self) -> set[str]: ...

    def relayed_peers(self) -> set[str]: ...

    def forget_dial_failure(self, peer_id: str) -> None: ...

    async def connect(self, addr: str, *, timeout: float | None = None) -> str: ...

    async def connect_peer(self, peer_id: str, addrs: list[str], *, timeout: float | None = None) -> None: ...

    # -- streams and requests
    def set_stream_handler(self, protocol: str, handler: StreamHandler, *,
                           max_frame: int | None = None) -> None: ...

    def set_request_handler(self, protocol: str, kind: str, handler: RequestHandler) -> None: ...

    async def open_stream(self, peer_id: str, protocol: str | Sequence[str], *,
                          timeout: float | None = None) -> FramedStream: ...

    async def request(self, peer_id: str, protocol: str, kind: str, body: dict[str, Any], *,
                      timeout: float | None = None, reuse: bool = False) -> Envelope: ...

    # -- gossip
    async def subscribe(self, topic: str, validator: GossipValidator, *,
                        still_current: Callable[[bytes], bool] | None = None) -> None: ...

    async def publish(self, topic: str, data: bytes) -> None: ...

    def gossip_peers(self, topic: str) -> set[str]: ...

    # -- DHT
    def register_dht_namespace(self, namespace: str, validate: Callable[[str, bytes], None],
                               select: Callable[[str, list[bytes]], int]) -> None: ...

    async def dht_put(self, key: str, value: bytes, *, timeout: float | None = None) -> None: ...

    async def dht_get(self, key: str, *, timeout: float | None = None) -> bytes | None: ...

    async def dht_provide(self, cid: str, *, timeout: float | None = None) -> bool: ...

    async def dht_find_providers(self, cid: str, *, count: int = 20,
                                 timeout: float | None = None) -> list[str]: ...

    async def dht_refresh(self, *, timeout: float | None = None) -> int: ...

    def dht_routing_peers(self) -> list[str]: ...
