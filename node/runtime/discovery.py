"""DHT discovery: the node's record in the DHT, block providers, routing-table refresh, known peers.

One ``Discovery`` per node (``node.discovery``), started with ``await nursery.start(discovery.run)``:

- every record the node publishes is stored under ``/idlefleet/<peer_id>`` (coalesced: one put at
  a time, at least ``put_interval_s`` apart, always the newest record), so any peer can fetch a
  fresh copy by peer id;
- the DHT routing table is refreshed about every ``dht_refresh_s`` (a lookup of our own id and of
  a random one); while the node has fewer than ``target_peers`` connections it fetches, validates
  and connects to routing-table peers of its region it did not know;
- a serving node announces itself as a provider of its region's rendezvous CID and the blocks it
  hosts as providers of their CIDs (``protocols.dhtkeys``), at most 9 per 10.5 s (receivers
  accept 10 ADD_PROVIDER per 10 s), re-announced every ``reprovide_s``; while it has fewer than
  ``target_peers`` connections it looks its region up (``find_region_peers``) and connects;
- ``lookup_block_hosts`` (used by the client when gossip does not cover a block: another region,
  a node that just joined) finds providers by CID, fetches each provider's record by peer id and
  validates it before it enters the fleet view;
- with ``peers_file`` set, the peers seen are saved there (JSON, atomically) and tried as entry
  points on the next start (``entry_points``);
- the ``idlefleet`` DHT namespace accepts only valid records stored under their signer's key and
  keeps the newest (``dht_validate``, ``dht_select``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from idlefleet.node.files import write_json_atomic
from idlefleet.p2p.errors import NetworkError
from idlefleet.protocols.dhtkeys import block_provider_cid, record_key, region_rendezvous_cid
from idlefleet.protocols.errors import RecordRejected
from idlefleet.protocols.records import CapacityRecord, validate_record
from idlefleet.protocols.serving import peer_usable

if TYPE_CHECKING:
    from idlefleet.node.runtime.node import Node

log = logging.getLogger(__name__)

PEERS_FILE_VERSION = 1
MAX_SAVED_PEERS = 64
MAX_PEERS_FILE_BYTES = 256 * 1024


@dataclass(frozen=True)
class DiscoveryConfig:
    refresh_s: float = 60.0  # mean interval between routing-table refreshes (randomised +-50%)
    put_interval_s: float = 5.0  # at most one record put this often
    # py-libp2p accepts 10 ADD_PROVIDER per sender per 10 s: at most this many per window.
    provide_burst: int = 9
    provide_window_s: float = 10.5
    reprovide_s: float = 300.0
    retry_s: float = 5.0  # region announcement that reached nobody: try again this soon
    save_peers_s: float = 30.0
    op_timeout_s: float = 10.0  # one DHT operation (put, get, provide, find, refresh)
    max_lookup_providers: int = 8  # records fetched per block lookup
    peers_file: Path | None = None


def load_peers_file(path: Path) -> list[str]:
    """Full multiaddrs (``.../p2p/<peer id>``) saved in ``path``, most recent first. A missing file
    is empty; a damaged one is logged and ignored (never fatal: it only speeds up joining)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PEERS_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("cannot read peers file %s: %s", path, e)
        return []
    try:
        if len(raw) > MAX_PEERS_FILE_BYTES:
            raise ValueError(f"larger than {MAX_PEERS_FILE_BYTES} bytes")
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != PEERS_FILE_VERSION:
            raise ValueError(f"not a version {PEERS_FILE_VERSION} peers file")
        out = []
        for entry in data.get("peers", [])[:MAX_SAVED_PEERS]:
            pid, addrs = entry.get("peer_id"), entry.get("addrs")
            if not isinstance(pid, str) or not isinstance(addrs, list):
                raise ValueError("each peer needs a peer_id and a list of addrs")
            out += [f"{a}/p2p/{pid}" for a in addrs[:4]
                    if isinstance(a, str) and a.startswith("/") and "/p2p/" not in a]
        return out
    except (ValueError, AttributeError, TypeError) as e:
        log.warning("ignoring peers file %s: %s", path, e)
        return []


