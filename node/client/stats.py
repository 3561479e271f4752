"""The fleet client's counters, with one owner (``FleetClient``) that publishes them
(``FleetClient.statistics()``): what this client observed per peer (the owner report of each peer
must agree), its open sessions per peer (route choice spreads concurrent generations with them),
and how its receipt exchanges ended."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClientStatistics:
    """A snapshot of ``ClientCounters`` (copies: later work does not change it)."""

    sessions_opened: Counter[str]  # peer -> sessions opened there
    positions_computed: Counter[str]  # peer -> positions it computed and answered for us
    open_sessions: Counter[str]  # peer -> sessions this client has open (or is opening) there
    receipts_stored: int  # countersigned receipts received
    receipts_refused: Counter[str]  # exchanges that failed, by reason
    receipts_pending: int  # exchanges of abandoned hops still running in the background


@dataclass
class ClientCounters:
    """The counters themselves, written only through these methods: the client's hop sessions
    report to them (``node/client/hop.py``), the client reads and publishes them."""

    _opened: Counter[str] = field(default_factory=Counter)
    _computed: Counter[str] = field(default_factory=Counter)
    _open: Counter[str] = field(default_factory=Counter)
    _stored: int = 0
    _refused: Counter[str] = field(default_factory=Counter)
    _pending: int = 0

    def session_opened(self, peer: str) -> None:
        self._opened[peer] += 1

    def computed(self, peer: str, positions: int) -> None:
        self._computed[peer] += positions

    def hold(self, peer: str) -> None:
        """A session on ``peer`` is open or being opened (counted while routing it)."""
        self._open[peer] += 1

    def release(self, peer: str) -> None:
        self._open[peer] -= 1

    def open_on(self, peer: str) -> int:
        return self._open[peer]

    def receipt_stored(self) -> None:
        self._stored += 1

    def receipt_refused(self, reason: str) -> None:
        self._refused[reason] += 1

    def receipt_started(self) -> None:
        """A background receipt exchange was handed to the node's nursery."""
        self._pending += 1

    def receipt_ended(self) -> None:
        self._pending -= 1

    def snapshot(self) -> ClientStatistics:
        return ClientStatistics(Counter(self._opened), Counter(self._computed), +self._open,
                                self._stored, Counter(self._refused), self._pending)
