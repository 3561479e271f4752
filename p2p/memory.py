"""An in-memory network: hosts with ``p2p.host.Host``'s public surface, all in one trio run.

``MemoryNetwork`` stands in for libp2p so that whole nodes run on trio's virtual clock: no
sockets, no libp2p services, every delay a trio timer. It keeps what ``node/`` relies on:

- connections (``connect``/``connect_peer``/``evict``/``on_disconnect``), each one symmetric;
- framed streams (``open_stream`` negotiates the first protocol of a list the peer serves) with
  ``FramedStream``'s deadlines and errors: ``DeadlineExceeded``, ``StreamClosed``, ``NetworkError``;
  handlers run behind the same crash boundary as ``Host`` (``bad_request``, misbehaviour scores,
  the per-peer inbound stream cap);
- gossip: a message goes hop by hop over connections between subscribers, and every receiver's
  validator decides, exactly as over GossipSub, whether it is delivered and forwarded (``False``:
  dropped, not forwarded); a seen cache de-duplicates; a new connection replays recent messages
  that ``still_current`` keeps (GossipSub's message cache); the per-sender budget applies;
- a Kademlia-like DHT (p2p/memory_dht.py): values and provider records stored at the 20 reachable
  hosts closest to the key, every value checked by the receiver's namespace validator, the best
  chosen by ``select``.

Faults, all on trio's clock: ``partition(a, b)`` (their links hang both ways), ``freeze(a)``
(a SIGSTOP'd car: every link of ``a`` hangs, data written meanwhile arrives after ``thaw``),
``kill(a)`` (a SIGKILLed one: its streams end in EOF, dials to it are refused) and ``set_delay``
(one-way latency per link). A frozen host's own tasks still run in this process, so it sees the
others as frozen too: a total partition that keeps its connections up.

It imports no libp2p of its own (streams reuse ``p2p/loopback.py``'s pipe end under
``FramedStream``). tests/test_mem_network.py checks that it offers every public method of ``Host``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import trio

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.peerid import peer_id_from_public_key
from idlefleet.protocols.wire import KINDS, MAX_FRAME, Envelope

from .errors import DeadlineExceeded, NetworkError, PeerUnreachable
from .framing import FramedStream, serve_requests
from .guard import Misbehaviour, TokenBuckets
from .loopback import BUFFER_CHUNKS, _PipeEnd
from .memory_dht import MemoryDht

log = logging.getLogger(__name__)

RequestHandler = Callable[[str, Envelope], Awaitable[tuple[str, dict[str, Any]]]]
StreamHandler = Callable[[FramedStream], Awaitable[None]]
GossipValidator = Callable[[str, bytes], bool]
DisconnectCallback = Callable[[str], None]

PENALTY_CRASH = 10  # as p2p.host
PENALTY_REJECTED = 1
MCACHE_S = 5.0  # GossipSub's message cache: 5 heartbeats of 1 s
SEEN_MAX = 16384


class HostSettings(Protocol):
    """The fields of ``p2p.host.HostConfig`` a memory host reads (HostConfig satisfies it)."""

    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def request_timeout_s(self) -> float: ...
    @property
    def dht_timeout_s(self) -> float: ...
    @property
    def reused_stream_idle_s(self) -> float: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def max_inbound_streams_per_peer(self) -> int: ...
    @property
    def gossip_sender_rate(self) -> float: ...
    @property
    def gossip_sender_burst(self) -> float: ...
    @property
    def gossip_origin_rate(self) -> float: ...
    @property
    def gossip_origin_burst(self) -> float: ...
    @property
    def dht_max_values(self) -> int: ...


@dataclass(frozen=True)
class MemoryHostConfig:
    """Defaults of ``HostConfig`` for a memory host opened without one."""

    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    dht_timeout_s: float = 10.0
    reused_stream_idle_s: float = 60.0
    max_frame: int = MAX_FRAME
    max_inbound_streams_per_peer: int = 64
    gossip_sender_rate: float = 200.0
    gossip_sender_burst: float = 1000.0
    gossip_origin_rate: float = 5.0
    gossip_origin_burst: float = 30.0
    dht_max_values: int = 4096


@dataclass
class MemoryHostStatistics:
    """The counters of ``p2p.host.HostStatistics``, same names."""

    gossip_published: int = 0
    gossip_rejected: dict[str, int] = field(default_factory=dict)
    gossip_checked: int = 0
    gossip_rate_limited: int = 0
    requests_served: int = 0
    requests_rejected: int = 0
    evictions: int = 0
    handler_crashes: int = 0
    streams_refused: int = 0
    dht_refused: int = 0
    relay_dials: int = 0


class _Link:
    """One connection between two hosts; its streams' ends, for closing them with it."""

    def __init__(self, a: str, b: str) -> None:
        self.peers = frozenset((a, b))
        self.ends: list[_MemoryEnd] = []
        self.open = True