def save_peers_file(path: Path, records: Iterable[CapacityRecord]) -> int:
    """Write the peers of ``records`` to ``path`` (atomically). Returns how many were saved."""

    peers = [{"peer_id": r.peer_id, "addrs": list(r.addrs)} for r in records if r.addrs]
    peers = peers[:MAX_SAVED_PEERS]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"version": PEERS_FILE_VERSION, "saved_at": time.time(), "peers": peers})
    return len(peers)


def dht_record_key(peer_id: str) -> str:
    """DHT key under which a node stores its latest signed record (namespace ``idlefleet``)."""
    return record_key(peer_id)


def dht_validate(key: str, value: bytes) -> None:
    """The namespace's validator: raises RecordRejected unless ``value`` is a valid record stored
    under its own signer's key."""
    record = validate_record(value, time.time())
    if key != dht_record_key(record.peer_id):
        raise RecordRejected("signer_mismatch", f"record of {record.peer_id} stored under {key}")


def dht_select(key: str, values: list[bytes]) -> int:
    """The namespace's selector: the index of the valid record with the highest sequence number."""
    best, best_seq = 0, -1
    for i, v in enumerate(values):
        try:
            seq = validate_record(v, time.time()).seq
        except RecordRejected:
            continue
        if seq > best_seq:
            best, best_seq = i, seq
    return best


def spread_order(start: int, end: int, stride: int) -> list[int]:
    """``range(start, end)`` reordered so each run of ``stride`` blocks spans the whole range
    (0, 9, 18, 27, 1, 10, ...): a client looking up the blocks it misses (``lookup_block_hosts``
    tries each in turn) finds this host after the first paced burst, not after the last."""
    return sorted(range(start, end), key=lambda b: ((b - start) % stride, b))


