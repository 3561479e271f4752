"""The in-memory network's DHT (p2p/memory.py): a Kademlia-like store without libp2p.

Values and provider records go to the ``DHT_CLOSEST`` hosts closest to the key (XOR distance of
SHA-256 ids) among those reachable over connections whose links do not hang (a lookup walks the
network, as Kademlia's iterative one does); every value is checked by the receiver's namespace
validator and the best copy chosen by ``select``, as ``p2p.host.Host``'s DHT does. Each host
answered costs one round trip of the link delay.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .errors import DeadlineExceeded, NetworkError

if TYPE_CHECKING:
    from .memory import MemoryHost, MemoryNetwork

log = logging.getLogger(__name__)

DHT_CLOSEST = 20  # Kademlia's k

Validate = Callable[[str, bytes], None]
Select = Callable[[str, list[bytes]], int]


def _distance(a: str, b: str) -> int:
    """Kademlia's XOR distance between the SHA-256 of two ids (peer ids or keys)."""
    da = hashlib.sha256(a.encode()).digest()
    db = hashlib.sha256(b.encode()).digest()
    return int.from_bytes(bytes(x ^ y for x, y in zip(da, db, strict=True)), "big")


class MemoryDht:
    """The DHT half of ``MemoryHost`` (a mixin: it keeps this host's stores and routing table)."""

    network: MemoryNetwork
    peer_id: str
    stats: Any
    _config: Any

    def _init_dht(self) -> None:
        self._dht_validators: dict[str, tuple[Validate, Select]] = {}
        self._values: dict[str, bytes] = {}
        self._providers: dict[str, set[str]] = {}
        self._routing: set[str] = set()

    def register_dht_namespace(self, namespace: str, validate: Callable[[str, bytes], None],
                               select: Callable[[str, list[bytes]], int]) -> None:
        self._dht_validators[namespace] = (validate, select)

    def _validator(self, key: str) -> tuple[Callable[[str, bytes], None], Callable[[str, list[bytes]], int]]:
        parts = key.split("/")
        found = self._dht_validators.get(parts[1]) if len(parts) > 2 and not parts[0] else None
        if found is None:
            raise ValueError(f"no validator for the namespace of {key!r}")
        return found

    def _store(self, key: str, value: bytes) -> bool:
        """A PUT reaching us: validate, keep the better of ours and it. False if refused."""
        try:
            validate, select = self._validator(key)
            validate(key, value)
        except Exception as e:
            log.debug("DHT put %s refused: %r", key, e)
            return False
        old = self._values.get(key)
        if old is None and len(self._values) >= self._config.dht_max_values:
            self.stats.dht_refused += 1
            return False
        if old is not None and select(key, [old, value]) == 0:
            return True
        self._values[key] = value
        return True

    def _reachable_closest(self, target: str) -> list[MemoryHost]:
        """The live hosts reachable over connections from us (a lookup walks the network), the
        ``DHT_CLOSEST`` closest to ``target``; links that hang are not crossed."""
        net = self.network
        seen, frontier = {self.peer_id}, [self.peer_id]
        while frontier:
            nxt = []
            for pid in frontier:
                for other in net.hosts[pid].connected_peers():
                    if other not in seen and net.reachable(pid, other):
                        seen.add(other)
                        nxt.append(other)
            frontier = nxt
        seen.discard(self.peer_id)
        self._routing |= seen
        return [net.hosts[p] for p in sorted(seen, key=lambda p: _distance(p, target))[:DHT_CLOSEST]]

    async def _round_trip(self, other: MemoryHost) -> None:
        await trio.sleep(2 * self.network.delay(self.peer_id, other.peer_id))

    async def _dht_op(self, coro: Awaitable[Any], timeout: float | None, what: str) -> Any:
        timeout = timeout or self._config.dht_timeout_s
        try:
            with trio.fail_after(timeout):
                return await coro
        except trio.TooSlowError:
            raise DeadlineExceeded(f"DHT {what} took over {timeout}s") from None

    async def dht_put(self, key: str, value: bytes, *, timeout: float | None = None) -> None:
        """Store ``value`` here and at the closest reachable hosts (each validates it)."""
        try:
            self._validator(key)[0](key, value)
        except Exception as e:
            raise NetworkError(f"DHT put {key} failed: {e!r}") from None

        async def _put() -> None:
            self._store(key, value)
            for other in self._reachable_closest(key):
                await self._round_trip(other)
                other._store(key, value)

        await self._dht_op(_put(), timeout, f"put {key}")

    async def dht_get(self, key: str, *, timeout: float | None = None) -> bytes | None:
        """The best valid value for ``key`` among ours and the closest reachable hosts'."""

        async def _get() -> bytes | None:
            try:
                validate, select = self._validator(key)
            except ValueError as e:
                raise NetworkError(f"DHT get {key} failed: {e}") from None
            values = [v for v in [self._values.get(key)] if v is not None]
            for other in self._reachable_closest(key):
                await self._round_trip(other)
                value = other._values.get(key)
                if value is None:
                    continue
                try:
                    validate(key, value)
                except Exception as e:
                    log.debug("DHT get %s: invalid value from %s: %s", key, other.peer_id, e)
                    continue
                values.append(value)
            return values[select(key, values)] if values else None

        return await self._dht_op(_get(), timeout, f"get {key}")  # type: ignore[no-any-return]

    async def dht_provide(self, cid: str, *, timeout: float | None = None) -> bool:
        """Announce ourselves as a provider of ``cid`` to the closest reachable hosts."""

        async def _provide() -> bool:
            self._providers.setdefault(cid, set()).add(self.peer_id)
            closest = self._reachable_closest(cid)
            for other in closest:
                await self._round_trip(other)
                other._providers.setdefault(cid, set()).add(self.peer_id)
            return bool(closest)

        return bool(await self._dht_op(_provide(), timeout, f"provide {cid}"))

    async def dht_find_providers(self, cid: str, *, count: int = 20,
                                 timeout: float | None = None) -> list[str]:
        """Providers of ``cid``: our own store if it has any, else the network's."""

        async def _find() -> list[str]:
            found = set(self._providers.get(cid, set()))
            if not found:
                for other in self._reachable_closest(cid):
                    await self._round_trip(other)
                    found |= other._providers.get(cid, set())
            return sorted(found)[:count]

        return await self._dht_op(_find(), timeout, f"find_providers {cid}")  # type: ignore[no-any-return]

    async def dht_refresh(self, *, timeout: float | None = None) -> int:
        async def _walk() -> None:
            self._reachable_closest(self.peer_id)
            await trio.lowlevel.checkpoint()

        await self._dht_op(_walk(), timeout, "refresh")
        return self.dht_routing_table_size()

    def dht_routing_peers(self) -> list[str]:
        return sorted(p for p in self._routing if p in self.network.hosts)

    def dht_routing_table_size(self) -> int:
        return len(self.dht_routing_peers())

    def dht_store_sizes(self) -> tuple[int, int]:
        return len(self._values), len(self._providers)

