"""NAT traversal: am I reachable (AutoNAT), and if not, a slot on a relay (circuit relay v2).

Most cars sit behind a home router or carrier-grade NAT: they can dial out but nobody can dial
them. ``Nat`` (one per host, ``await nursery.start(nat.run)``) does three things:

- **Serves** the standard protocols to others: AutoNAT dial-back (``/libp2p/autonat/1.0.0``,
  answered for every peer), the relay's hop protocol (``/libp2p/circuit/relay/0.2.0/hop``, when
  ``relay_service`` is on; reservations, circuits, bytes and duration bounded by ``NatConfig``),
  and the stop protocol (``/libp2p/circuit/relay/0.2.0/stop``: accept a connection a relay
  brings us).
- **Learns its reachability**: every ``check_s`` it asks up to ``autonat_servers`` peers it is
  directly connected to to dial it back. ``public`` once one succeeds; ``private`` once
  ``min(3, asked)`` peers in a row could not (or refused: the address we gave is not the one they
  see us from, i.e. we are behind a NAT); ``unknown`` before.
- **While private**, holds a reservation on a relay chosen among the reachable peers it is
  connected to (``candidates()``: the node passes directly connected peers whose records carry
  no relayed address, lowest RTT first), refreshed before it expires and replaced when the relay
  goes away; ``relayed_addrs`` (``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit``) go into the node's
  signed record so others can reach it (``Host.connect_peer`` dials those through the relay).

py-libp2p 0.8.1 pieces used and what is wrapped (details in docs/ARCHITECTURE.md):

- ``CircuitV2Protocol`` (the relay's hop and stop handlers) is used as is; its transport
  (``CircuitV2Transport``, auto-reservations, relay discovery) is not: reserving and dialling
  are the few messages below, with our deadlines.
- ``AutoNATService``'s server dials back with ``host.connect``, which returns at once when a
  connection to the peer exists — always the case, the request came over it — so every peer
  whose observed IP matched would be told it is reachable. ``_DialBack`` replaces that dial with
  a fresh TCP connection to the address and a multistream-select handshake.
- ``DCUtRProtocol`` (``/libp2p/dcutr``, hole punching: upgrade a relayed connection to a direct
  one) is used with these changes (``_HolePunch``): only the side that *accepted* the relayed
  connection initiates (the spec's roles; the library drives from both sides), the per-peer
  connection limit is lifted for that peer only while its upgrade runs (idlefleet keeps one
  connection per peer), every attempt is bounded by ``hole_punch_timeout_s``, at most
  ``MAX_PUNCH_ADDRS`` plain TCP addresses of a peer are dialled, and the relayed connection is
  closed ``relay_close_s`` after a direct one is up (the library waits 60 s).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from .errors import PeerUnreachable

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger(__name__)

HOP_PROTOCOL = str(HOP_PROTOCOL_ID)  # /libp2p/circuit/relay/0.2.0/hop
STOP_PROTOCOL = str(STOP_PROTOCOL_ID)  # /libp2p/circuit/relay/0.2.0/stop
AUTONAT_PROTOCOL = str(AUTONAT_PROTOCOL_ID)  # /libp2p/autonat/1.0.0
DCUTR_PROTOCOL = str(DCUTR_PROTOCOL_ID)  # /libp2p/dcutr
STATUS_OK = 100  # circuit v2 Status.OK
MULTISTREAM = b"\x13/multistream/1.0.0\n"  # what every libp2p TCP listener says first

REACHABILITY = ("unknown", "public", "private")
MAX_PUNCH_ADDRS = 8  # addresses of a peer dialled in one hole punch


@dataclass(frozen=True)
class NatConfig:
    """Reachability checks and the relay service's limits (``[relay]`` in the node config)."""

    relay_service: bool = True  # offer relay slots to peers that cannot be dialled
    max_reservations: int = 8  # peers holding a slot on this relay at once
    max_circuits: int = 16  # concurrent relayed connections to one reserved peer
    max_circuit_bytes: int = 64 * 1024 * 1024  # per relayed connection, both directions
    max_circuit_duration_s: int = 3600  # a relayed connection is closed after this
    reservation_ttl_s: int = 3600  # a slot lasts this long unless refreshed
    autonat: bool = True  # check our own reachability (off: assume public)
    autonat_servers: int = 3  # peers asked per check
    check_s: float = 60.0  # re-check reachability (and the reservation) this often
    first_check_s: float = 2.0  # the first check, after the first connections
    op_timeout_s: float = 5.0  # one dial-back, reservation or relay dial
    hole_punch: bool = True  # upgrade relayed connections to direct ones (DCUtR)
    hole_punch_s: float = 2.0  # look for relayed connections to upgrade this often
    hole_punch_timeout_s: float = 30.0  # one whole upgrade attempt (up to 3 dial rounds)
    relay_close_s: float = 5.0  # close a relayed connection this long after a direct one is up

    def limits(self) -> RelayLimits:
        return RelayLimits(duration=self.max_circuit_duration_s, data=self.max_circuit_bytes,
                           max_circuit_conns=self.max_circuits, max_reservations=self.max_reservations,
                           reservation_ttl=self.reservation_ttl_s)