class _MemoryEnd(_PipeEnd):
    """One end of a stream over a link: the loopback pipe end, gated by the network's faults.

    A write waits while our host is frozen (else it fills the buffer, as a socket's); a chunk is
    read no sooner than the link's delay after it was written, and not while the link hangs.
    """

    def __init__(self, network: MemoryNetwork, link: _Link, local: str, remote: str, protocol: str,
                 send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]) -> None:
        super().__init__(remote, send, receive)
        self.local = local
        self._network = network
        self._link = link
        self._remote = remote
        self._protocol = protocol
        self.dues: deque[float] = deque()  # when each chunk in our receive channel arrives
        self.peer_end: _MemoryEnd | None = None

    def get_protocol(self) -> str:  # type: ignore[override]
        return self._protocol

    async def write(self, data: bytes) -> None:
        # A stopped process writes nothing; writes to a stopped or cut-off peer fill the buffer.
        await self._network.wait_passable(self.local, self.local)
        if self.peer_end is not None:
            self.peer_end.dues.append(trio.current_time() + self._network.delay(self.local, self._remote))
        await super().write(data)

    async def read(self, n: int = -1) -> bytes:
        if not self._pending:
            chunk = await super().read(-1)  # StreamEOF / StreamReset, as the loopback's
            if self.dues:
                await trio.sleep_until(self.dues.popleft())
            if self._link.open:
                await self._network.wait_passable(self.local, self._remote)
            self._pending = chunk
        size = len(self._pending) if n is None or n < 0 else n
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def sever(self) -> None:
        """Our side of the connection closed under the stream: the peer reads EOF once it has
        read what was sent, its writes fail; our own reads fail (reset)."""
        self._send.close()
        self._receive.close()


@dataclass
class _Gossip:
    topic: str
    origin: str
    seqno: int
    data: bytes
    at: float

    @property
    def mid(self) -> tuple[str, int]:
        return (self.origin, self.seqno)


