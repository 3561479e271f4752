"""Per-peer accounting for the crash boundary: misbehaviour scores, rate limits, aggregated logging.

Hostile input is normal, so rejecting it must be cheap and quiet: a flood of garbage must not cost
one log line (or one event) per message. ``Misbehaviour`` counts every rejection per reason and per
peer and writes one summary line per interval; ``TokenBuckets`` is the cheap per-sender budget
checked before any expensive work (a signature check) is spent on a message.

Both are bounded: they remember at most ``max_peers``/``max_keys`` entries (least recently touched
evicted first), so fresh keys cannot grow them without limit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)


@dataclass
class PeerConduct:
    """What one peer did wrong: its score (sum of penalties) and counts per reason."""

    score: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class Misbehaviour:
    """Counts rejected input per reason and per peer; logs one aggregated line per interval.

    ``note(peer, reason, penalty)``: ``penalty`` 0 counts the event without blaming the peer
    (routine events such as a replayed stale record); anything else adds to the peer's score,
    which other components consult with ``score(peer)``.
    """

    def __init__(self, *, max_peers: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, PeerConduct] = OrderedDict()
        self.totals: Counter[str] = Counter()  # since start, per reason
        self._pending: Counter[str] = Counter()  # since the last summary line
        self._pending_peers: Counter[str] = Counter()
        self._examples: dict[str, str] = {}  # reason -> one detail since the last summary

    def note(self, peer_id: str, reason: str, *, penalty: int = 1, detail: str = "") -> None:
        self.totals[reason] += 1
        self._pending[reason] += 1
        self._pending_peers[peer_id] += 1
        if detail and reason not in self._examples:
            self._examples[reason] = detail[:200]
        conduct = self._peers.pop(peer_id, None) or PeerConduct()
        conduct.score += penalty
        conduct.reasons[reason] += 1
        self._peers[peer_id] = conduct  # most recently touched last
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)

    def score(self, peer_id: str) -> int:
        """The peer's misbehaviour score (0 if unknown or forgotten)."""
        conduct = self._peers.get(peer_id)
        return conduct.score if conduct is not None else 0

    def conduct(self, peer_id: str) -> PeerConduct | None:
        return self._peers.get(peer_id)

    def statistics(self) -> dict[str, Any]:
        worst = sorted(self._peers.items(), key=lambda kv: -kv[1].score)[:5]
        return {"rejected": dict(self.totals), "peers_tracked": len(self._peers),
                "worst": {pid: c.score for pid, c in worst if c.score > 0}}

    def summary(self) -> str | None:
        """One line for everything noted since the last call (None if nothing), then reset."""
        if not self._pending:
            return None
        reasons = ", ".join(f"{r}={n}" for r, n in self._pending.most_common())
        top = ", ".join(f"{p[-8:]}:{n}" for p, n in self._pending_peers.most_common(3))
        examples = "; ".join(f"{r}: {d}" for r, d in list(self._examples.items())[:3])
        self._pending.clear()
        self._pending_peers.clear()
        self._examples.clear()
        return (f"rejected peer input: {reasons} (from {len(self._peers)} tracked peers; top {top})"
                + (f" e.g. {examples}" if examples else ""))

    async def run(self, interval_s: float = 10.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Log the summary line every ``interval_s`` seconds while anything was noted."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            line = self.summary()
            if line is not None:
                log.info("%s", line)


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens/s, at most ``burst``; ``take`` spends one."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("TokenBuckets needs rate > 0, burst >= 1, max_keys >= 1")
        self.rate, self.burst, self._max_keys, self._clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: Hashable) -> bool:
        """Spend one token of ``key``'s bucket; False (nothing spent) if it is empty."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)