@dataclass
class NatStatistics:
    checks: int = 0
    dialbacks_ok: int = 0
    dialbacks_failed: int = 0
    reservations: int = 0  # reservations we made on relays
    reservation_failures: int = 0
    relay_dials: int = 0  # connections we opened through a relay
    relay_dial_failures: int = 0
    relayed_bytes: int = 0  # bytes this relay forwarded on circuits (both directions)
    hole_punches: int = 0  # upgrades this side initiated (DCUtR CONNECT sent or direct dial)
    hole_punches_ok: int = 0  # ... that ended with a direct connection
    relayed_closed: int = 0  # relayed connections closed because a direct one was up
    verdicts: dict[str, bool] = field(default_factory=dict)  # server peer id -> dialled us back


class _DialBack(AutoNATService):
    """py-libp2p's AutoNAT server with a dial-back that proves something: a fresh TCP connection
    to the address (which its observed-IP gate already matched against the requester's IP) and
    a multistream-select greeting from the listener there."""

    def __init__(self, host: Any, timeout_s: float) -> None:
        super().__init__(host, serve=True)
        self._timeout_s = timeout_s

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:4]:
            try:
                ma = multiaddr.Multiaddr(raw)
                ip, port = ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp"))
            except Exception:
                continue
            with trio.move_on_after(self._timeout_s):
                try:
                    stream = await trio.open_tcp_stream(ip, port)
                except OSError:
                    continue
                try:
                    await stream.send_all(MULTISTREAM)
                    got = b""
                    while len(got) < len(MULTISTREAM):
                        chunk = await stream.receive_some(len(MULTISTREAM) - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if got == MULTISTREAM:
                        return bytes(raw)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    with trio.move_on_after(1.0):
                        await stream.aclose()
        return None


def _relayed_only(conns: list[Any]) -> bool:
    """Whether every one of a peer's connections runs through a relay."""
    if not conns:
        return False
    for conn in conns:
        try:
            if not any(is_circuit(str(a)) for a in conn.get_transport_addresses()):
                return False
        except Exception:
            return False
    return True


class _HolePunch(DCUtRProtocol):
    """py-libp2p's DCUtR (``/libp2p/dcutr``) as idlefleet runs it; see the module docstring.

    The exchange itself (CONNECT with our addresses, CONNECT back, SYNC, then both sides dial from
    their listen port at once: a TCP simultaneous open through both NATs) is the library's."""

    def __init__(self, nat: Nat) -> None:
        timeout = max(1, int(nat.config.op_timeout_s))
        super().__init__(nat.host._host, read_timeout=timeout, write_timeout=timeout, dial_timeout=timeout)
        self._nat = nat
        self._closing: set[ID] = set()  # peers whose relayed connections are about to be closed

    def _tracker(self) -> Any:
        rm = getattr(self.host.get_network(), "_resource_manager", None)
        return getattr(rm, "connection_tracker", None)

    @contextlib.contextmanager
    def _second_connection_allowed(self, peer_id: ID) -> Any:
        """Lift the one-connection-per-peer limit for ``peer_id`` while its upgrade dials run
        (the resource manager's bypass list; other peers keep the limit)."""
        tracker = self._tracker()
        if tracker is not None:
            tracker.add_bypass_peer(peer_id)
        try:
            yield
        finally:
            if tracker is not None:
                tracker.remove_bypass_peer(peer_id)

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[Any], as_responder: bool = False) -> bool:
        with self._second_connection_allowed(peer_id):
            return bool(await super()._perform_hole_punch(peer_id, addrs, as_responder))

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        with self._second_connection_allowed(peer_id):
            return bool(await super()._try_unilateral_upgrade(peer_id))

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Any]:
        """A peer's addresses to dial, from its CONNECT: at most ``MAX_PUNCH_ADDRS`` plain TCP ones
        (the library takes every address that fits in 4 KiB: a relayed peer could make us dial
        hundreds of them)."""
        out = []
        for ma in super()._decode_observed_addrs(list(addr_bytes)[:64]):
            text = str(ma)
            if text.startswith(("/ip4/", "/ip6/")) and "/tcp/" in text and not is_circuit(text):
                out.append(ma)
        return out[:MAX_PUNCH_ADDRS]

    def _schedule_relay_close(self, peer_id: ID) -> None:
        if peer_id not in self._closing:  # both the library and our drive loop ask for it
            self._closing.add(peer_id)
            super()._schedule_relay_close(peer_id)

    async def _close_relayed_conns_after_grace(self, peer_id: ID, grace: float = 0.0) -> None:
        try:
            await self._close_relayed(peer_id)
        finally:
            self._closing.discard(peer_id)

    async def _close_relayed(self, peer_id: ID) -> None:
        await trio.sleep(self._nat.config.relay_close_s)
        if not await self._verify_direct_connection(peer_id):
            return  # never strand the peer
        peer = peer_id.to_base58()
        for conn in list(self.host.get_network().connections.get(peer_id, [])):
            if _relayed_only([conn]):
                with trio.move_on_after(self._nat.config.op_timeout_s), contextlib.suppress(Exception):
                    await conn.close()
                self._nat.stats.relayed_closed += 1
                log.info("relayed connection to %s closed: direct connection up", peer[-8:])
        self._nat.host._forget_streams(peer)  # reused streams may have been on the relayed one

    async def _auto_drive_loop(self) -> None:
        """Every ``hole_punch_s``: upgrade each peer connected to us only through a relay, when
        we accepted that connection (the spec's initiator: the peer behind the relay; the
        dialler answers). Each attempt is bounded; the library allows 3 per peer."""
        config = self._nat.config
        while True:
            await trio.sleep(config.hole_punch_s)
            network = self.host.get_network()
            for peer_id, conns in list(network.connections.items()):
                if (not _relayed_only(list(conns)) or peer_id in self._in_progress
                        or peer_id in self._direct_connections or peer_id in self._closing):
                    continue  # (_closing: just upgraded, its relayed connection is being closed)
                if not any(not _is_initiator(c) for c in conns):
                    continue  # we dialled through the relay: the other side initiates
                if self._hole_punch_attempts.get(peer_id, 0) >= 3:
                    continue
                self._nat.stats.hole_punches += 1
                ok = False
                with trio.move_on_after(config.hole_punch_timeout_s):
                    try:
                        ok = await self.initiate_hole_punch(peer_id)
                    except Exception as e:  # the peer's garbage or a vanished connection
                        log.debug("hole punch to %s: %r", peer_id, e)
                if ok:
                    self._nat.stats.hole_punches_ok += 1
                    self._schedule_relay_close(peer_id)  # (a direct dial without DCUtR does not)
                    log.info("direct connection to %s (hole punch)", peer_id.to_base58()[-8:])


