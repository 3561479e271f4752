"""The tuned libp2p host: TCP + Noise + Yamux, GossipSub, Kademlia DHT, framed request/response.

``open_host(key, config)`` starts everything under one nursery and yields a ``Host`` facade: the
rest of idlefleet talks to the network only through it and never imports libp2p. Every operation
takes a deadline. See DESIGN.md for why the defaults below differ from py-libp2p's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record as KadRecord
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.rcmgr import ResourceLimits, new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.wire import KINDS, MAX_FRAME, Envelope

from .errors import DeadlineExceeded, NetworkError, PeerUnreachable, StreamClosed
from .framing import FramedStream
from .guard import Misbehaviour, TokenBuckets

log = logging.getLogger(__name__)

# py-libp2p logs routine events loudly: a WARNING for every normal DHT request, ERROR for every
# refused dial (DESIGN.md). Our layer reports what matters with context, so unless the user
# asks for the library's own logs (py-libp2p's LIBP2P_DEBUG variable), it only speaks when
# something is critical.
if not os.environ.get("LIBP2P_DEBUG"):
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
# py-libp2p 0.8.1 always speaks the standard Kademlia protocol (its ``protocol_prefix`` is read only
# by ``validate_config``): idlefleet namespaces its DHT *keys* instead (protocols/dhtkeys.py).
DHT_PROTOCOL = TProtocol(KAD_PROTOCOL_ID)
assert DHT_PROTOCOL == "/ipfs/kad/1.0.0", "docs/PROTOCOL.md section 5 names this protocol id"
DHT_PEER_TIMEOUT_S = 3.0  # one DHT request to one peer (the library's own is 10 s)

RequestHandler = Callable[[str, Envelope], Awaitable[tuple[str, dict[str, Any]]]]
StreamHandler = Callable[[FramedStream], Awaitable[None]]
GossipValidator = Callable[[str, bytes], bool]
DisconnectCallback = Callable[[str], None]


@dataclass(frozen=True)
class HostConfig:
    """Network settings. Defaults are tuned for py-libp2p 0.8.1 as measured in DESIGN.md."""

    listen_host: str = "127.0.0.1"
    port: int = 0
    gossip_heartbeat_s: int = 1  # library default is 120 s: meshes would never form
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    gossip_max_msgs_per_topic_s: float = 1000.0  # library default 10/s silently drops messages
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    dht_timeout_s: float = 10.0
    reused_stream_idle_s: float = 60.0  # a server keeps a reused request stream this long
    max_frame: int = MAX_FRAME  # request/response protocols lower it to their request kind's limit
    # Limits at the door (issue 8). Streams: py-libp2p's resource manager only enforces a global
    # stream count (its per-peer scopes are never consulted by the 0.8.1 swarm), so the per-peer
    # cap on concurrent inbound streams is enforced by our crash boundary (_Boundary).
    max_inbound_streams_per_peer: int = 64
    max_streams: int = 4096  # all streams, all peers (rcmgr; the library default is 10,000)
    max_connections: int = 512  # rcmgr, all peers
    # Gossip validation budget, spent before py-libp2p checks a message's signature: per
    # connected sender (the forwarder, authenticated by Noise) and per (sender, claimed origin).
    gossip_sender_rate: float = 200.0
    gossip_sender_burst: float = 1000.0
    gossip_origin_rate: float = 5.0
    gossip_origin_burst: float = 30.0
    # DHT store bounds: values only under registered namespaces (their validators bound the
    # size); provider keys only in the form of our block CIDs (sha2-256 multihashes).
    dht_max_values: int = 4096
    dht_max_provider_keys: int = 16384
    dht_max_key_bytes: int = 256
    rejection_log_interval_s: float = 10.0


class _DisconnectNotifee(INotifee):
    def __init__(self, callback: Callable[[str], None]) -> None:
        self._callback = callback

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._callback(conn.muxed_conn.peer_id.to_base58())

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class _CallbackValidator(Validator):
    """Adapts a pair of plain functions to the DHT's record validator interface."""

    def __init__(self, validate: Callable[[str, bytes], None], select: Callable[[str, list[bytes]], int]):
        self._validate = validate
        self._select = select

    def validate(self, key: str, value: bytes) -> None:
        self._validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._select(key, values)


