"""Route choice: the cheapest chain of peers that serves blocks ``[start, end)``. Pure, deterministic.

Every cost here is an estimate in **seconds per decode token**. A hop costs its round trip, its
compute (``blocks * (block_flops / flops + block_overhead_s) / (1 - load)``) and penalties for
risk (low battery while unplugged, draining, accused of wrong outputs, leaving soon, metered link,
far away). ``find_route`` is a shortest path over block boundaries; a peer may serve any sub-range
of what it hosts, so the same function re-routes a lost span of a running route. Fewer hops win
through their round trips.

A client running several generations at once passes the chains its other generations use
(``follow``). Spread first: while the cheapest chain has a peer that carries none of the client's
sessions, a new generation takes it. Once every peer of it carries some, the generation takes one
of the followed chains instead when that costs at most ``follow_slack`` more.
Generations on the same chain reach each stage together, so the stage server computes their steps
as one batch (one pass over its weights for all); generations on crossing chains arrive at a stage
at different times and are computed one by one.

A record's claims cost its signer nothing, so they are trusted only so far: ``from_record`` caps the
claimed compute at ``MAX_CLAIMED_GFLOPS``, and as soon as the client has timed decode steps on a
peer (``block_s``: measured seconds per block per token, queueing included) that measurement
replaces the claimed compute and load.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from idlefleet.protocols.errors import IdlefleetError, LocalProtocolError

__all__ = [
    "MAX_CLAIMED_GFLOPS",
    "ROUTABLE_STATES",
    "Candidate",
    "CapacityLike",
    "Hop",
    "NoRoute",
    "RouteCosts",
    "exclusion",
    "find_route",
    "hop_cost",
    "mark_accused",
]

#: States in which a peer takes new sessions (draining ones only at a penalty).
ROUTABLE_STATES = ("online", "draining")

#: The most compute a record may claim for routing (GFLOP/s); claims above count as this much.
MAX_CLAIMED_GFLOPS = 1000.0


class NoRoute(IdlefleetError):
    """No chain of usable peers covers the span; ``block`` is the first block none of them serves."""

    def __init__(self, block: int, message: str) -> None:
        self.block = block
        super().__init__(message)


class CapacityLike(Protocol):
    """What ``Candidate.from_record`` reads: ``protocols.records.CapacityRecord`` fits."""

    @property
    def peer_id(self) -> str: ...
    @property
    def blocks(self) -> tuple[int, int] | None: ...
    @property
    def compute_gflops(self) -> float: ...
    @property
    def load(self) -> float: ...
    @property
    def battery_soc(self) -> float: ...
    @property
    def plugged_in(self) -> bool: ...
    @property
    def state(self) -> str: ...
    @property
    def expected_departure(self) -> float | None: ...
    @property
    def link_metered(self) -> bool: ...
    @property
    def region(self) -> str: ...


def _finite_in(value: float, low: float, high: float) -> bool:
    return isinstance(value, int | float) and low <= value <= high and math.isfinite(value)


@dataclass(frozen=True)
class Candidate:
    """A peer that hosts blocks ``[start, end)``, with what the route cost needs to know about it.

    ``rtt_s`` is the measured round trip, or None if not measured yet. Construction raises
    ``LocalProtocolError`` on an empty or negative range, or an rtt, load, battery or compute value
    that is negative, not finite or out of range.
    """

    peer_id: str
    start: int
    end: int
    rtt_s: float | None
    compute_gflops: float
    load: float
    battery_soc: float
    plugged_in: bool
    state: str
    expected_departure: float | None
    link_metered: bool
    region: str
    block_s: float | None = None  # measured seconds per block per decode token; replaces the claims
    # The share of the peer that this client's own open sessions take (0 for none): it slows the
    # peer on top of its gossiped load or measured speed (``block_s`` may predate them).
    own_load: float = 0.0
    accused: bool = False  # a verified misbehaviour report names it (protocols/reports.py)

    def __post_init__(self) -> None:
        ints = all(isinstance(b, int) and not isinstance(b, bool) for b in (self.start, self.end))
        if not (ints and 0 <= self.start < self.end):
            raise LocalProtocolError(f"candidate {self.peer_id}: bad range [{self.start}, {self.end})")
        checks = {
            "rtt_s": self.rtt_s is None or _finite_in(self.rtt_s, 0.0, math.inf),
            "compute_gflops": _finite_in(self.compute_gflops, 0.0, math.inf),
            "load": _finite_in(self.load, 0.0, 1.0),
            "battery_soc": _finite_in(self.battery_soc, 0.0, 1.0),
            "block_s": self.block_s is None or _finite_in(self.block_s, 0.0, math.inf),
            "own_load": _finite_in(self.own_load, 0.0, 0.99),
        }
        for name, ok in checks.items():
            if not ok:
                raise LocalProtocolError(f"candidate {self.peer_id}: bad {name} {getattr(self, name)!r}")

    @classmethod
    def from_record(cls, record: CapacityLike, rtt_s: float | None,
                    block_s: float | None = None) -> Candidate | None:
        """The candidate a capacity record describes, or None if it hosts no blocks. Its claimed
        compute is capped at ``MAX_CLAIMED_GFLOPS``; ``block_s`` is this client's measurement.

        The caller keeps only records of the wanted model. Raises ``LocalProtocolError`` like the
        constructor.
        """
        if record.blocks is None:
            return None
        start, end = record.blocks
        return cls(
            peer_id=record.peer_id,
            start=start,
            end=end,
            rtt_s=rtt_s,
            compute_gflops=min(record.compute_gflops, MAX_CLAIMED_GFLOPS),
            load=record.load,
            battery_soc=record.battery_soc,
            plugged_in=record.plugged_in,
            state=record.state,
            expected_departure=record.expected_departure,
            link_metered=record.link_metered,
            region=record.region,
        )


def mark_accused(candidates: Iterable[Candidate], accused: Callable[[str], bool]) -> list[Candidate]:
    """``candidates`` with ``accused`` set where ``accused(peer_id)`` holds (a verified misbehaviour
    report names the peer, ``protocols.reports.Accusations``): routing then charges them
    ``RouteCosts.accused_penalty_s``."""
    return [dataclasses.replace(c, accused=True) if accused(c.peer_id) else c for c in candidates]


@dataclass(frozen=True)
class RouteCosts:
    """Cost model, in estimated seconds per decode token (penalties are in the same unit).

    ``block_flops`` is per token per block (SmolLM2-135M: ~7.1e6). ``other_region_penalty_s`` is
    the penalty for sharing no geohash prefix with the client, scaled down linearly with each
    leading character shared with the client's region. Peers with ``load > max_load`` are excluded.
    Raises ``LocalProtocolError`` on negative values or ``max_load`` outside ``[0, 1)``.
    """

    default_rtt_s: float = 0.005
    block_flops: float = 7.1e6
    block_overhead_s: float = 0.0003
    low_battery_soc: float = 0.2
    low_battery_penalty_s: float = 0.05
    draining_penalty_s: float = 1.0
    accused_penalty_s: float = 2.0  # caught returning wrong outputs (a verified report): last resort
    departure_horizon_s: float = 600.0
    departure_penalty_s: float = 0.2
    metered_penalty_s: float = 0.01
    other_region_penalty_s: float = 0.02
    max_load: float = 0.95
    follow_slack: float = 0.25  # a chain our other generations use wins up to this much dearer

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not _finite_in(value, 0.0, math.inf):
                raise LocalProtocolError(f"RouteCosts.{name} must be finite and >= 0, got {value!r}")
        if self.max_load >= 1.0:
            raise LocalProtocolError(f"RouteCosts.max_load must be < 1, got {self.max_load!r}")


@dataclass(frozen=True)
class Hop:
    """One stage of a route: ``peer_id`` runs blocks ``[start, end)``."""

    peer_id: str
    start: int
    end: int


def exclusion(candidate: Candidate, *, banned: frozenset[str], costs: RouteCosts) -> str | None:
    """Why ``candidate`` may not carry a hop (``banned``, its state, ``overloaded``, ``no compute``),
    or None if it may."""
    if candidate.peer_id in banned:
        return "banned"
    if candidate.state not in ROUTABLE_STATES:
        return candidate.state
    if candidate.load > costs.max_load:
        return "overloaded"
    if candidate.compute_gflops <= 0:
        return "no compute"
    return None


def _shared_prefix(a: str, b: str) -> int:
    """How many leading geohash characters ``a`` and ``b`` share (more: nearer)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _penalty_s(candidate: Candidate, *, now: float, my_region: str, costs: RouteCosts) -> float:
    penalty = 0.0
    if candidate.battery_soc < costs.low_battery_soc and not candidate.plugged_in:
        penalty += costs.low_battery_penalty_s
    if candidate.state == "draining":
        penalty += costs.draining_penalty_s
    if candidate.accused:
        penalty += costs.accused_penalty_s
    departure = candidate.expected_departure
    if departure is not None and departure - now < costs.departure_horizon_s:
        penalty += costs.departure_penalty_s
    if candidate.link_metered:
        penalty += costs.metered_penalty_s
    if my_region:
        unshared = len(my_region) - _shared_prefix(my_region, candidate.region)
        penalty += costs.other_region_penalty_s * unshared / len(my_region)
    return penalty