class Discovery:
    """The node's DHT presence and DHT-based lookups. Owned by ``Node``."""

    def __init__(self, node: Node, config: DiscoveryConfig) -> None:
        self.node = node
        self.config = config
        self.stats: dict[str, int] = {"puts": 0, "put_failures": 0, "refreshes": 0, "provides": 0,
                                      "lookups": 0, "records_fetched": 0, "region_provides": 0,
                                      "region_lookups": 0}
        self._latest: tuple[int, bytes] | None = None
        self._record_ready = trio.Event()
        self._provide_wanted = trio.Event()
        self._rng = random.Random(node.peer_id)
        self._saved = load_peers_file(config.peers_file) if config.peers_file else []

    # -- what the node and the client call -----------------------------------------------------
    def record_published(self, seq: int, raw: bytes) -> None:
        """The node signed a new record: store it in the DHT soon (the newest one wins)."""
        self._latest = (seq, raw)
        self._record_ready.set()

    def blocks_changed(self) -> None:
        """The hosted blocks changed: announce them as providers soon."""
        self._provide_wanted.set()

    def entry_points(self) -> list[str]:
        """Saved peers' multiaddrs (from ``peers_file``), most recently seen first."""
        return [a for a in self._saved if not a.endswith(self.node.peer_id)]

    async def fetch_record(self, peer_id: str, *, region: str | None = None) -> CapacityRecord | None:
        """``peer_id``'s record from the DHT, validated and accepted into the fleet view (only if
        it is of ``region``, when given). None if there is none, or it is invalid, not newer than
        what we hold or of another region. Raises NetworkError."""
        raw = await self.node.host.dht_get(record_key(peer_id), timeout=self.config.op_timeout_s)
        if raw is None:
            return None
        self.stats["records_fetched"] += 1
        try:
            record = validate_record(raw, time.time(), last_seq=self.node.view.last_seq(peer_id))
        except RecordRejected as e:
            if e.reason != "stale_sequence":
                log.info("DHT record of %s rejected: %s", peer_id[-8:], e)
            return None
        if record.peer_id != peer_id:
            log.info("DHT record under %s is signed by %s", peer_id[-8:], record.peer_id[-8:])
            return None
        if region is not None and record.region != region:
            return None
        self.node.accept_relayed(raw)
        return record

    async def lookup_block_hosts(self, model_id: str, blocks: Iterable[int], *,
                                 timeout: float = 20.0) -> list[CapacityRecord]:
        """Hosts of ``blocks`` of ``model_id`` found through the DHT: providers by CID, then their
        records by peer id, each validated and accepted into the fleet view. Bounded by ``timeout``;
        returns what was found by then (routing takes it from the view)."""
        self.stats["lookups"] += 1
        found: dict[str, CapacityRecord] = {}
        tried: set[str] = {self.node.peer_id}
        with trio.move_on_after(timeout):
            for block in sorted(set(blocks))[:256]:
                if any(r.blocks and r.blocks[0] <= block < r.blocks[1] for r in found.values()):
                    continue
                try:
                    providers = await self.node.host.dht_find_providers(
                        block_provider_cid(model_id, block), timeout=self.config.op_timeout_s)
                except NetworkError as e:
                    log.debug("providers of block %d: %s", block, e)
                    continue
                fresh = [p for p in providers if p not in tried][:self.config.max_lookup_providers]
                tried.update(fresh)
                for pid in fresh:
                    try:
                        record = await self.fetch_record(pid)
                    except NetworkError as e:
                        log.debug("record of provider %s: %s", pid[-8:], e)
                        continue
                    if record is None:
                        known = self.node.view.get(pid)
                        record = known.record if known else None
                    if record is not None and peer_usable(record, "hosts", model_id=model_id) is None:
                        found[pid] = record
        log.info("DHT lookup of %s block(s): %d host(s) found", len(set(blocks)), len(found))
        return list(found.values())

    async def find_region_peers(self, region: str, *, at_most: int = 8) -> list[CapacityRecord]:
        """Live nodes of ``region`` found through the DHT: providers of the region's rendezvous CID,
        then their records by peer id, each validated (and of that region) before it enters the
        fleet view. Raises NetworkError if the provider lookup fails."""
        self.stats["region_lookups"] += 1
        providers = await self.node.host.dht_find_providers(region_rendezvous_cid(region),
                                                            timeout=self.config.op_timeout_s)
        found = []
        for pid in [p for p in providers if p != self.node.peer_id][:at_most]:
            try:
                record = await self.fetch_record(pid, region=region)
            except NetworkError as e:
                log.debug("record of region peer %s: %s", pid[-8:], e)
                continue
            if record is None:
                known = self.node.view.get(pid)
                record = known.record if known and known.record.region == region else None
            if record is not None:
                found.append(record)
        return found

    # -- background work -------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._store_records)
            nursery.start_soon(self._refresh)
            nursery.start_soon(self._provide)
            if self.config.peers_file is not None:
                nursery.start_soon(self._save_peers)
            task_status.started()

    async def _store_records(self) -> None:
        while True:
            await self._record_ready.wait()
            self._record_ready = trio.Event()
            assert self._latest is not None
            seq, raw = self._latest
            try:
                await self.node.host.dht_put(record_key(self.node.peer_id), raw,
                                             timeout=self.config.op_timeout_s)
                self.stats["puts"] += 1
            except NetworkError as e:
                self.stats["put_failures"] += 1
                log.debug("DHT put of record %d: %s", seq, e)
            await trio.sleep(self.config.put_interval_s)

    async def _refresh(self) -> None:
        await trio.sleep(self._rng.uniform(1.0, 3.0))  # after the first connections
        while True:
            try:
                size = await self.node.host.dht_refresh(timeout=self.config.op_timeout_s)
                self.stats["refreshes"] += 1
                log.debug("DHT routing table: %d peers", size)
                await self._meet_routing_peers()
            except NetworkError as e:
                log.debug("DHT refresh: %s", e)
            await trio.sleep(self.config.refresh_s * self._rng.uniform(0.5, 1.5))

    async def _meet_routing_peers(self, at_most: int = 4) -> None:
        """Too few connections: look our region up by its rendezvous key, and fetch records of
        routing-table peers we do not know; connect to those of our region (the others stay out
        of the view: gossip would never refresh them)."""
        node = self.node
        if len(node.host.connected_peers()) >= node.config.target_peers:
            return
        try:
            for found in await self.find_region_peers(node.config.region, at_most=at_most):
                node.connect_soon(found)
        except NetworkError as e:
            log.debug("region lookup: %s", e)
        unknown = [p for p in node.host.dht_routing_peers()
                   if p not in node.host.connected_peers() and node.view.get(p) is None]
        for pid in unknown[:at_most]:
            try:
                record = await self.fetch_record(pid, region=node.config.region)
            except NetworkError:
                continue
            if record is not None:
                node.connect_soon(record)

    async def _provide(self) -> None:
        sent: list[float] = []  # when recent ADD_PROVIDER messages went out (pacing spans rounds)
        now = trio.current_time()
        # Region rendezvous: serving nodes only (short-lived clients would fill the key's 20
        # provider slots with peers that are gone); retried soon while nobody took it.
        region_due = now + self._rng.uniform(1.0, 3.0) if self.node.config.serve else math.inf
        blocks_due = now + self.config.reprovide_s
        while True:
            with trio.move_on_after(max(0.0, min(region_due, blocks_due) - trio.current_time())):
                await self._provide_wanted.wait()
                self._provide_wanted = trio.Event()
                blocks_due = trio.current_time() + self.config.reprovide_s
                await self._provide_blocks(sent)
                continue
            if trio.current_time() >= region_due:
                await self._pace(sent)
                ok = False
                try:
                    ok = await self.node.host.dht_provide(
                        region_rendezvous_cid(self.node.config.region), timeout=self.config.op_timeout_s)
                    self.stats["region_provides"] += ok
                except NetworkError as e:
                    log.debug("DHT provide region: %s", e)
                region_due = trio.current_time() + (self.config.reprovide_s if ok else self.config.retry_s)
            if trio.current_time() >= blocks_due:
                blocks_due = trio.current_time() + self.config.reprovide_s
                await self._provide_blocks(sent)

    async def _pace(self, sent: list[float]) -> None:
        """Wait until one more ADD_PROVIDER keeps us within ``provide_burst`` per window."""
        if len(sent) >= self.config.provide_burst:
            await trio.sleep_until(sent[-self.config.provide_burst] + self.config.provide_window_s)
        sent.append(trio.current_time())
        del sent[:-self.config.provide_burst]

    async def _provide_blocks(self, sent: list[float]) -> None:
        model_id, blocks = self.node.model_id, self.node.blocks
        if not model_id or blocks is None:
            return
        for block in spread_order(*blocks, self.config.provide_burst):
            if self._provide_wanted.is_set():
                return  # the range changed meanwhile: announce the new one
            await self._pace(sent)
            try:
                await self.node.host.dht_provide(block_provider_cid(model_id, block),
                                                 timeout=self.config.op_timeout_s)
                self.stats["provides"] += 1
            except NetworkError as e:
                log.debug("DHT provide block %d: %s", block, e)

    async def _save_peers(self) -> None:
        path = self.config.peers_file
        assert path is not None
        while True:
            await trio.sleep(self.config.save_peers_s)
            self.save_peers()

    def save_peers(self) -> None:
        """Save the live peers now (kept as they were if we see nobody: an isolated node must not
        forget its way back)."""
        path = self.config.peers_file
        if path is None:
            return
        now = time.time()
        others = [e.record for e in self.node.view.alive(now)
                  if e.record.peer_id != self.node.peer_id and peer_usable(e.record, "dial") is None]
        others.sort(key=lambda r: r.issued_at, reverse=True)
        if not others:
            return
        try:
            save_peers_file(path, others)
        except OSError as e:
            log.warning("cannot save peers file %s: %s", path, e)