@dataclass
class HostStatistics:
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


#: Penalties added to a peer's misbehaviour score (Misbehaviour.note).
PENALTY_CRASH = 10  # its input raised something no handler expected
PENALTY_REJECTED = 1  # invalid input, refused with a reason


class _Boundary:
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
        return self._inbound.get(peer_id, 0)

    def crashed(self, peer_id: str, where: str, e: BaseException) -> None:
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
                await _reset_quietly(stream)
                return
            self._inbound[peer] = active + 1
            try:
                await inner(stream)
            except Exception as e:
                self.crashed(peer, str(stream.get_protocol() or "negotiation"), e)
                await _reset_quietly(stream)
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


async def _reset_quietly(stream: INetStream) -> None:
    with trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception as e:  # resetting a dead stream may raise anything
            log.debug("reset after crash: %r", e)


def _find_socket_stream(obj: Any, depth: int = 0) -> trio.SocketStream | None:
    """Walk muxer -> secure session -> raw connection down to the trio socket."""
    if isinstance(obj, trio.SocketStream):
        return obj
    if obj is None or depth > 8:
        return None
    for attr in ("muxed_conn", "secured_conn", "conn", "stream", "read_writer", "raw_conn"):
        child = getattr(obj, attr, None)
        if child is not None and child is not obj:
            found = _find_socket_stream(child, depth + 1)
            if found is not None:
                return found
    return None


