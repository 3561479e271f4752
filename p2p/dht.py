"""The host's Kademlia DHT: strict namespaced validators, bounded stores, operations with deadlines.

``Dht`` builds py-libp2p's ``KadDHT`` (server mode, only namespaces we register) with bounds on
what remote peers can make it store, and runs every operation under a deadline, translating the
library's assorted failures into ``NetworkError``/``DeadlineExceeded``. The ``Host`` facade holds
one and delegates its ``dht_*`` methods to it; ``open_host`` runs ``Dht.kad`` as a service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record as KadRecord
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator, Validator

from .boundary import PENALTY_REJECTED, HostStatistics
from .config import HostConfig
from .errors import DeadlineExceeded, NetworkError
from .guard import Misbehaviour

log = logging.getLogger(__name__)

# py-libp2p 0.8.1 always speaks the standard Kademlia protocol (its ``protocol_prefix`` is read only
# by ``validate_config``): idlefleet namespaces its DHT *keys* instead (protocols/dhtkeys.py).
DHT_PROTOCOL = TProtocol(KAD_PROTOCOL_ID)
assert DHT_PROTOCOL == "/ipfs/kad/1.0.0", "docs/PROTOCOL.md section 5 names this protocol id"
DHT_PEER_TIMEOUT_S = 3.0  # one DHT request to one peer (the library's own is 10 s)
DHT_GET_PEERS = 20  # a get asks this many of the closest peers at once


class _CallbackValidator(Validator):
    """Adapts a pair of plain functions to the DHT's record validator interface."""

    def __init__(self, validate: Callable[[str, bytes], None], select: Callable[[str, list[bytes]], int]):
        self._validate = validate
        self._select = select

    def validate(self, key: str, value: bytes) -> None:
        self._validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._select(key, values)