class MemoryNetwork:
    """Hosts that reach each other in memory, with faults on trio's clock. Use inside a trio run.

    ``open_host(key, config)`` is an async context manager yielding a ``MemoryHost``; on exit the
    host is gone (as a closed process: its peers see EOF and disconnect).
    """

    def __init__(self, *, link_delay_s: float = 0.0) -> None:
        self.hosts: dict[str, MemoryHost] = {}
        self._addresses: dict[str, str] = {}  # "/ip4/10.x.y.z/tcp/4001" -> peer id
        self._links: dict[frozenset[str], _Link] = {}
        self._partitions: set[frozenset[str]] = set()
        self._frozen: set[str] = set()
        self._killed: set[str] = set()
        self._delays: dict[frozenset[str], float] = {}
        self.link_delay_s = link_delay_s
        self.gossip_seqno = 0
        self._changed = trio.Event()

    # -- faults ------------------------------------------------------------------------------
    def partition(self, a: str, b: str) -> None:
        """Links between ``a`` and ``b`` hang both ways (streams, dials, gossip, DHT)."""
        self._partitions.add(frozenset((a, b)))
        self._notify()

    def heal(self, a: str, b: str) -> None:
        self._partitions.discard(frozenset((a, b)))
        self._notify()

    def freeze(self, peer_id: str) -> None:
        """``peer_id`` stops like a SIGSTOP'd process: everything to and from it hangs."""
        self._frozen.add(peer_id)
        self._notify()

    def thaw(self, peer_id: str) -> None:
        self._frozen.discard(peer_id)
        self._notify()

    def kill(self, peer_id: str) -> None:
        """``peer_id`` dies like a SIGKILLed process: its links close (EOF), dials are refused."""
        self._killed.add(peer_id)
        for key in [k for k in self._links if peer_id in k]:
            self._drop(key, peer_id)
        self._notify()

    def set_delay(self, a: str, b: str, seconds: float) -> None:
        """One-way delay of every chunk, gossip hop and DHT message between ``a`` and ``b``."""
        self._delays[frozenset((a, b))] = seconds

    def delay(self, a: str, b: str) -> float:
        return self._delays.get(frozenset((a, b)), self.link_delay_s)

    def stalled(self, a: str, b: str) -> bool:
        return a in self._frozen or b in self._frozen or frozenset((a, b)) in self._partitions

    def reachable(self, a: str, b: str) -> bool:
        return b in self.hosts and b not in self._killed and not self.stalled(a, b)

    async def wait_passable(self, a: str, b: str) -> None:
        """Return once the link between ``a`` and ``b`` no longer hangs."""
        while self.stalled(a, b):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- connections -------------------------------------------------------------------------
    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._links

    def _link(self, a: str, b: str) -> _Link:
        key = frozenset((a, b))
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link(a, b)
            self.hosts[a]._connected(b)
            self.hosts[b]._connected(a)
        return link

    def _drop(self, key: frozenset[str], closer: str) -> None:
        """Close a connection from ``closer``'s side (its streams' ends are severed; the other
        side reads EOF), then tell both hosts."""
        link = self._links.pop(key, None)
        if link is None:
            return
        link.open = False
        for end in link.ends:
            if end.local == closer:
                end.sever()
        for pid in key:
            host = self.hosts.get(pid)
            if host is not None:
                host._disconnected(next(iter(key - {pid})))

    def address_of(self, addr: str) -> str | None:
        return self._addresses.get(addr.split("/p2p/")[0])

    @asynccontextmanager
    async def open_host(self, key: Any, config: HostSettings | None = None) -> AsyncIterator[MemoryHost]:
        """A host for the Ed25519 key ``key`` on this network; gone when the block exits."""
        peer_id = peer_id_from_public_key(key.public_key().public_bytes_raw())
        if peer_id in self.hosts:
            raise ValueError(f"{peer_id} already has a host on this network")
        n = len(self._addresses) + 1
        addr = f"/ip4/10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}/tcp/4001"
        self._addresses[addr] = peer_id
        self._killed.discard(peer_id)
        async with trio.open_nursery() as nursery:
            host = MemoryHost(self, peer_id, addr, config or MemoryHostConfig(), nursery)
            self.hosts[peer_id] = host
            nursery.start_soon(host.misbehaviour.run, 10.0)
            try:
                yield host
            finally:
                host.closing = True  # its own components are gone: not told of its disconnections
                for link_key in [k for k in self._links if peer_id in k]:
                    self._drop(link_key, peer_id)
                del self.hosts[peer_id]
                nursery.cancel_scope.cancel()