class Host:
    """What idlefleet needs from libp2p, with deadlines. Created by ``open_host``."""

    def __init__(self, host: Any, pubsub: Pubsub, dht: KadDHT, config: HostConfig,
                 nursery: trio.Nursery, boundary: _Boundary) -> None:
        self._host = host
        self._pubsub = pubsub
        self._dht = dht
        self._config = config
        self._nursery = nursery
        self._disconnect_callbacks: list[DisconnectCallback] = []
        self._reusable: dict[tuple[str, str], FramedStream] = {}
        self._boundary = boundary
        self.stats = boundary.stats
        #: Per-peer misbehaviour scores and the aggregated rejection log; other components add
        #: their own rejections with ``note`` and consult ``score``.
        self.misbehaviour = boundary.misbehaviour
        self._replay_filters: dict[str, Callable[[bytes], bool]] = {}
        _filter_replays(pubsub.router, self._replay_filters)
        self.peer_id: str = host.get_id().to_base58()
        host.get_network().register_notifee(_DisconnectNotifee(self._on_disconnected))

    # -- identity and addresses -------------------------------------------------------------
    def multiaddrs(self) -> list[str]:
        """Our listen addresses, each ending in /p2p/<peer id>."""
        return [str(a) for a in self._host.get_addrs()]

    def connected_peers(self) -> set[str]:
        """Peers with at least one open connection (py-libp2p 0.8.1 can keep a closed one listed)."""
        return {pid.to_base58() for pid, conns in self._host.get_network().connections.items()
                if any(not getattr(c, "is_closed", False) for c in conns)}

    def _prune_closed(self, pid: ID) -> None:
        """Forget ``pid``'s connections that are closed but still listed. py-libp2p 0.8.1's
        ``new_stream`` dials only when a peer has no connection at all: with only closed ones
        listed it fails ("No valid connections available") instead of dialling again."""
        swarm = self._host.get_network()
        for conn in list(swarm.connections.get(pid, [])):
            if getattr(conn, "is_closed", False):
                swarm.remove_conn(conn)

    async def _drop_stale(self, pid: ID, error: Exception) -> bool:
        """A stream failed to open on ``pid``'s connections: close them and say True, so that the
        caller dials afresh once. py-libp2p 0.8.1 keeps a connection whose muxer no longer opens
        streams listed as open ("Failed to create stream to peer"); every later stream to that
        peer failed the same way, and a client banned the peer (the only host of its blocks, in
        one CI run). False if there was no connection (the dial itself failed), or if the muxer
        did open the stream and it died in the protocol handshake: the peer may have reset it on
        purpose (its per-peer stream cap), and closing the connection would end every other
        stream on it."""
        swarm = self._host.get_network()
        conns = list(swarm.connections.get(pid, []))
        if not conns or not isinstance(error, SwarmException):  # SwarmException: no stream at all
            return False
        log.info("a stream to %s failed on its connection (%r): closing it, dialling again",
                 str(pid)[-8:], error)
        for conn in conns:
            with trio.move_on_after(1.0):
                await conn.close()
            swarm.remove_conn(conn)
        return True

    def on_disconnect(self, callback: DisconnectCallback) -> None:
        self._disconnect_callbacks.append(callback)

    def _on_disconnected(self, peer_id: str) -> None:
        if peer_id in self.connected_peers():
            return  # another connection to the same peer is still up
        self._forget_streams(peer_id)
        for cb in self._disconnect_callbacks:
            cb(peer_id)

    # -- connections -------------------------------------------------------------------------
    def forget_dial_failure(self, peer_id: str) -> None:
        """Let the next dial to ``peer_id`` really try. py-libp2p refuses every dial to a peer
        whose addresses all failed once, for 60 s ("recently failed all addresses (negative
        cache)"), whatever asks. That spares the liveness checks and the library's own dials slow
        dials to dead and frozen peers (3 s instead made a 6-node SIGSTOP test 30% slower), so it
        stays; but a caller that decided, by its own policy, to use the peer again (a client
        whose ban on it is over) clears it: one transient failure locked a client out of the
        only host of a block for a minute."""
        cache = getattr(self._host.get_network(), "_negative_peer_cache", None)
        if cache is not None and hasattr(cache, "evict"):
            cache.evict(peer_id)

    async def connect(self, addr: str, *, timeout: float | None = None) -> str:
        """Connect to a full multiaddr (with /p2p/). Returns the peer id. Raises PeerUnreachable."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:
            raise PeerUnreachable(f"bad multiaddr {addr!r}: {e}") from None
        await self._connect_info(info, timeout)
        return info.peer_id.to_base58()

    async def connect_peer(self, peer_id: str, addrs: list[str], *, timeout: float | None = None) -> None:
        """Connect to a peer by id and the addresses in its capacity record: plain ones directly,
        relayed ones (``.../p2p/<relay>/p2p-circuit``, a peer behind a NAT) through their relay,
        tried first (a peer advertises them only when it cannot be dialled). Raises
        PeerUnreachable or DeadlineExceeded."""
        from .nat import dial_via_relay, is_circuit

        timeout = timeout or self._config.connect_timeout_s
        errors = []
        for circuit in [a for a in addrs if is_circuit(a)][:2]:
            try:
                await dial_via_relay(self, circuit, peer_id, timeout)
                self.stats.relay_dials += 1
                return
            except NetworkError as e:
                errors.append(str(e))
        direct = [a for a in addrs if not is_circuit(a)]
        if errors and not direct:
            raise PeerUnreachable("; ".join(errors))
        try:
            plain = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in direct]
            info = PeerInfo(ID.from_base58(peer_id), plain)
        except Exception as e:
            raise PeerUnreachable(f"bad peer info {peer_id}: {e}") from None
        await self._connect_info(info, timeout)

    def relayed_peers(self) -> set[str]:
        """Connected peers whose only connections run through a relay (circuit v2)."""
        out = set()
        for pid, conns in self._host.get_network().connections.items():
            kinds = []
            for conn in conns:
                try:
                    kinds.append(any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses()))
                except Exception:
                    kinds.append(False)
            if kinds and all(kinds):
                out.add(pid.to_base58())
        return out

    async def _connect_info(self, info: PeerInfo, timeout: float | None) -> None:
        timeout = timeout or self._config.connect_timeout_s
        try:
            with trio.fail_after(timeout):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise DeadlineExceeded(f"connect to {info.peer_id} took over {timeout}s") from None
        except Exception as e:
            raise PeerUnreachable(f"connect to {info.peer_id} failed: {e!r}") from None
        with trio.move_on_after(timeout):
            try:
                await self._dht.add_peer(info.peer_id)  # a connected peer is not in the table otherwise
            except Exception as e:
                log.debug("DHT add_peer %s: %r", info.peer_id, e)

    def evict(self, peer_id: str) -> None:
        """Hard eviction of a dead or frozen peer: close its sockets now, drop it from DHT and pubsub.

        ``host.disconnect`` hangs on a frozen peer (DESIGN.md), so we close the TCP socket under
        the muxer; py-libp2p then tears the connection down and notifies pubsub itself.
        """
        self.stats.evictions += 1
        self._forget_streams(peer_id)
        pid = ID.from_base58(peer_id)
        for conn in list(self._host.get_network().connections.get(pid, [])):
            sock = _find_socket_stream(conn)
            if sock is not None:
                sock.socket.close()
        try:
            self._dht.routing_table.remove_peer(pid)
        except Exception as e:
            log.debug("routing table remove %s: %r", peer_id[-8:], e)
        self._nursery.start_soon(self._disconnect_quietly, pid)

    async def _disconnect_quietly(self, pid: ID) -> None:
        with trio.move_on_after(3.0):
            try:
                await self._host.disconnect(pid)
            except Exception as e:
                log.debug("disconnect %s: %r", pid, e)

    # -- streams -----------------------------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: StreamHandler, *,
                           max_frame: int | None = None) -> None:
        """Serve ``protocol``: ``handler`` gets a FramedStream; the stream is closed after it returns.

        Frames announcing more than ``max_frame`` bytes (default ``config.max_frame``) are refused
        as soon as their 4-byte header arrives. A RemoteProtocolError is answered ``bad_request``;
        any other exception is caught by the crash boundary, which resets the stream and scores
        the peer down: nothing a peer sends ends the process.
        """
        limit = max_frame or self._config.max_frame

        async def _handle(stream: INetStream) -> None:
            fs = FramedStream(stream, max_frame=limit)
            crashed = False
            try:
                await handler(fs)
            except RemoteProtocolError as e:
                self.stats.requests_rejected += 1
                self.misbehaviour.note(fs.peer_id, f"bad_request:{protocol}", penalty=PENALTY_REJECTED,
                                       detail=str(e))
                await fs.send_error("bad_request", str(e))
            except NetworkError as e:
                log.debug("stream %s from %s: %s", protocol, fs.peer_id[-8:], e)
            except Exception as e:
                crashed = True
                self._boundary.crashed(fs.peer_id, protocol, e)
            finally:
                await (fs.reset() if crashed else fs.aclose())

        self._host.set_stream_handler(TProtocol(protocol), _handle)

    def set_request_handler(self, protocol: str, kind: str, handler: RequestHandler) -> None:
        """Serve one-request-one-reply on ``protocol``; requests of any other kind get an error.

        The stream's frame limit is the request kind's envelope limit (``wire.KINDS``): a header
        announcing more is refused at once, without reading or waiting for the payload.
        """

        async def _serve(fs: FramedStream) -> None:
            # A client may keep the stream for further requests (``request(..., reuse=True)``):
            # serve until it closes it or stays silent for ``reused_stream_idle_s``.
            wait = self._config.request_timeout_s
            while True:
                try:
                    env = await fs.receive(timeout=wait)
                except (StreamClosed, DeadlineExceeded):
                        return
                if env.kind != kind:
                    raise RemoteProtocolError(f"{protocol} expects {kind!r}, got {env.kind!r}")
                reply_kind, body = await handler(fs.peer_id, env)
                self.stats.requests_served += 1
                await fs.send(reply_kind, body, timeout=self._config.request_timeout_s)
                wait = self._config.reused_stream_idle_s

        self.set_stream_handler(protocol, _serve, max_frame=KINDS[kind])

    async def open_stream(self, peer_id: str, protocol: str | Sequence[str], *,
                          timeout: float | None = None) -> FramedStream:
        """Open a framed stream on ``protocol``, or on the first of several (in order of
        preference) that the peer speaks: ``FramedStream.protocol`` says which. Raises
        PeerUnreachable or DeadlineExceeded."""
        timeout = timeout or self._config.connect_timeout_s
        wanted = [TProtocol(protocol)] if isinstance(protocol, str) else [TProtocol(p) for p in protocol]
        try:
            pid = ID.from_base58(peer_id)
            self._prune_closed(pid)
            with trio.fail_after(timeout):
                try:
                    stream = await self._host.new_stream(pid, wanted)
                except Exception as e:
                    if not await self._drop_stale(pid, e):
                        raise
                    stream = await self._host.new_stream(pid, wanted)  # dials anew
        except trio.TooSlowError:
            raise DeadlineExceeded(f"opening {protocol} to {peer_id[-8:]} took over {timeout}s") from None
        except Exception as e:
            raise PeerUnreachable(f"opening {protocol} to {peer_id[-8:]} failed: {e!r}") from None
        return FramedStream(stream, max_frame=self._config.max_frame)

    async def request(self, peer_id: str, protocol: str, kind: str, body: dict[str, Any], *,
                      timeout: float | None = None, reuse: bool = False) -> Envelope:
        """Send one request and wait for its reply, all within ``timeout``.

        With ``reuse``, the stream stays open for the next request to the same peer and protocol
        (opening a stream costs several ms of CPU; heartbeats use this). Any failure discards it.
        Raises PeerUnreachable, DeadlineExceeded, RemoteError (the peer replied ``error``),
        RemoteProtocolError (garbage reply) or NetworkError.
        """
        timeout = timeout or self._config.request_timeout_s
        deadline = trio.current_time() + timeout
        key = (peer_id, protocol)
        fs = self._reusable.pop(key, None) if reuse else None
        if fs is None:
            fs = await self.open_stream(peer_id, protocol, timeout=timeout)
        ok = False
        try:
            await fs.send(kind, body, timeout=max(0.01, deadline - trio.current_time()))
            reply = await fs.receive_reply(timeout=max(0.01, deadline - trio.current_time()))
            ok = True
            return reply
        finally:
            if reuse and ok and key not in self._reusable:
                self._reusable[key] = fs
            elif reuse and not ok:
                await fs.reset()  # it may hold half a frame: never reuse it
            else:
                await fs.aclose()

    def _forget_streams(self, peer_id: str) -> None:
        for key in [k for k in self._reusable if k[0] == peer_id]:
            del self._reusable[key]

    # -- gossip ------------------------------------------------------------------------------
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
        """Publish to ``topic`` (our own validator sees it first, like everyone else's)."""
        with trio.fail_after(self._config.request_timeout_s):
            await self._pubsub.publish(topic, data)
        self.stats.gossip_published += 1

    def gossip_peers(self, topic: str) -> set[str]:
        return {p.to_base58() for p in self._pubsub.peer_topics.get(topic, set())}

    # -- DHT ---------------------------------------------------------------------------------
    def register_dht_namespace(self, namespace: str, validate: Callable[[str, bytes], None],
                               select: Callable[[str, list[bytes]], int]) -> None:
        """Keys ``/<namespace>/...`` are checked by ``validate`` (raise to reject) and ``select``."""
        self._dht.register_validator(namespace, _CallbackValidator(validate, select))

    async def dht_put(self, key: str, value: bytes, *, timeout: float | None = None) -> None:
        """Store ``value`` under ``key`` locally and at the closest peers the network knows."""
        await self._dht_op(self._put(key, value), timeout, f"put {key}")

    async def _put(self, key: str, value: bytes) -> None:
        await self._sync_routing_table()
        await self._dht.put_value(key, value)

    async def _sync_routing_table(self) -> None:
        """Add connected peers missing from the routing table. py-libp2p adds a peer only when we
        dial it (``_connect_info``) or it sends us a DHT request, so a node that was dialled (a
        bootstrap node) would otherwise store and look up values among too few peers."""
        table = self._dht.routing_table
        for pid, conns in list(self._host.get_network().connections.items()):
            if conns and not table.peer_in_table(pid):
                with trio.move_on_after(DHT_PEER_TIMEOUT_S):
                    try:
                        await self._dht.add_peer(pid)
                    except Exception as e:
                        log.debug("DHT add_peer %s: %r", pid, e)

    async def dht_get(self, key: str, *, timeout: float | None = None) -> bytes | None:
        """The best value for ``key`` (the namespace's ``select``) among our own copy and the
        closest peers' answers, each validated. py-libp2p's ``get_value`` returns any local copy
        without asking the network, so a copy fetched once would be served stale forever."""
        return await self._dht_op(self._get_best(key), timeout, f"get {key}")  # type: ignore[no-any-return]

    async def _get_best(self, key: str) -> bytes | None:
        await self._sync_routing_table()
        key_bytes = key.encode("utf-8")
        values: list[bytes] = []
        local = self._dht.value_store.get(key_bytes)
        if local is not None:
            values.append(bytes(local.value))
        me = self._host.get_id()
        peers = [p for p in await self._dht.peer_routing.find_closest_peers_network(key_bytes) if p != me]
        async def ask(peer: ID) -> None:
            with trio.move_on_after(DHT_PEER_TIMEOUT_S):
                try:
                    reply = await self._dht.value_store._get_from_peer(peer, key_bytes, return_record=True)
                except Exception as e:  # a vanished or hostile peer: its answer does not count
                    log.debug("DHT get %s from %s: %r", key, peer, e)
                    return
                if not isinstance(reply, KadRecord) or not reply.value:
                    return
                try:
                    self._dht.validator.validate(key, reply.value)  # type: ignore[union-attr]
                except Exception as e:
                    log.debug("DHT get %s: invalid value from %s: %s", key, peer, e)
                    return
                values.append(bytes(reply.value))

        async with trio.open_nursery() as nursery:
            for peer in peers[:20]:
                nursery.start_soon(ask, peer)
        if not values:
            return None
        return values[self._dht.validator.select(key, values)]  # type: ignore[union-attr]

    async def dht_provide(self, cid: str, *, timeout: float | None = None) -> bool:
        """Announce ourselves as a provider of ``cid`` (text CID; the wire key is its multihash)
        to the closest peers (ADD_PROVIDER). Receivers accept at most 10 ADD_PROVIDER messages
        per sender in 10 s (py-libp2p's limit): callers pace announcements. Returns whether at
        least one peer was sent the announcement."""
        async def _provide() -> bool:
            await self._sync_routing_table()
            return bool(await self._dht.provide(cid))

        return bool(await self._dht_op(_provide(), timeout, f"provide {cid}"))

    async def dht_find_providers(self, cid: str, *, count: int = 20,
                                 timeout: float | None = None) -> list[str]:
        """Peer ids announced as providers of ``cid``: our own store if it has any, else the
        network's. Providers' addresses go to the peerstore."""
        infos = await self._dht_op(self._dht.find_providers(cid, count), timeout,
                                   f"find_providers {cid}")
        return sorted({i.peer_id.to_base58() for i in infos})  # the library does not deduplicate

    async def dht_refresh(self, *, timeout: float | None = None) -> int:
        """Keep the routing table alive (a Kademlia refresh): look up our own id and a random one
        through the network, adding every responsive peer met. Returns the table size."""

        async def _walk() -> None:
            await self._sync_routing_table()
            for target in (self._host.get_id().to_bytes(), os.urandom(32)):
                for peer in await self._dht.peer_routing.find_closest_peers_network(target):
                    if peer != self._host.get_id():
                        await self._dht.add_peer(peer)

        await self._dht_op(_walk(), timeout, "refresh")
        return self.dht_routing_table_size()

    def dht_routing_peers(self) -> list[str]:
        """Peer ids in the DHT routing table."""
        return [p.to_base58() for p in self._dht.routing_table.get_peer_ids()]

    async def _dht_op(self, coro: Awaitable[Any], timeout: float | None, what: str) -> Any:
        timeout = timeout or self._config.dht_timeout_s
        try:
            with trio.fail_after(timeout):
                return await coro
        except trio.TooSlowError:
            raise DeadlineExceeded(f"DHT {what} took over {timeout}s") from None
        except NetworkError:
            raise
        except Exception as e:  # py-libp2p's DHT raises assorted errors when peers vanish
            raise NetworkError(f"DHT {what} failed: {e!r}") from None

    def dht_routing_table_size(self) -> int:
        return int(self._dht.get_routing_table_size())

    def dht_store_sizes(self) -> tuple[int, int]:
        """(values stored, provider keys stored) in this node's DHT server."""
        return len(self._dht.value_store.store), len(self._dht.provider_store.providers)


async def _no_auto_connect() -> None:
    return None


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
def _bound_dht_stores(dht: KadDHT, config: HostConfig, stats: HostStatistics,
                      misbehaviour: Misbehaviour) -> None:
    """Bound what remote peers can make this DHT server store.

    Values: the strict validator already refuses keys outside registered namespaces and values
    their validator rejects; here the number of stored keys is capped (updates of a stored key
    always pass). Provider records: only sha2-256 multihash keys (the form of our block CIDs), at
    most ``dht_max_provider_keys`` keys (py-libp2p already caps providers per key).
    """
    values, providers = dht.value_store, dht.provider_store
    put_record, add_provider = values.put_record, providers.add_provider

    def bounded_put_record(key: bytes, record: Any) -> None:
        if key not in values.store and (len(key) > config.dht_max_key_bytes
                                        or len(values.store) >= config.dht_max_values):
            stats.dht_refused += 1
            misbehaviour.note("dht", "dht_value_refused", penalty=0, detail=f"{len(values.store)} stored")
            raise ValueError("DHT value store full")  # py-libp2p answers the PUT with a reset
        put_record(key, record)

    def bounded_add_provider(key: bytes, provider: PeerInfo) -> None:
        # Block keys are CIDs: on the wire their sha2-256 multihash (protocols/dhtkeys.py).
        if not (isinstance(key, bytes) and len(key) == 34 and key.startswith(b"\x12\x20")):
            stats.dht_refused += 1
            misbehaviour.note(str(provider.peer_id), "dht_provider_key", penalty=PENALTY_REJECTED,
                              detail=repr(key[:40]))
            return
        if key not in providers.providers and len(providers.providers) >= config.dht_max_provider_keys:
            stats.dht_refused += 1
            misbehaviour.note(str(provider.peer_id), "dht_provider_full", penalty=0)
            return
        add_provider(key, provider)

    values.put_record = bounded_put_record  # type: ignore[method-assign]
    providers.add_provider = bounded_add_provider  # type: ignore[method-assign]


@asynccontextmanager
async def open_host(key: Ed25519PrivateKey, config: HostConfig = HostConfig()) -> AsyncIterator[Host]:
    """Start a host listening on ``config.listen_host:config.port``; stop everything on exit.

    Shutdown cancels one enclosing scope (exiting py-libp2p services one by one crashes).
    """
    from .identity import libp2p_key_pair

    key_pair = libp2p_key_pair(key)
    resource_manager = new_resource_manager(
        limits=ResourceLimits(max_connections=config.max_connections, max_streams=config.max_streams),
        connection_limits=ConnectionLimits(max_established_per_peer=1,
                                           max_established_total=config.max_connections),
        enable_metrics=False,
    )
    lhost = new_host(
        key_pair=key_pair,
        connection_config=ConnectionConfig(max_connections_per_peer=1),  # 250 ms -> ~5 ms connects
        resource_manager=resource_manager,
    )
    router = GossipSub(
        protocols=GOSSIP_PROTOCOLS,
        degree=config.gossip_degree,
        degree_low=config.gossip_degree_low,
        degree_high=config.gossip_degree_high,
        heartbeat_interval=config.gossip_heartbeat_s,
        max_messages_per_topic_per_second=config.gossip_max_msgs_per_topic_s,
    )
    # py-libp2p's AutoConnector redials every peer in the peerstore to reach 150+ connections,
    # including peers we evicted as dead or frozen. idlefleet manages its connections itself
    # (bootstrap, peers from records, target_peers), so it is switched off.
    network = lhost.get_network()
    if hasattr(network, "auto_connector"):
        network.auto_connector.maybe_connect = _no_auto_connect
    pubsub = Pubsub(lhost, router, strict_signing=True)
    # Speaks DHT_PROTOCOL (/ipfs/kad/1.0.0) whatever the prefix. Only namespaces we register (with
    # validators that bound size and check signatures) are stored: no default pk/ipns namespaces.
    dht = KadDHT(lhost, DHTMode.SERVER, validator=NamespacedValidator({}, strict_validation=True),
                 validator_changed=True, strict_validation=True)
    stats = HostStatistics()
    boundary = _Boundary(config, stats, Misbehaviour(), lhost.get_id())
    _bound_dht_stores(dht, config, stats, boundary.misbehaviour)
    # The crash boundary: py-libp2p routes every inbound stream (every protocol, negotiation
    # included) through the network's one common handler, and every received gossip message
    # through Pubsub.push_msg (run as a detached task: an exception there ends the service).
    network.set_stream_handler(boundary.wrap_streams(network.common_stream_handler))  # type: ignore[attr-defined]
    pubsub.push_msg = boundary.wrap_push_msg(pubsub.push_msg)  # type: ignore[method-assign,assignment]
    listen = multiaddr.Multiaddr(f"/ip4/{config.listen_host}/tcp/{config.port}")

    try:
        async with trio.open_nursery() as nursery:

            async def _run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                async with (
                    lhost.run([listen]),
                    background_trio_service(pubsub),
                    background_trio_service(router),
                    background_trio_service(dht),
                ):
                    await pubsub.wait_until_ready()
                    task_status.started()
                    await trio.sleep_forever()

            started = time.monotonic()
            await nursery.start(_run)
            await nursery.start(boundary.misbehaviour.run, config.rejection_log_interval_s)
            log.debug("host up in %.3fs", time.monotonic() - started)
            try:
                yield Host(lhost, pubsub, dht, config, nursery, boundary)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await _close_listeners(network)


async def _close_listeners(network: Any) -> None:
    """Close the host's TCP listeners. py-libp2p serves them from a trio *system* task, which
    cancelling the host's scope does not reach: a closed host went on accepting connections (and
    handshaking them) until its process ended. Shielded and bounded, at exit."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        for listener in list(getattr(network, "listeners", {}).values()):
            try:
                await listener.close()
            except Exception as e:  # already closed, or closing failed: nothing left to do
                log.debug("closing a listener: %r", e)
