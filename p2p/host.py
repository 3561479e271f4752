"""The tuned libp2p host: TCP + Noise + Yamux, GossipSub, Kademlia DHT, framed request/response.

``open_host(key, config)`` starts everything under one nursery and yields a ``Host`` facade: the
rest of idlefleet talks to the network only through it (``interface.HostLike``: what ``node/``
uses of it) and never imports libp2p. Every operation takes a deadline. See DESIGN.md for why
the defaults (``config.HostConfig``) differ from py-libp2p's.

The host's parts, each in its module: ``boundary`` (the crash boundary under every inbound stream
and gossip message, the counters), ``dht`` (validators, bounded stores, DHT operations),
``pubsub`` (GossipSub, the gossip budget, replay filtering). This module keeps connections,
streams and requests, and ``open_host``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.rcmgr import ResourceLimits, new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.tools.anyio_service import background_trio_service

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.wire import KINDS, Envelope

from .boundary import PENALTY_CRASH, PENALTY_REJECTED, Boundary, HostStatistics
from .config import HostConfig
from .dht import DHT_PEER_TIMEOUT_S, DHT_PROTOCOL, Dht
from .errors import DeadlineExceeded, NetworkError, PeerUnreachable
from .framing import FramedStream, serve_requests
from .guard import Misbehaviour
from .interface import DisconnectCallback, GossipValidator, HostLike, RequestHandler, StreamHandler
from .pubsub import GOSSIP_PROTOCOLS, Gossip, new_pubsub

__all__ = [
    "DHT_PEER_TIMEOUT_S", "DHT_PROTOCOL", "GOSSIP_PROTOCOLS", "PENALTY_CRASH", "PENALTY_REJECTED",
    "DisconnectCallback", "GossipValidator", "Host", "HostConfig", "HostLike", "HostStatistics",
    "RequestHandler", "StreamHandler", "open_host",
]

log = logging.getLogger(__name__)

# py-libp2p logs routine events loudly: a WARNING for every normal DHT request, ERROR for every
# refused dial (DESIGN.md). Our layer reports what matters with context, so unless the user
# asks for the library's own logs (py-libp2p's LIBP2P_DEBUG variable), it only speaks when
# something is critical.
if not os.environ.get("LIBP2P_DEBUG"):
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


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

    def __init__(self, host: Any, gossip: Gossip, dht: Dht, config: HostConfig,
                 nursery: trio.Nursery, boundary: Boundary) -> None:
        self._host = host  # the py-libp2p host (p2p.nat and p2p.mdns work on it directly)
        self._gossip = gossip
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
            await self._dht.add_peer(info.peer_id)  # a connected peer is not in the table otherwise

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
        self._dht.remove_peer(pid)
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

        def served() -> None:
            self.stats.requests_served += 1

        async def _serve(fs: FramedStream) -> None:
            # A client may keep the stream for further requests (``request(..., reuse=True)``).
            await serve_requests(fs, protocol, kind, handler,
                                 request_timeout_s=self._config.request_timeout_s,
                                 idle_s=self._config.reused_stream_idle_s, on_served=served)

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

    # -- gossip (pubsub.Gossip) ---------------------------------------------------------------
    async def subscribe(self, topic: str, validator: GossipValidator, *,
                        still_current: Callable[[bytes], bool] | None = None) -> None:
        """Join ``topic``; see ``Gossip.subscribe``."""
        await self._gossip.subscribe(topic, validator, still_current=still_current)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish to ``topic`` (our own validator sees it first, like everyone else's)."""
        await self._gossip.publish(topic, data)

    def gossip_peers(self, topic: str) -> set[str]:
        return self._gossip.peers(topic)

    # -- DHT (dht.Dht) -----------------------------------------------------------------------
    def register_dht_namespace(self, namespace: str, validate: Callable[[str, bytes], None],
                               select: Callable[[str, list[bytes]], int]) -> None:
        """Keys ``/<namespace>/...`` are checked by ``validate`` (raise to reject) and ``select``."""
        self._dht.register_namespace(namespace, validate, select)

    async def dht_put(self, key: str, value: bytes, *, timeout: float | None = None) -> None:
        """Store ``value`` under ``key`` locally and at the closest peers; see ``Dht.put``."""
        await self._dht.put(key, value, timeout=timeout)

    async def dht_get(self, key: str, *, timeout: float | None = None) -> bytes | None:
        """The best validated value for ``key``, ours or the closest peers'; see ``Dht.get``."""
        return await self._dht.get(key, timeout=timeout)

    async def dht_provide(self, cid: str, *, timeout: float | None = None) -> bool:
        """Announce ourselves as a provider of ``cid``; see ``Dht.provide``."""
        return await self._dht.provide(cid, timeout=timeout)

    async def dht_find_providers(self, cid: str, *, count: int = 20,
                                 timeout: float | None = None) -> list[str]:
        """Peer ids announced as providers of ``cid``; see ``Dht.find_providers``."""
        return await self._dht.find_providers(cid, count=count, timeout=timeout)

    async def dht_refresh(self, *, timeout: float | None = None) -> int:
        """A Kademlia refresh; returns the routing table size. See ``Dht.refresh``."""
        return await self._dht.refresh(timeout=timeout)

    def dht_routing_peers(self) -> list[str]:
        """Peer ids in the DHT routing table."""
        return self._dht.routing_peers()

    def dht_routing_table_size(self) -> int:
        return self._dht.routing_table_size()

    def dht_store_sizes(self) -> tuple[int, int]:
        """(values stored, provider keys stored) in this node's DHT server."""
        return self._dht.store_sizes()