def _is_initiator(conn: Any) -> bool:
    """Whether we opened ``conn`` (py-libp2p's muxers expose it as a property or a method)."""
    value = getattr(getattr(conn, "muxed_conn", None), "is_initiator", True)
    try:
        return bool(value() if callable(value) else value)
    except Exception:
        return True


def relay_of(circuit_addr: str) -> str:
    """``/ip4/R/tcp/P/p2p/<relay>`` of a ``.../p2p/<relay>/p2p-circuit[/p2p/<peer>]`` address."""
    return circuit_addr.split("/p2p-circuit")[0]


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


async def dial_via_relay(host: Host, circuit_addr: str, peer_id: str, timeout: float) -> None:
    """Connect to ``peer_id`` through the relay named in ``circuit_addr`` (circuit v2 CONNECT on a
    hop stream, then Noise + Yamux over it, as over TCP). Raises PeerUnreachable."""
    relay_addr = relay_of(circuit_addr)
    if "/p2p/" not in relay_addr:
        raise PeerUnreachable(f"{circuit_addr!r} names no relay")
    with trio.move_on_after(timeout) as scope:
        relay = await host.connect(relay_addr, timeout=timeout)
        stream = await host._host.new_stream(ID.from_base58(relay), [TProtocol(HOP_PROTOCOL)])
        try:
            await write_delimited_msg(stream, HopMessage(
                type=HopMessage.CONNECT, peer=CircuitPeerId(id=ID.from_base58(peer_id).to_bytes())))
            reply = await read_delimited_msg(stream, HopMessage)
            if reply.status != STATUS_OK:
                raise PeerUnreachable(f"relay {relay[-8:]} refused the circuit to {peer_id[-8:]}: "
                                      f"status {reply.status}")
            ma = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{peer_id}")
            raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                addresses=[ma])
            await host._host.upgrade_outbound_connection(raw, ID.from_base58(peer_id))
        except PeerUnreachable:
            await _reset(stream)
            raise
        except Exception as e:  # the relay or the peer went away, or sent garbage
            await _reset(stream)
            raise PeerUnreachable(f"through relay {relay[-8:]} to {peer_id[-8:]}: {e!r}") from None
    if scope.cancelled_caught:
        raise PeerUnreachable(f"through relay {relay_addr[-8:]} to {peer_id[-8:]}: over {timeout}s")


