"""Block placement: coverage, windows that fit, choosing the least-covered range, rebalancing that settles."""

from __future__ import annotations

import random

import pytest

from idlefleet.protocols.errors import LocalProtocolError
from idlefleet.protocols.placement import choose_range, coverage, fitting_windows, max_blocks, should_move

N = 30
BLOCK = 14_000_000
SIZES = [BLOCK] * N


def join_one_at_a_time(budgets_in_blocks: list[int], n: int = N) -> list[tuple[int, int]]:
    """Each node arrives after the previous one announced its range, and picks with tie_breaker 0."""
    ranges: list[tuple[int, int]] = []
    for blocks in budgets_in_blocks:
        ranges.append(choose_range(n, [BLOCK] * n, blocks * BLOCK, coverage(n, ranges)))
    return ranges


def settle(
    n: int, sizes: list[int], budgets: list[int], ranges: list[tuple[int, int]], max_rounds: int
) -> int:
    """Apply ``should_move`` node after node, on fresh coverage, until a round moves nobody.

    Returns the number of rounds in which somebody moved; fails if that exceeds ``max_rounds``.
    """
    for rounds in range(max_rounds + 1):
        moved = False
        for i, budget in enumerate(budgets):
            others = coverage(n, ranges[:i] + ranges[i + 1 :])
            target = should_move(n, sizes, budget, others, ranges[i])
            if target is not None:
                ranges[i] = target
                moved = True
        if not moved:
            return rounds
    pytest.fail(f"no settling within {max_rounds} rounds: {ranges}")


# --- coverage and windows -----------------------------------------------------------------------


def test_coverage_counts_hosts_per_block() -> None:
    assert coverage(5, [(0, 2), (1, 5), (4, 5)]) == [1, 2, 1, 1, 2]
    assert coverage(3, []) == [0, 0, 0]


@pytest.mark.parametrize("bad", [(2, 2), (3, 1), (-1, 2), (0, 6), (0.0, 2), (True, 3)])
def test_coverage_rejects_bad_ranges(bad: tuple[int, int]) -> None:
    with pytest.raises(LocalProtocolError, match="bad block range"):
        coverage(5, [(0, 1), bad])


def test_coverage_rejects_empty_model() -> None:
    with pytest.raises(LocalProtocolError, match="n_blocks"):
        coverage(0, [])


def test_max_blocks_with_uneven_sizes() -> None:
    sizes = [4, 1, 1, 5, 2]
    assert max_blocks(sizes, 6, 0) == 3  # 4+1+1
    assert max_blocks(sizes, 6, 1) == 2  # 1+1, then 5 would overflow
    assert max_blocks(sizes, 4, 3) == 0  # block 3 alone is too big
    assert max_blocks(sizes, 100, 2) == 3  # capped at the end of the model
    with pytest.raises(LocalProtocolError, match="start"):
        max_blocks(sizes, 6, 5)


def test_fitting_windows_are_maximal_and_skip_blocks_too_big() -> None:
    assert fitting_windows([1] * 5, 2) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert fitting_windows([1] * 5, 99) == [(0, 5)]  # never longer than the model
    assert fitting_windows([4, 1, 1, 5, 2], 6) == [(0, 3), (2, 4), (4, 5)]
    assert fitting_windows([2, 9, 2], 3) == [(0, 1), (2, 3)]


@pytest.mark.parametrize("budget", [0, BLOCK - 1])
def test_budget_smaller_than_a_block_is_refused(budget: int) -> None:
    with pytest.raises(LocalProtocolError, match="budget too small"):
        choose_range(N, SIZES, budget, [0] * N)