class MemoryHost(MemoryDht):
    """One host on a ``MemoryNetwork``: ``p2p.host.Host``'s public surface (``HostSurface``)."""

    def __init__(self, network: MemoryNetwork, peer_id: str, addr: str, config: HostSettings,
                 nursery: trio.Nursery) -> None:
        self.network = network
        self.peer_id = peer_id
        self._addr = addr
        self._config = config
        self._nursery = nursery
        self.stats = MemoryHostStatistics()
        self.closing = False
        self.misbehaviour = Misbehaviour()
        self._stream_handlers: dict[str, Callable[[FramedStream], Awaitable[None]]] = {}
        self._frame_limits: dict[str, int] = {}
        self._inbound: dict[str, int] = {}
        self._reusable: dict[tuple[str, str], FramedStream] = {}
        self._disconnect_callbacks: list[DisconnectCallback] = []
        self._topics: dict[str, tuple[GossipValidator, Callable[[bytes], bool] | None]] = {}
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._mcache: list[_Gossip] = []
        self._senders = TokenBuckets(config.gossip_sender_rate, config.gossip_sender_burst,
                                     clock=trio.current_time)
        self._origins = TokenBuckets(config.gossip_origin_rate, config.gossip_origin_burst,
                                     clock=trio.current_time)
        self._init_dht()

    # -- identity and connections ------------------------------------------------------------
    def multiaddrs(self) -> list[str]:
        return [f"{self._addr}/p2p/{self.peer_id}"]

    def connected_peers(self) -> set[str]:
        net = self.network
        return {pid for pid in net.hosts if pid != self.peer_id and net.linked(self.peer_id, pid)}

    def relayed_peers(self) -> set[str]:
        return set()  # no relays in memory: every host can be dialled

    def on_disconnect(self, callback: DisconnectCallback) -> None:
        self._disconnect_callbacks.append(callback)

    def forget_dial_failure(self, peer_id: str) -> None:
        """No negative dial cache here: every dial really tries."""

    def _connected(self, peer_id: str) -> None:
        self._routing.add(peer_id)
        self._nursery.start_soon(self._replay_to, peer_id)

    def _disconnected(self, peer_id: str) -> None:
        for key in [k for k in self._reusable if k[0] == peer_id]:
            del self._reusable[key]
        if self.closing:
            return
        for cb in list(self._disconnect_callbacks):
            cb(peer_id)

    async def connect(self, addr: str, *, timeout: float | None = None) -> str:
        """Connect to a multiaddr ending in /p2p/<id>. Raises PeerUnreachable or DeadlineExceeded."""
        if "/p2p/" not in addr:
            raise PeerUnreachable(f"bad multiaddr {addr!r}: no /p2p/ peer id")
        peer_id = addr.rsplit("/p2p/", 1)[1]
        if self.network.address_of(addr) != peer_id:
            raise PeerUnreachable(f"connect to {peer_id} failed: nobody at {addr}")
        await self._dial(peer_id, timeout)
        return peer_id

    async def connect_peer(self, peer_id: str, addrs: list[str], *, timeout: float | None = None) -> None:
        """Connect to ``peer_id`` at one of ``addrs``. Raises PeerUnreachable or DeadlineExceeded."""
        if not any(self.network.address_of(a) == peer_id for a in addrs):
            raise PeerUnreachable(f"connect to {peer_id} failed: none of {len(addrs)} address(es) is it")
        await self._dial(peer_id, timeout)

    async def _dial(self, peer_id: str, timeout: float | None) -> None:
        timeout = timeout or self._config.connect_timeout_s
        net = self.network
        if peer_id == self.peer_id:
            raise PeerUnreachable("cannot dial ourselves")
        if net.linked(self.peer_id, peer_id):
            return
        if peer_id not in net.hosts or peer_id in net._killed:
            raise PeerUnreachable(f"connect to {peer_id} failed: connection refused")
        try:
            with trio.fail_after(timeout):
                await net.wait_passable(self.peer_id, peer_id)  # a frozen peer never handshakes
                await trio.sleep(2 * net.delay(self.peer_id, peer_id))
        except trio.TooSlowError:
            raise DeadlineExceeded(f"connect to {peer_id} took over {timeout}s") from None
        if peer_id not in net.hosts or peer_id in net._killed:
            raise PeerUnreachable(f"connect to {peer_id} failed: connection refused")
        net._link(self.peer_id, peer_id)

    def evict(self, peer_id: str) -> None:
        """Close our connection to ``peer_id`` now (its streams end) and forget it in the DHT."""
        self.stats.evictions += 1
        self._routing.discard(peer_id)
        self.network._drop(frozenset((self.peer_id, peer_id)), self.peer_id)

    # -- streams -----------------------------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: StreamHandler, *,
                           max_frame: int | None = None) -> None:
        """Serve ``protocol`` behind ``Host``'s crash boundary (``bad_request``, scores, reset)."""
        self._frame_limits[protocol] = max_frame or self._config.max_frame

        async def _handle(fs: FramedStream) -> None:
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
                self._crashed(fs.peer_id, protocol, e)
            finally:
                await (fs.reset() if crashed else fs.aclose())

        self._stream_handlers[protocol] = _handle

    def set_request_handler(self, protocol: str, kind: str, handler: RequestHandler) -> None:
        """One request, one reply on ``protocol`` (the stream may be reused), as ``Host``'s."""

        def served() -> None:
            self.stats.requests_served += 1

        async def _serve(fs: FramedStream) -> None:
            # A client may keep the stream for further requests (``request(..., reuse=True)``).
            await serve_requests(fs, protocol, kind, handler,
                                 request_timeout_s=self._config.request_timeout_s,
                                 idle_s=self._config.reused_stream_idle_s, on_served=served)

        self.set_stream_handler(protocol, _serve, max_frame=KINDS[kind])

    def _crashed(self, peer_id: str, where: str, e: BaseException) -> None:
        self.stats.handler_crashes += 1
        self.misbehaviour.note(peer_id, f"crash:{where}", penalty=PENALTY_CRASH, detail=repr(e)[:200])
        log.debug("crash boundary: %s from %s", where, peer_id[-8:], exc_info=e)

    async def open_stream(self, peer_id: str, protocol: str | Sequence[str], *,
                          timeout: float | None = None) -> FramedStream:
        """A framed stream on the first of ``protocol`` the peer serves (dialling it if need be).
        Raises PeerUnreachable or DeadlineExceeded."""
        timeout = timeout or self._config.connect_timeout_s
        wanted = [protocol] if isinstance(protocol, str) else list(protocol)
        net = self.network
        deadline = trio.current_time() + timeout
        await self._dial(peer_id, timeout)
        try:
            with trio.fail_at(deadline):
                await net.wait_passable(self.peer_id, peer_id)
                await trio.sleep(2 * net.delay(self.peer_id, peer_id))  # multistream-select
        except trio.TooSlowError:
            raise DeadlineExceeded(f"opening {protocol} to {peer_id[-8:]} took over {timeout}s") from None
        remote = net.hosts.get(peer_id)
        link = net._links.get(frozenset((self.peer_id, peer_id)))
        if remote is None or link is None:
            raise PeerUnreachable(f"opening {protocol} to {peer_id[-8:]} failed: connection closed")
        chosen = next((p for p in wanted if p in remote._stream_handlers), None)
        if chosen is None:
            raise PeerUnreachable(f"opening {protocol} to {peer_id[-8:]} failed: protocol not supported")
        a_send, b_receive = trio.open_memory_channel[bytes](BUFFER_CHUNKS)
        b_send, a_receive = trio.open_memory_channel[bytes](BUFFER_CHUNKS)
        mine = _MemoryEnd(net, link, self.peer_id, peer_id, chosen, a_send, a_receive)
        theirs = _MemoryEnd(net, link, peer_id, self.peer_id, chosen, b_send, b_receive)
        mine.peer_end, theirs.peer_end = theirs, mine
        link.ends += [mine, theirs]
        remote._accept(theirs, self.peer_id, chosen)
        return FramedStream(cast(Any, mine), max_frame=self._config.max_frame)

    def _accept(self, end: _MemoryEnd, peer_id: str, protocol: str) -> None:
        fs = FramedStream(cast(Any, end), max_frame=self._frame_limits[protocol])
        active = self._inbound.get(peer_id, 0)
        if active >= self._config.max_inbound_streams_per_peer:
            self.stats.streams_refused += 1
            self.misbehaviour.note(peer_id, "stream_limit", penalty=PENALTY_REJECTED)
            end.sever()
            return
        self._inbound[peer_id] = active + 1
        self._nursery.start_soon(self._run_handler, fs, peer_id, protocol)

    async def _run_handler(self, fs: FramedStream, peer_id: str, protocol: str) -> None:
        try:
            await self._stream_handlers[protocol](fs)
        finally:
            left = self._inbound.get(peer_id, 1) - 1
            if left > 0:
                self._inbound[peer_id] = left
            else:
                self._inbound.pop(peer_id, None)

    async def request(self, peer_id: str, protocol: str, kind: str, body: dict[str, Any], *,
                      timeout: float | None = None, reuse: bool = False) -> Envelope:
        """One request and its reply within ``timeout``, as ``Host.request`` (``reuse`` too)."""
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
            if reuse and ok and key not in self._reusable and peer_id in self.connected_peers():
                self._reusable[key] = fs
            elif reuse and not ok:
                await fs.reset()
            else:
                await fs.aclose()

    # -- gossip ------------------------------------------------------------------------------
    async def subscribe(self, topic: str, validator: GossipValidator, *,
                        still_current: Callable[[bytes], bool] | None = None) -> None:
        """Join ``topic``: every message reaching us goes through ``validator(origin, data)``;
        only accepted ones are forwarded. ``still_current`` filters what is replayed."""
        self._topics[topic] = (validator, still_current)
        for peer in self.connected_peers():
            self._nursery.start_soon(self._replay_to, peer)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish to ``topic``: our own validator first, then every connected subscriber."""
        # Message ids are (origin, seqno): numbered network-wide, so that a restarted peer's new
        # messages are not taken for its old ones (GossipSub seeds its seqno from the clock).
        self.network.gossip_seqno += 1
        msg = _Gossip(topic, self.peer_id, self.network.gossip_seqno, bytes(data), trio.current_time())
        with trio.fail_after(self._config.request_timeout_s):
            await trio.lowlevel.checkpoint()
            self._receive_gossip(msg, self.peer_id)
        self.stats.gossip_published += 1

    def gossip_peers(self, topic: str) -> set[str]:
        hosts = self.network.hosts
        return {p for p in self.connected_peers() if p in hosts and topic in hosts[p]._topics}

    def _receive_gossip(self, msg: _Gossip, forwarder: str) -> None:
        """Seen cache, budget, validator, then forward: GossipSub's order."""
        if msg.mid in self._seen:
            return
        if forwarder != self.peer_id:
            if not (self._senders.take(forwarder) and self._origins.take((forwarder, msg.origin))):
                self.stats.gossip_rate_limited += 1
                self.misbehaviour.note(forwarder, "gossip_rate_limited", penalty=0)
                return
            self.stats.gossip_checked += 1
        self._seen[msg.mid] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        sub = self._topics.get(msg.topic)
        if sub is None:
            return
        try:
            accepted = bool(sub[0](msg.origin, msg.data))
        except Exception as e:  # a validator bug must not end gossip
            self._crashed(forwarder, f"gossip validator {msg.topic}", e)
            accepted = False
        if not accepted:
            self.stats.gossip_rejected[msg.topic] = self.stats.gossip_rejected.get(msg.topic, 0) + 1
            return
        now = trio.current_time()
        self._mcache = [m for m in self._mcache if now - m.at < MCACHE_S] + [msg]
        for peer in self.gossip_peers(msg.topic):
            if peer != forwarder and peer != msg.origin:
                self._nursery.start_soon(self._send_gossip, peer, msg)

    async def _send_gossip(self, peer: str, msg: _Gossip) -> None:
        net = self.network
        await net.wait_passable(self.peer_id, peer)
        await trio.sleep(net.delay(self.peer_id, peer))
        host = net.hosts.get(peer)
        if host is not None and net.linked(self.peer_id, peer):
            host._receive_gossip(msg, self.peer_id)

    async def _replay_to(self, peer: str) -> None:
        """GossipSub re-sends its message cache to a new peer: only what ``still_current`` keeps."""
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        for msg in [m for m in self._mcache if now - m.at < MCACHE_S]:
            keep = self._topics.get(msg.topic, (None, None))[1]
            try:
                if keep is not None and not keep(msg.data):
                    continue
            except Exception:  # a filter never breaks gossip: when in doubt, do not re-send
                continue
            if peer in self.gossip_peers(msg.topic):
                self._nursery.start_soon(self._send_gossip, peer, msg)
