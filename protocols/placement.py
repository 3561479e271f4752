"""Block placement: which contiguous range of a model's blocks a serving node hosts. Pure, deterministic.

A node knows each block's size in bytes, its own memory budget, and how many hosts every block has
without it (``coverage`` over the block ranges in the fleet's capacity records, minus its own).
``choose_range`` picks the window that fills the least-covered blocks first; ``should_move`` says when
a hosting node should move, and only for a significant gain.

Why rebalancing settles instead of oscillating: every move ``should_move`` allows (except a forced one
after the budget shrank) strictly raises the fleet's potential ``(min coverage, -blocks at the min)``
in lexicographic order, and that potential takes finitely many values. Nodes must apply moves one at a
time on fresh views (the caller's randomised intervals) for the argument to hold.

A window is *maximal*: it starts at some block and takes as many blocks as the budget allows, capped
at the end of the model; a window inside another window is never offered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

from idlefleet.protocols.errors import LocalProtocolError

__all__ = ["choose_range", "coverage", "fitting_windows", "max_blocks", "should_move"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(n_blocks: int, start: int, end: int) -> None:
    if not (_is_int(start) and _is_int(end) and 0 <= start < end <= n_blocks):
        raise LocalProtocolError(f"bad block range [{start}, {end}) for a {n_blocks}-block model")


def _check_n_blocks(n_blocks: int) -> None:
    if not _is_int(n_blocks) or n_blocks < 1:
        raise LocalProtocolError(f"n_blocks must be a positive int, got {n_blocks!r}")


def _check_sizes(block_bytes: Sequence[int], budget_bytes: int) -> None:
    if not block_bytes or not all(_is_int(b) and b > 0 for b in block_bytes):
        raise LocalProtocolError("block_bytes must be a non-empty sequence of positive ints")
    if not _is_int(budget_bytes) or budget_bytes < 0:
        raise LocalProtocolError(f"budget_bytes must be a non-negative int, got {budget_bytes!r}")


def _check_model(n_blocks: int, block_bytes: Sequence[int], cover: Sequence[int]) -> None:
    _check_n_blocks(n_blocks)
    if len(block_bytes) != n_blocks or len(cover) != n_blocks:
        raise LocalProtocolError(
            f"need {n_blocks} block sizes and coverage counts, got {len(block_bytes)} and {len(cover)}"
        )
    if not all(_is_int(c) and c >= 0 for c in cover):
        raise LocalProtocolError("coverage counts must be non-negative ints")


def coverage(n_blocks: int, ranges: Iterable[tuple[int, int]]) -> list[int]:
    """How many of ``ranges`` (half-open ``[start, end)``) host each block of an ``n_blocks`` model.

    Raises ``LocalProtocolError`` if ``n_blocks < 1`` or a range is empty, reversed or outside the
    model (callers drop other models' and out-of-range records first).
    """
    _check_n_blocks(n_blocks)
    delta = [0] * (n_blocks + 1)
    for start, end in ranges:
        _check_range(n_blocks, start, end)
        delta[start] += 1
        delta[end] -= 1
    return list(accumulate(delta[:-1]))


def _window_ends(block_bytes: Sequence[int], budget_bytes: int) -> list[int]:
    """``ends[s]``: the furthest ``end`` with ``sum(block_bytes[s:end]) <= budget_bytes`` (two pointers)."""
    ends: list[int] = []
    end, total = 0, 0
    for start in range(len(block_bytes)):
        if end < start:
            end, total = start, 0
        while end < len(block_bytes) and total + block_bytes[end] <= budget_bytes:
            total += block_bytes[end]
            end += 1
        ends.append(end)
        if end > start:
            total -= block_bytes[start]
    return ends


def max_blocks(block_bytes: Sequence[int], budget_bytes: int, start: int) -> int:
    """How many blocks from ``start`` on fit in ``budget_bytes`` (0 if block ``start`` alone does not).

    Raises ``LocalProtocolError`` on non-positive block sizes, a negative budget or a bad ``start``.
    """
    _check_sizes(block_bytes, budget_bytes)
    if not _is_int(start) or not 0 <= start < len(block_bytes):
        raise LocalProtocolError(f"start {start!r} outside a {len(block_bytes)}-block model")
    return _window_ends(block_bytes[start:], budget_bytes)[0]


def fitting_windows(block_bytes: Sequence[int], budget_bytes: int) -> list[tuple[int, int]]:
    """The maximal windows ``[start, end)`` that fit ``budget_bytes``, left to right.

    Raises ``LocalProtocolError("budget too small ...")`` if not even one block fits, and on bad sizes.
    """
    _check_sizes(block_bytes, budget_bytes)
    ends = _window_ends(block_bytes, budget_bytes)
    # ends is non-decreasing: (s, ends[s]) lies inside (s-1, ends[s-1]) exactly when the ends are equal.
    windows = [(s, e) for s, e in enumerate(ends) if e > s and (s == 0 or e > ends[s - 1])]
    if not windows:
        raise LocalProtocolError(
            f"budget too small to host a block: {budget_bytes} bytes < smallest block "
            f"{min(block_bytes)} bytes"
        )
    return windows


def choose_range(
    n_blocks: int,
    block_bytes: Sequence[int],
    budget_bytes: int,
    coverage_without_me: Sequence[int],
    *,
    tie_breaker: int = 0,
) -> tuple[int, int]:
    """The window ``(start, end)`` this node should host, given the fleet's coverage without it.

    Among the maximal windows that fit the budget: most blocks at the fleet's current minimum
    coverage first, then the smallest sum of coverage. Equally good windows are ordered left to
    right and ``tie_breaker % len(ties)`` picks one; the default 0 takes the leftmost, which packs
    nodes arriving one at a time edge to edge. A per-node ``tie_breaker`` spreads nodes that join at
    the same moment, but can leave fragments no single later node can fill.

    Raises ``LocalProtocolError`` on inconsistent lengths, negative counts or a budget too small
    for any block.
    """
    _check_model(n_blocks, block_bytes, coverage_without_me)
    windows = fitting_windows(block_bytes, budget_bytes)
    low = min(coverage_without_me)
    at_min = [0, *accumulate(int(c == low) for c in coverage_without_me)]
    total = [0, *accumulate(coverage_without_me)]

    def score(window: tuple[int, int]) -> tuple[int, int]:
        start, end = window
        return (-(at_min[end] - at_min[start]), total[end] - total[start])

    best = min(score(w) for w in windows)
    ties = [w for w in windows if score(w) == best]
    return ties[tie_breaker % len(ties)]


def _with_me(cover: Sequence[int], window: tuple[int, int]) -> list[int]:
    start, end = window
    return [c + (start <= b < end) for b, c in enumerate(cover)]


def should_move(
    n_blocks: int,
    block_bytes: Sequence[int],
    budget_bytes: int,
    coverage_without_me: Sequence[int],
    current: tuple[int, int],
    *,
    tie_breaker: int = 0,
) -> tuple[int, int] | None:
    """The range to move to, or None to stay on ``current``.

    Moves to ``choose_range(...)`` only when the gain is significant: the move raises the fleet's
    minimum coverage; or some block has no host and the move leaves fewer such blocks; or
    ``current`` covers no block at the minimum (without me) while the new range does (I duplicate a
    well-covered span). If ``current`` no longer fits the budget the node must move and gets the
    best range. Tiny gains (a smaller coverage sum, or fewer blocks at a minimum >= 1 that I
    already help with) never move a node. From a bad start a fleet may settle with a gap that only
    several simultaneous moves would close (nodes joining one at a time via ``choose_range``, with
    equal block sizes, leave none once their budgets add up to the model).

    Raises ``LocalProtocolError`` like ``choose_range``, and on a bad ``current`` range.
    """
    _check_range(n_blocks, *current)
    best = choose_range(n_blocks, block_bytes, budget_bytes, coverage_without_me, tie_breaker=tie_breaker)
    if best == current:
        return None
    if sum(block_bytes[current[0] : current[1]]) > budget_bytes:
        return best
    before, after = _with_me(coverage_without_me, current), _with_me(coverage_without_me, best)
    if min(after) > min(before):
        return best
    if min(after) == 0 and after.count(0) < before.count(0):
        return best  # fewer blocks nobody can serve
    low = min(coverage_without_me)

    def helps(window: tuple[int, int]) -> bool:
        return any(coverage_without_me[b] == low for b in range(*window))

    return best if helps(best) and not helps(current) else None
