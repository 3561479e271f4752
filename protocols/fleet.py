"""The fleet view: which peers are alive and their latest valid record. Pure state, fed events.

Inputs are already-validated records and peer-down notices plus ``now``; the view decides what is
alive. A peer is alive while its latest record is unexpired, its state is not ``offline`` and no
peer-down notice covers that record. Sequence floors outlive removal (until the record that set them
would have expired anyway), so an old record replayed after a peer left cannot resurrect it.

The view is bounded (``max_entries``): records cost nothing to mint (a fresh key signs a valid one),
so a stranger's record may only displace another stranger's. When the view is full, a new peer
replaces the entry least worth keeping — not alive first, then never verified (no liveness round
trip with this node), oldest first; if every entry is a live, verified peer the newcomer is refused.
A peer is *verified* once this node completed a liveness round trip with it (``mark_verified``).
"""

from __future__ import annotations

from dataclasses import dataclass

from idlefleet.protocols.records import CapacityRecord


@dataclass(frozen=True)
class FleetEntry:
    record: CapacityRecord
    raw: bytes  # the signed bytes, so we can forward them for others to verify
    received_at: float


MAX_ENTRIES = 1000


class FleetView:
    """Latest record per peer, with liveness. Not thread-safe; owned by one node task."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, FleetEntry] = {}
        self._verified: dict[str, float] = {}  # peer -> when its last liveness round trip completed
        self._down: dict[str, tuple[int, float]] = {}  # peer -> (covered seq, until)
        self._floor: dict[str, tuple[int, float]] = {}  # peer -> (highest seq seen, expires_at)
        self.changes = 0

    def last_seq(self, peer_id: str) -> int | None:
        """Highest sequence number seen from ``peer_id`` (for replay rejection), or None."""
        floor = self._floor.get(peer_id)
        return None if floor is None else floor[0]

    def accept(self, record: CapacityRecord, raw: bytes, now: float) -> bool:
        """Take a validated record (the caller checked seq > last_seq). Returns True if the peer is
        alive afterwards; False also when the view is full of live, verified peers (the record is
        then not kept: check ``get``)."""
        if record.peer_id not in self._entries and len(self._entries) >= self.max_entries \
                and not self._make_room(now):
            return False
        # Keep the floor until every record it stops has expired: a newer record may expire sooner.
        prev_floor = self._floor.get(record.peer_id)
        until = max(record.expires_at, prev_floor[1]) if prev_floor else record.expires_at
        self._floor[record.peer_id] = (record.seq, until)
        down = self._down.get(record.peer_id)
        if down is not None and record.seq > down[0]:
            del self._down[record.peer_id]  # a fresh record refutes the notice
        self._entries[record.peer_id] = FleetEntry(record, raw, now)
        self.changes += 1
        return self.is_alive(record.peer_id, now)

    def mark_down(self, peer_id: str, seq: int, now: float, hold_s: float = 600.0) -> bool:
        """Mark records up to ``seq`` of ``peer_id`` dead. ``seq`` is bounded by the highest one seen
        from the peer, so any record it signs later refutes this. Returns True if a live peer left."""
        floor = self._floor.get(peer_id)
        if floor is None:
            return False
        seq = min(seq, floor[0])
        self._verified.pop(peer_id, None)
        was_alive = self.is_alive(peer_id, now)
        prev = self._down.get(peer_id)
        self._down[peer_id] = (max(seq, prev[0] if prev else -1), now + hold_s)
        if was_alive and not self.is_alive(peer_id, now):
            self.changes += 1
            return True
        return False

    def is_alive(self, peer_id: str, now: float) -> bool:
        entry = self._entries.get(peer_id)
        if entry is None or entry.record.expires_at <= now or entry.record.state == "offline":
            return False
        down = self._down.get(peer_id)
        return down is None or entry.record.seq > down[0]

    def get(self, peer_id: str) -> FleetEntry | None:
        return self._entries.get(peer_id)

    def mark_verified(self, peer_id: str, now: float) -> None:
        """This node completed a liveness round trip with ``peer_id``."""
        self._verified[peer_id] = now
        if len(self._verified) > 2 * self.max_entries:  # round trips with peers we hold no record of
            for p in [p for p in self._verified if p not in self._entries]:
                del self._verified[p]

    def verified_at(self, peer_id: str) -> float | None:
        return self._verified.get(peer_id)

    def preferred(self, now: float, limit: int) -> list[FleetEntry]:
        """Up to ``limit`` live entries, verified peers first (most recently verified first), then
        the others, newest record first. What a status reply carries."""
        alive = [e for p, e in self._entries.items() if self.is_alive(p, now)]
        alive.sort(key=lambda e: (e.record.peer_id not in self._verified,
                                  -self._verified.get(e.record.peer_id, 0.0), -e.received_at,
                                  e.record.peer_id))
        return alive[:limit]

    def __len__(self) -> int:
        return len(self._entries)

    def _make_room(self, now: float) -> bool:
        """Evict the entry least worth keeping (see the module docstring). False if none may go."""
        def worth(p: str) -> tuple[bool, bool, float]:
            return (self.is_alive(p, now), p in self._verified, self._entries[p].received_at)
        victim = min(self._entries, key=worth)
        alive, verified, _ = worth(victim)
        if alive and verified:
            return False
        del self._entries[victim]
        self.changes += 1
        return True

    def alive(self, now: float) -> list[FleetEntry]:
        """Entries of live peers, sorted by peer id."""
        return [self._entries[p] for p in sorted(self._entries) if self.is_alive(p, now)]

    def prune(self, now: float) -> None:
        """Forget what can no longer matter: expired entries, notices and floors."""
        for p in [p for p, e in self._entries.items() if e.record.expires_at <= now]:
            del self._entries[p]
            self._verified.pop(p, None)
        for p in [p for p, (_, until) in self._down.items() if until <= now]:
            del self._down[p]
        # An expired record is rejected by validation anyway, so its floor is no longer needed.
        for p in [p for p, (_, exp) in self._floor.items() if exp <= now and p not in self._entries]:
            del self._floor[p]