def _fixed_s(candidate: Candidate, *, now: float, my_region: str, costs: RouteCosts) -> float:
    """The part of a hop's cost that does not grow with its length: round trip plus penalties."""
    rtt = costs.default_rtt_s if candidate.rtt_s is None else candidate.rtt_s
    return rtt + _penalty_s(candidate, now=now, my_region=my_region, costs=costs)


def _per_block_s(candidate: Candidate, costs: RouteCosts) -> float:
    if candidate.block_s is not None:
        base = candidate.block_s
    else:
        compute = costs.block_flops / (candidate.compute_gflops * 1e9) + costs.block_overhead_s
        base = compute / (1.0 - candidate.load)
    return base / (1.0 - candidate.own_load)


def hop_cost(
    candidate: Candidate,
    n_blocks: int,
    *,
    now: float,
    my_region: str = "",
    costs: RouteCosts = RouteCosts(),
) -> float:
    """Estimated seconds per decode token for ``candidate`` to run ``n_blocks`` blocks as one hop.

    Meant for usable candidates (``exclusion`` is None); raises ZeroDivisionError for zero compute.
    """
    fixed = _fixed_s(candidate, now=now, my_region=my_region, costs=costs)
    return fixed + n_blocks * _per_block_s(candidate, costs)


def find_route(
    candidates: Iterable[Candidate],
    start: int,
    end: int,
    *,
    now: float,
    my_region: str = "",
    banned: frozenset[str] = frozenset(),
    costs: RouteCosts = RouteCosts(),
    follow: Iterable[Sequence[Hop]] = (),
) -> list[Hop]:
    """The cheapest chain of hops serving blocks ``[start, end)``, in order and contiguous.

    Each hop lies inside its peer's hosted range. Excluded peers (see ``exclusion``) are never
    used; draining ones only when the alternatives cost more than ``draining_penalty_s``. Equal
    costs go to the smaller ``peer_id``; the input order does not matter. O(blocks * peers).

    ``follow``: chains this client's other generations run on. Once every peer of the cheapest
    chain carries some of our sessions (``own_load``), the cheapest of those chains that serve
    exactly ``[start, end)`` on usable peers is returned instead when it costs at most
    ``costs.follow_slack`` more (see the module's docstring); while the cheapest chain has a peer
    without our sessions, it is taken (spread first).

    Raises ``NoRoute`` naming the first block no usable peer hosts, and ``LocalProtocolError`` if
    ``not 0 <= start < end``.
    """
    ints = all(isinstance(b, int) and not isinstance(b, bool) for b in (start, end))
    if not (ints and 0 <= start < end):
        raise LocalProtocolError(f"bad route span [{start}, {end})")
    pool = list(candidates)
    usable = sorted(
        (c for c in pool if exclusion(c, banned=banned, costs=costs) is None),
        key=lambda c: (c.peer_id, c.start, c.end),
    )
    gap = _first_gap(usable, start, end)
    if gap is not None:
        raise _no_route(pool, gap, start, end, banned=banned, costs=costs)
    prev = _shortest_paths(usable, start, end, now=now, my_region=my_region, costs=costs)
    best = _walk_back(prev, start, end)
    by_peer = {c.peer_id: c for c in usable}
    followed = [list(chain) for chain in follow if _serves(chain, by_peer, start, end)]
    if not followed or not all(by_peer[h.peer_id].own_load > 0 for h in best):
        return best  # spread first

    def cost(chain: Sequence[Hop]) -> float:
        return math.fsum(hop_cost(by_peer[h.peer_id], h.end - h.start, now=now, my_region=my_region,
                                  costs=costs) for h in chain)

    cheapest = min(followed, key=lambda c: (cost(c), [h.peer_id for h in c]))
    return cheapest if cost(cheapest) <= cost(best) * (1.0 + costs.follow_slack) else best