@pytest.mark.parametrize(
    ("sizes", "cover", "budget", "match"),
    [
        ([1] * 3, [0] * 4, 2, "need 4 block sizes"),
        ([1] * 3 + [0], [0] * 4, 2, "positive ints"),
        ([1] * 4, [0, -1, 0, 0], 2, "non-negative"),
        ([1] * 4, [0] * 4, -1, "budget_bytes"),
    ],
)
def test_choose_range_rejects_bad_input(sizes: list[int], cover: list[int], budget: int, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        choose_range(4, sizes, budget, cover)


# --- choosing a range ---------------------------------------------------------------------------


def test_three_nodes_of_ten_blocks_tile_the_model() -> None:
    assert join_one_at_a_time([10, 10, 10]) == [(0, 10), (10, 20), (20, 30)]


def test_six_nodes_of_ten_blocks_give_every_block_two_hosts() -> None:
    ranges = join_one_at_a_time([10] * 6)
    assert min(coverage(N, ranges)) == 2
    assert ranges[3:] == [(0, 10), (10, 20), (20, 30)]


def test_uneven_budgets_cover_the_model() -> None:
    ranges = join_one_at_a_time([7, 12, 11])
    assert ranges == [(0, 7), (7, 19), (19, 30)]
    assert min(coverage(N, ranges)) == 1


def test_budget_beyond_the_model_hosts_it_all() -> None:
    assert choose_range(N, SIZES, 100 * BLOCK, [3] * N) == (0, N)


def test_fills_least_covered_blocks_first_then_least_total() -> None:
    cover = [2, 2, 1, 1, 3, 1, 1, 1, 2, 2]
    # The three blocks at the minimum 1 in [5, 8) beat the two in [2, 4).
    assert choose_range(10, [1] * 10, 3, cover) == (5, 8)
    # Windows of 4 holding three 1s: [4,8) sums 6, [5,9) sums 5 -> [5,9).
    assert choose_range(10, [1] * 10, 4, cover) == (5, 9)


def test_uneven_block_sizes_fit_the_budget() -> None:
    sizes = [5, 5, 1, 1, 1, 1, 5, 5]
    start, end = choose_range(8, sizes, 4, [0] * 8)
    assert (start, end) == (2, 6)
    assert sum(sizes[start:end]) <= 4


def test_tie_breaker_picks_among_equal_windows_left_to_right() -> None:
    # With nothing hosted, all 21 windows of 10 blocks are equally good.
    picks = [choose_range(N, SIZES, 10 * BLOCK, [0] * N, tie_breaker=t) for t in (0, 1, 20, 21, -1)]
    assert picks == [(0, 10), (1, 11), (20, 30), (0, 10), (20, 30)]


def test_joining_one_at_a_time_covers_whenever_the_budgets_add_up() -> None:
    rng = random.Random(4)
    for _ in range(300):
        n = rng.randint(1, 40)
        budgets: list[int] = []
        while sum(budgets) < n:
            budgets.append(rng.randint(1, n + 2))
        assert min(coverage(n, join_one_at_a_time(budgets, n))) >= 1, (n, budgets)


# --- rebalancing --------------------------------------------------------------------------------


def test_duplicate_node_moves_to_the_uncovered_span_and_then_the_fleet_stays() -> None:
    ranges = [(0, 10), (0, 10), (10, 20)]
    budgets = [10 * BLOCK] * 3
    first = should_move(N, SIZES, budgets[0], coverage(N, ranges[1:]), ranges[0])
    assert first == (20, 30)
    ranges[0] = first
    assert should_move(N, SIZES, budgets[1], coverage(N, [ranges[0], ranges[2]]), ranges[1]) is None
    assert settle(N, SIZES, budgets, ranges, 3) == 0
    assert min(coverage(N, ranges)) == 1


def test_fewer_uncovered_blocks_is_worth_a_move() -> None:
    # Blocks 0, 26..29 have no host; moving the first node to [7, 30) leaves only 0..2 uncovered,
    # after which the second node can take [0, 23) and cover everything.
    ranges = [(1, 24), (3, 26)]
    budgets = [23 * BLOCK] * 2
    assert should_move(N, SIZES, budgets[0], coverage(N, ranges[1:]), ranges[0]) == (7, 30)
    settle(N, SIZES, budgets, ranges, 2)
    assert min(coverage(N, ranges)) == 1


def test_covered_fleet_ignores_tiny_gains() -> None:
    # [5, 15) over a tiled model: [0, 10) would lower the coverage sum, but the minimum stays 1.
    ranges = [(0, 10), (10, 20), (20, 30), (5, 15)]
    assert should_move(N, SIZES, 10 * BLOCK, coverage(N, ranges[:3]), ranges[3]) is None
    # Minimum 1 on 10..13 and 24..29: a node on 24, 25 does not shuffle to [20, 30) for four more.
    others = coverage(N, [(0, 10), (0, 10), (10, 20), (14, 24), (20, 30)])
    assert choose_range(N, SIZES, 10 * BLOCK, others) == (20, 30)
    assert should_move(N, SIZES, 10 * BLOCK, others, (16, 26)) is None


def test_a_node_adding_nothing_at_the_minimum_moves_there() -> None:
    # Four copies of [0, 10): the minimum (1 host) stays 1 either way, but a fourth copy helps nobody.
    others = coverage(N, [(0, 10)] * 3 + [(10, 20), (20, 30)])
    assert should_move(N, SIZES, 10 * BLOCK, others, (0, 10)) == (10, 20)
    ranges = [(0, 10)] * 4 + [(10, 20), (20, 30)]
    settle(N, SIZES, [10 * BLOCK] * 6, ranges, 6)
    assert min(coverage(N, ranges)) == 2


def test_shrunken_budget_forces_a_move() -> None:
    assert should_move(N, SIZES, 5 * BLOCK, [1] * N, (0, 10)) == (0, 5)


def test_should_move_rejects_a_bad_current_range() -> None:
    with pytest.raises(LocalProtocolError, match="bad block range"):
        should_move(N, SIZES, 10 * BLOCK, [0] * N, (25, 31))


@pytest.mark.parametrize("seed", range(40))
def test_rebalancing_from_any_start_settles_within_k_rounds(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 5, 12, 30])
    k = rng.randint(1, 12)
    sizes = [rng.randint(1, 3) for _ in range(n)] if seed % 2 else [1] * n
    budgets = [rng.randint(max(sizes), sum(sizes)) for _ in range(k)]
    ranges = []
    for budget in budgets:
        start = rng.choice([s for s, _ in fitting_windows(sizes, budget)])
        ranges.append((start, start + max_blocks(sizes, budget, start)))
    settle(n, sizes, budgets, ranges, k)
    # Settled means stable: nobody wants to move any more.
    for i, budget in enumerate(budgets):
        others = coverage(n, ranges[:i] + ranges[i + 1 :])
        assert should_move(n, sizes, budget, others, ranges[i]) is None