async def _reset(stream: Any) -> None:
    with trio.move_on_after(1.0), contextlib.suppress(Exception):  # resetting a dead stream may raise
        await stream.reset()


class Nat:
    """Reachability and relay slots for one host. See the module docstring."""

    def __init__(self, host: Host, config: NatConfig, candidates: Callable[[], list[str]],
                 on_change: Callable[[], None]) -> None:
        self.host = host
        self.config = config
        self.status = "unknown" if config.autonat else "public"
        self.relay: str | None = None  # the relay holding our slot
        self.relayed_addrs: list[str] = []  # ".../p2p/<relay>/p2p-circuit" (no /p2p/<us>)
        self.stats = NatStatistics()
        self._candidates = candidates
        self._on_change = on_change
        self._expires = 0.0  # wall clock end of our reservation
        self._autonat: _DialBack | None = None
        self._relay_proto: CircuitV2Protocol | None = None
        self._hole_punch: _HolePunch | None = None

    def _count_relayed_bytes(self, proto: CircuitV2Protocol) -> None:
        """Count what the relay forwards (``stats.relayed_bytes``): its circuits' only reads."""
        read = proto._read_stream_with_retry

        async def counted(stream: Any, *args: Any, **kwargs: Any) -> bytes | None:
            data = await read(stream, *args, **kwargs)
            self.stats.relayed_bytes += len(data or b"")
            return data

        proto._read_stream_with_retry = counted  # type: ignore[method-assign]

    def statistics(self) -> dict[str, Any]:
        out = {"reachability": self.status, "relay": self.relay, "relayed_addrs": list(self.relayed_addrs),
               "checks": self.stats.checks, "reservations": self.stats.reservations,
               "relay_dials": self.stats.relay_dials, "relayed_bytes": self.stats.relayed_bytes,
               "hole_punches": self.stats.hole_punches, "hole_punches_ok": self.stats.hole_punches_ok,
               "relayed_closed": self.stats.relayed_closed}
        if self._relay_proto is not None:
            rm = self._relay_proto.resource_manager
            out["relay_slots_held"] = len(getattr(rm, "_reservations", {}))
        return out

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        lhost = self.host._host
        self._autonat = _DialBack(lhost, self.config.op_timeout_s)  # registers the AutoNAT handler
        timeout = max(1, int(self.config.op_timeout_s))
        self._relay_proto = CircuitV2Protocol(
            lhost, self.config.limits(), allow_hop=self.config.relay_service,
            read_timeout=timeout, write_timeout=timeout, close_timeout=timeout)
        self._count_relayed_bytes(self._relay_proto)
        async with contextlib.AsyncExitStack() as services:
            await services.enter_async_context(background_trio_service(self._relay_proto))
            await self._relay_proto.event_started.wait()
            if self.config.hole_punch:
                self._hole_punch = _HolePunch(self)
                await services.enter_async_context(background_trio_service(self._hole_punch))
                await self._hole_punch.event_started.wait()
            task_status.started()
            await trio.sleep(self.config.first_check_s)
            while True:
                try:
                    await self._step()
                except Exception as e:  # a peer's bad answer must never end the node
                    log.warning("NAT check: %r", e)
                settled = self.status == "public" or (self.status == "private" and self.relay is not None)
                await trio.sleep(self.config.check_s if settled else min(5.0, self.config.check_s))

    async def _step(self) -> None:
        if self.config.autonat:
            await self.check_reachability()
        if self.status == "private":
            await self.ensure_reservation()
        elif self.relay is not None:
            self._set_relay(None, [])

    async def check_reachability(self) -> str:
        """Ask up to ``autonat_servers`` directly connected peers to dial us back; returns the
        status (``unknown`` when nobody could be asked)."""
        assert self._autonat is not None
        servers = [p for p in self._candidates() if p != self.host.peer_id][:self.config.autonat_servers]
        if not servers:
            return self.status
        self.stats.checks += 1
        addrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]).to_bytes() for a in self.host.multiaddrs()]
        results: dict[str, bool] = {}

        async def ask(server: str) -> None:
            try:
                status, _ = await self._autonat.query_server(  # type: ignore[union-attr]
                    ID.from_base58(server), addrs, timeout=self.config.op_timeout_s + 2.0)
            except Exception as e:  # unreachable server, garbage, deadline: no verdict
                log.debug("AutoNAT %s: %r", server[-8:], e)
                return
            results[server] = status == AutoNATMessage.OK

        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(ask, server)
        self.stats.verdicts.update(results)
        ok = sum(results.values())
        self.stats.dialbacks_ok += ok
        self.stats.dialbacks_failed += len(results) - ok
        before = self.status
        if ok:
            self.status = "public"
        elif results and len(results) >= min(3, len(servers)):
            self.status = "private"
        if self.status != before:
            log.info("reachability: %s (%d of %d peers dialled us back)", self.status, ok, len(results))
            self._on_change()
        return self.status

    async def ensure_reservation(self) -> bool:
        """Hold a slot on a relay: keep (refresh) the one we have while it is connected, else
        reserve on the next candidate. Returns whether we hold one."""
        connected = self.host.connected_peers()
        if self.relay in connected and time.time() < self._expires - 0.2 * self.config.reservation_ttl_s:
            return True
        if self.relay is not None and self.relay not in connected:
            self._set_relay(None, [])
        order = [self.relay] if self.relay is not None else []
        order += [p for p in self._candidates() if p != self.relay]
        for relay in order[:4]:
            addrs = await self._reserve(relay)
            if addrs is not None:
                self._set_relay(relay, addrs)
                return True
        return False

    async def _reserve(self, relay: str) -> list[str] | None:
        """RESERVE on ``relay``: our circuit addresses through it, or None if it said no."""
        try:
            with trio.fail_after(self.config.op_timeout_s):
                stream = await self.host._host.new_stream(ID.from_base58(relay), [TProtocol(HOP_PROTOCOL)])
                try:
                    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                    reply = await read_delimited_msg(stream, HopMessage)
                finally:
                    with trio.move_on_after(1.0):
                        await stream.close()
        except Exception as e:  # no hop service there, gone, garbage or too slow
            self.stats.reservation_failures += 1
            log.debug("reservation on %s: %r", relay[-8:], e)
            return None
        if reply.status != STATUS_OK or not reply.HasField("reservation"):
            self.stats.reservation_failures += 1
            log.info("relay %s refused a reservation: status %s", relay[-8:], reply.status)
            return None
        addrs = []
        for raw in list(reply.reservation.addrs)[:8]:
            try:
                ma = str(multiaddr.Multiaddr(bytes(raw)))
            except Exception:
                continue
            if ma.startswith("/ip4/") and ma.endswith(f"/p2p/{relay}") and not is_circuit(ma):
                addrs.append(f"{ma}/p2p-circuit")
        if not addrs:  # the relay did not say where it listens: nobody could use the slot
            self.stats.reservation_failures += 1
            return None
        self.stats.reservations += 1
        expire = float(reply.reservation.expire)
        self._expires = expire if expire > time.time() else time.time() + 600.0
        return addrs[:2]

    def _set_relay(self, relay: str | None, addrs: list[str]) -> None:
        changed = (relay, addrs) != (self.relay, self.relayed_addrs)
        self.relay, self.relayed_addrs = relay, addrs
        if changed:
            log.info("relay: %s", f"{relay} ({', '.join(addrs)})" if relay else "none")
            self._on_change()