def _serves(chain: Sequence[Hop], by_peer: dict[str, Candidate], start: int, end: int) -> bool:
    """Whether ``chain`` covers exactly ``[start, end)``, contiguously, each hop within the range
    of a usable candidate."""
    at = start
    for h in chain:
        c = by_peer.get(h.peer_id)
        if h.start != at or c is None or not c.start <= h.start < h.end <= c.end:
            return False
        at = h.end
    return bool(chain) and at == end


def _first_gap(usable: Sequence[Candidate], start: int, end: int) -> int | None:
    """The first block of ``[start, end)`` no candidate hosts; None if all are hosted."""
    delta = [0] * (end - start + 1)
    for c in usable:
        lo, hi = max(c.start, start), min(c.end, end)
        if lo < hi:
            delta[lo - start] += 1
            delta[hi - start] -= 1
    hosts = 0
    for offset in range(end - start):
        hosts += delta[offset]
        if hosts == 0:
            return start + offset
    return None


def _no_route(
    pool: Sequence[Candidate], block: int, start: int, end: int, *, banned: frozenset[str], costs: RouteCosts
) -> NoRoute:
    where = f"no route for blocks [{start}, {end}): block {block}"
    hosts = [c for c in pool if c.start <= block < c.end]
    if not hosts:
        return NoRoute(block, f"{where} is hosted by no known peer")
    reasons = Counter(str(exclusion(c, banned=banned, costs=costs)) for c in hosts)
    detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    return NoRoute(block, f"{where} is hosted only by excluded peers ({detail})")