if TYPE_CHECKING:
    _conforms: type[HostLike] = Host  # mypy checks Host against what node/ relies on


async def _no_auto_connect() -> None:
    return None


_DEFAULT_CONFIG = HostConfig()  # frozen: one shared default is safe


@asynccontextmanager
async def open_host(key: Ed25519PrivateKey, config: HostConfig = _DEFAULT_CONFIG) -> AsyncIterator[Host]:
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
    # py-libp2p's AutoConnector redials every peer in the peerstore to reach 150+ connections,
    # including peers we evicted as dead or frozen. idlefleet manages its connections itself
    # (bootstrap, peers from records, target_peers), so it is switched off.
    network = lhost.get_network()
    if hasattr(network, "auto_connector"):
        network.auto_connector.maybe_connect = _no_auto_connect
    boundary = Boundary(config, HostStatistics(), Misbehaviour(), lhost.get_id())
    # The crash boundary: py-libp2p routes every inbound stream (every protocol, negotiation
    # included) through the network's one common handler, and every received gossip message
    # through Pubsub.push_msg (new_pubsub wraps that).
    network.set_stream_handler(boundary.wrap_streams(network.common_stream_handler))  # type: ignore[attr-defined]
    pubsub, router = new_pubsub(lhost, config, boundary)
    dht = Dht(lhost, config, boundary.stats, boundary.misbehaviour)
    listen = multiaddr.Multiaddr(f"/ip4/{config.listen_host}/tcp/{config.port}")

    try:
        async with trio.open_nursery() as nursery:

            async def _run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                async with (
                    lhost.run([listen]),
                    background_trio_service(pubsub),
                    background_trio_service(router),
                    background_trio_service(dht.kad),
                ):
                    await pubsub.wait_until_ready()
                    task_status.started()
                    await trio.sleep_forever()

            started = time.monotonic()
            await nursery.start(_run)
            await nursery.start(boundary.misbehaviour.run, config.rejection_log_interval_s)
            log.debug("host up in %.3fs", time.monotonic() - started)
            try:
                yield Host(lhost, Gossip(pubsub, config, boundary, nursery), dht, config, nursery, boundary)
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