class Dht:
    """This node's DHT server and client. ``kad`` is the py-libp2p service to run.

    Every operation takes ``timeout`` (default ``config.dht_timeout_s``) and raises
    DeadlineExceeded past it, or NetworkError when py-libp2p fails (peers vanish mid-lookup).
    Cancellation propagates; nothing is left running.
    """

    def __init__(self, lhost: Any, config: HostConfig, stats: HostStatistics,
                 misbehaviour: Misbehaviour) -> None:
        self._lhost = lhost
        self._config = config
        # Speaks DHT_PROTOCOL (/ipfs/kad/1.0.0) whatever the prefix. Only namespaces we register
        # (with validators that bound size and check signatures) are stored: no default pk/ipns.
        self.kad = KadDHT(lhost, DHTMode.SERVER, validator=NamespacedValidator({}, strict_validation=True),
                          validator_changed=True, strict_validation=True)
        _bound_stores(self.kad, config, stats, misbehaviour)

    def register_namespace(self, namespace: str, validate: Callable[[str, bytes], None],
                           select: Callable[[str, list[bytes]], int]) -> None:
        """Keys ``/<namespace>/...`` are checked by ``validate`` (raise to reject) and ``select``."""
        self.kad.register_validator(namespace, _CallbackValidator(validate, select))

    async def put(self, key: str, value: bytes, *, timeout: float | None = None) -> None:
        """Store ``value`` under ``key`` locally and at the closest peers the network knows."""

        async def _put() -> None:
            await self._sync_routing_table()
            await self.kad.put_value(key, value)

        await self._op(_put(), timeout, f"put {key}")

    async def get(self, key: str, *, timeout: float | None = None) -> bytes | None:
        """The best value for ``key`` (the namespace's ``select``) among our own copy and the
        closest peers' answers, each validated. py-libp2p's ``get_value`` returns any local copy
        without asking the network, so a copy fetched once would be served stale forever."""
        return await self._op(self._get_best(key), timeout, f"get {key}")  # type: ignore[no-any-return]

    async def _get_best(self, key: str) -> bytes | None:
        await self._sync_routing_table()
        key_bytes = key.encode("utf-8")
        values: list[bytes] = []
        local = self.kad.value_store.get(key_bytes)
        if local is not None:
            values.append(bytes(local.value))
        me = self._lhost.get_id()
        peers = [p for p in await self.kad.peer_routing.find_closest_peers_network(key_bytes) if p != me]

        async def ask(peer: ID) -> None:
            with trio.move_on_after(DHT_PEER_TIMEOUT_S):
                try:
                    reply = await self.kad.value_store._get_from_peer(peer, key_bytes, return_record=True)
                except Exception as e:  # a vanished or hostile peer: its answer does not count
                    log.debug("DHT get %s from %s: %r", key, peer, e)
                    return
                if not isinstance(reply, KadRecord) or not reply.value:
                    return
                try:
                    self.kad.validator.validate(key, reply.value)  # type: ignore[union-attr]
                except Exception as e:
                    log.debug("DHT get %s: invalid value from %s: %s", key, peer, e)
                    return
                values.append(bytes(reply.value))

        async with trio.open_nursery() as nursery:
            for peer in peers[:DHT_GET_PEERS]:
                nursery.start_soon(ask, peer)
        if not values:
            return None
        return values[self.kad.validator.select(key, values)]  # type: ignore[union-attr]

    async def provide(self, cid: str, *, timeout: float | None = None) -> bool:
        """Announce ourselves as a provider of ``cid`` (text CID; the wire key is its multihash)
        to the closest peers (ADD_PROVIDER). Receivers accept at most 10 ADD_PROVIDER messages
        per sender in 10 s (py-libp2p's limit): callers pace announcements. Returns whether at
        least one peer was sent the announcement."""

        async def _provide() -> bool:
            await self._sync_routing_table()
            return bool(await self.kad.provide(cid))

        return bool(await self._op(_provide(), timeout, f"provide {cid}"))

    async def find_providers(self, cid: str, *, count: int = 20,
                             timeout: float | None = None) -> list[str]:
        """Peer ids announced as providers of ``cid``: our own store if it has any, else the
        network's. Providers' addresses go to the peerstore."""
        infos = await self._op(self.kad.find_providers(cid, count), timeout, f"find_providers {cid}")
        return sorted({i.peer_id.to_base58() for i in infos})  # the library does not deduplicate

    async def refresh(self, *, timeout: float | None = None) -> int:
        """Keep the routing table alive (a Kademlia refresh): look up our own id and a random one
        through the network, adding every responsive peer met. Returns the table size."""

        async def _walk() -> None:
            await self._sync_routing_table()
            me = self._lhost.get_id()
            for target in (me.to_bytes(), os.urandom(32)):
                for peer in await self.kad.peer_routing.find_closest_peers_network(target):
                    if peer != me:
                        await self.kad.add_peer(peer)

        await self._op(_walk(), timeout, "refresh")
        return self.routing_table_size()

    async def add_peer(self, pid: ID) -> None:
        """Add a peer we connected to to the routing table (py-libp2p does not); failures are
        only logged. The caller bounds the time."""
        try:
            await self.kad.add_peer(pid)
        except Exception as e:
            log.debug("DHT add_peer %s: %r", pid, e)

    def remove_peer(self, pid: ID) -> None:
        """Drop an evicted peer from the routing table; failures are only logged."""
        try:
            self.kad.routing_table.remove_peer(pid)
        except Exception as e:
            log.debug("routing table remove %s: %r", str(pid)[-8:], e)

    def routing_peers(self) -> list[str]:
        """Peer ids in the routing table."""
        return [p.to_base58() for p in self.kad.routing_table.get_peer_ids()]

    def routing_table_size(self) -> int:
        return int(self.kad.get_routing_table_size())

    def store_sizes(self) -> tuple[int, int]:
        """(values stored, provider keys stored) in this node's DHT server."""
        return len(self.kad.value_store.store), len(self.kad.provider_store.providers)

    async def _sync_routing_table(self) -> None:
        """Add connected peers missing from the routing table. py-libp2p adds a peer only when we
        dial it (``Host._connect_info``) or it sends us a DHT request, so a node that was dialled
        (a bootstrap node) would otherwise store and look up values among too few peers."""
        table = self.kad.routing_table
        for pid, conns in list(self._lhost.get_network().connections.items()):
            if conns and not table.peer_in_table(pid):
                with trio.move_on_after(DHT_PEER_TIMEOUT_S):
                    await self.add_peer(pid)

    async def _op(self, coro: Awaitable[Any], timeout: float | None, what: str) -> Any:
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


def _bound_stores(dht: KadDHT, config: HostConfig, stats: HostStatistics,
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