# prev[j - start] = (i, candidate): the cheapest way to reach boundary j ends with candidate on [i, j).
_Prev = list[tuple[int, Candidate] | None]


def _shortest_paths(
    usable: Sequence[Candidate], start: int, end: int, *, now: float, my_region: str, costs: RouteCosts
) -> _Prev:
    """Forward DP over boundaries ``start..end`` (a DAG). A hop's cost is affine in its length,
    ``fixed + (j - i) * rate``, so each candidate keeps the best entry boundary ``i`` so far (least
    ``dist[i] - i * rate``) and every boundary costs O(peers) instead of O(blocks * peers)."""
    fixed = [_fixed_s(c, now=now, my_region=my_region, costs=costs) for c in usable]
    rate = [_per_block_s(c, costs) for c in usable]
    dist = [math.inf] * (end - start + 1)
    dist[0] = 0.0
    prev: _Prev = [None] * (end - start + 1)
    entry: list[tuple[float, int] | None] = [None] * len(usable)
    for j in range(start + 1, end + 1):
        i = j - 1
        for k, c in enumerate(usable):
            if c.start <= i < c.end and dist[i - start] < math.inf:
                key = dist[i - start] - i * rate[k]
                best = entry[k]
                if best is None or key < best[0]:
                    entry[k] = (key, i)
        for k, c in enumerate(usable):
            best = entry[k]
            if best is None or not c.start < j <= c.end:
                continue
            i = best[1]
            cost = dist[i - start] + fixed[k] + (j - i) * rate[k]
            if cost < dist[j - start]:  # strict: the smaller peer_id (sorted first) keeps a tie
                dist[j - start] = cost
                prev[j - start] = (i, c)
    return prev


def _walk_back(prev: _Prev, start: int, end: int) -> list[Hop]:
    steps: list[tuple[Candidate, int, int]] = []
    j = end
    while j > start:
        step = prev[j - start]
        if step is None:  # _first_gap found every block hosted, so every boundary is reachable
            raise LocalProtocolError(f"route search left boundary {j} unreached")
        i, c = step
        if steps and steps[-1][0] is c:  # same peer twice in a row (only with zero fixed cost): merge
            steps[-1] = (c, i, steps[-1][2])
        else:
            steps.append((c, i, j))
        j = i
    return [Hop(c.peer_id, i, j) for c, i, j in reversed(steps)]
