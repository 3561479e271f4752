"""Route choice: exact cover, cost preferences, each penalty, exclusions, sub-ranges, NoRoute, determinism."""

from __future__ import annotations

import dataclasses
import math
import random
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import pytest

from idlefleet.protocols.errors import IdlefleetError, LocalProtocolError
from idlefleet.protocols.routing import (
    MAX_CLAIMED_GFLOPS,
    Candidate,
    Hop,
    NoRoute,
    RouteCosts,
    find_route,
    hop_cost,
)

NOW = 1_700_000_000.0
N = 30


def cand(peer_id: str, start: int = 0, end: int = N, **overrides: Any) -> Candidate:
    """A healthy, idle, plugged-in, nearby peer hosting ``[start, end)``, with ``overrides``."""
    fields: dict[str, Any] = {
        "rtt_s": 0.002, "compute_gflops": 50.0, "load": 0.0, "battery_soc": 0.8, "plugged_in": True,
        "state": "online", "expected_departure": None, "link_metered": False, "region": "u33d",
    }  # fmt: skip
    fields.update(overrides)
    return Candidate(peer_id=peer_id, start=start, end=end, **fields)


def route(candidates: list[Candidate], start: int = 0, end: int = N, **kwargs: Any) -> list[Hop]:
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("my_region", "u33d")
    return find_route(candidates, start, end, **kwargs)


def peers(hops: list[Hop]) -> list[str]:
    return [h.peer_id for h in hops]


def assert_valid(hops: list[Hop], candidates: list[Candidate], start: int, end: int) -> None:
    assert hops[0].start == start and hops[-1].end == end
    for a, b in pairwise(hops):
        assert a.end == b.start
    hosted = {c.peer_id: c for c in candidates}
    for h in hops:
        assert hosted[h.peer_id].start <= h.start < h.end <= hosted[h.peer_id].end


def test_covers_the_model_exactly() -> None:
    tiles = [cand("a", 0, 10), cand("b", 10, 20), cand("c", 20, 30)]
    assert route(tiles) == [Hop("a", 0, 10), Hop("b", 10, 20), Hop("c", 20, 30)]


def test_prefers_low_rtt() -> None:
    assert peers(route([cand("a", rtt_s=0.050), cand("b", rtt_s=0.003)])) == ["b"]


def test_prefers_faster_and_less_loaded_peers() -> None:
    assert peers(route([cand("a", compute_gflops=1.0), cand("b", compute_gflops=100.0)])) == ["b"]
    assert peers(route([cand("a", load=0.9), cand("b", load=0.1)])) == ["b"]


def test_unmeasured_rtt_uses_the_default() -> None:
    costs = RouteCosts(default_rtt_s=0.004)
    assert peers(route([cand("a", rtt_s=None), cand("b", rtt_s=0.003)], costs=costs)) == ["b"]
    assert peers(route([cand("a", rtt_s=None), cand("b", rtt_s=0.005)], costs=costs)) == ["a"]


def test_fewer_hops_win_through_their_round_trips() -> None:
    tiles = [cand("a", 0, 10), cand("b", 10, 20), cand("c", 20, 30)]
    assert peers(route([*tiles, cand("z")])) == ["z"]


def test_faster_chain_beats_one_slow_peer() -> None:
    slow = cand("a", compute_gflops=0.5)  # 30 blocks * 14 ms: much worse than two extra round trips
    tiles = [cand("b", 0, 10), cand("c", 10, 20), cand("d", 20, 30)]
    assert peers(route([slow, *tiles])) == ["b", "c", "d"]


@pytest.mark.parametrize(
    ("penalised", "harmless"),
    [
        ({"battery_soc": 0.1, "plugged_in": False}, {"battery_soc": 0.1, "plugged_in": True}),
        ({"state": "draining"}, {"state": "online"}),
        ({"expected_departure": NOW + 300}, {"expected_departure": NOW + 900}),
        ({"link_metered": True}, {"link_metered": False}),
        ({"region": "u4"}, {"region": "u33d"}),
    ],
    ids=["low-battery-unplugged", "draining", "departure-soon", "metered", "other-region"],
)
def test_each_penalty_flips_an_otherwise_equal_choice(
    penalised: dict[str, Any], harmless: dict[str, Any]
) -> None:
    # Equal in everything else, "a" wins the tie by peer id ...
    assert peers(route([cand("a", **harmless), cand("b")])) == ["a"]
    # ... until it carries the penalty.
    assert peers(route([cand("a", **penalised), cand("b")])) == ["b"]


def test_region_penalty_shrinks_with_the_shared_prefix() -> None:
    costs = RouteCosts()
    far, near = cand("a", region="s"), cand("b", region="u33x")
    extra = [hop_cost(c, 1, now=NOW, my_region="u33d") - hop_cost(c, 1, now=NOW) for c in (far, near)]
    assert extra == pytest.approx([costs.other_region_penalty_s, costs.other_region_penalty_s / 4])
    assert peers(route([cand("a", region="u3"), cand("b", region="u33")])) == ["b"]


def test_hop_cost_adds_rtt_compute_and_penalties() -> None:
    costs = RouteCosts()
    c = cand("a", rtt_s=0.01, compute_gflops=10.0, load=0.5, link_metered=True)
    per_block = (costs.block_flops / 10e9 + costs.block_overhead_s) / 0.5
    assert hop_cost(c, 4, now=NOW) == pytest.approx(0.01 + 4 * per_block + costs.metered_penalty_s)


def test_draining_peer_is_used_when_nothing_else_covers() -> None:
    candidates = [cand("a", 0, 20), cand("b", 20, 30, state="draining"), cand("c", 0, 30, state="joining")]
    assert route(candidates) == [Hop("a", 0, 20), Hop("b", 20, 30)]


@pytest.mark.parametrize(
    ("excluded", "reason"),
    [
        ({"state": "joining"}, "joining"),
        ({"state": "offline"}, "offline"),
        ({"load": 0.96}, "overloaded"),
        ({"compute_gflops": 0.0}, "no compute"),
    ],
)
def test_excluded_peers_are_never_used(excluded: dict[str, Any], reason: str) -> None:
    fast_but_excluded = cand("a", rtt_s=0.0001, **excluded)
    assert peers(route([fast_but_excluded, cand("b", rtt_s=0.1)])) == ["b"]
    with pytest.raises(NoRoute, match=f"block 0 is hosted only by excluded peers \\(1 {reason}\\)"):
        route([fast_but_excluded])


def test_banned_peers_are_avoided() -> None:
    candidates = [cand("a", rtt_s=0.001), cand("b", rtt_s=0.02)]
    assert peers(route(candidates, banned=frozenset({"a"}))) == ["b"]
    with pytest.raises(NoRoute, match=r"block 0 .* \(2 banned\)"):
        route(candidates, banned=frozenset({"a", "b"}))


def test_re_routes_a_lost_span_with_a_sub_range() -> None:
    # The peer that served [5, 12) died; "w" hosts [0, 20) and serves just the lost span.
    candidates = [cand("w", 0, 20), cand("x", 10, 30), cand("dead", 5, 12)]
    assert route(candidates, 5, 12, banned=frozenset({"dead"})) == [Hop("w", 5, 12)]


def test_gap_raises_no_route_naming_the_first_missing_block() -> None:
    candidates = [cand("a", 0, 10), cand("b", 12, 30), cand("c", 11, 30, state="offline")]
    with pytest.raises(
        NoRoute, match=r"^no route for blocks \[0, 30\): block 10 is hosted by no known peer$"
    ):
        route(candidates)
    with pytest.raises(NoRoute) as info:
        route(candidates, 11, 20)
    assert info.value.block == 11 and "1 offline" in str(info.value)
    assert isinstance(info.value, IdlefleetError)
    with pytest.raises(NoRoute, match="block 0 is hosted by no known peer"):
        route([])


def test_span_beyond_every_peer_raises_no_route() -> None:
    with pytest.raises(NoRoute, match="block 30"):
        route([cand("a")], 0, 31)


@pytest.mark.parametrize("span", [(5, 5), (7, 3), (-1, 4)])
def test_bad_span_is_a_local_error(span: tuple[int, int]) -> None:
    with pytest.raises(LocalProtocolError, match="bad route span"):
        route([cand("a")], *span)


@pytest.mark.parametrize(
    "bad",
    [
        {"start": 3, "end": 3},
        {"rtt_s": -0.1},
        {"rtt_s": math.nan},
        {"load": 1.5},
        {"compute_gflops": math.inf},
        {"battery_soc": -0.2},
    ],
)
def test_candidate_validates_itself(bad: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError, match="candidate a: bad"):
        cand("a", **{"start": 0, "end": N, **bad})


def test_route_costs_validate_themselves() -> None:
    with pytest.raises(LocalProtocolError, match="max_load"):
        RouteCosts(max_load=1.0)
    with pytest.raises(LocalProtocolError, match="metered_penalty_s"):
        RouteCosts(metered_penalty_s=-1.0)


def test_from_record_reads_any_record_like_object() -> None:
    record = SimpleNamespace(
        peer_id="p", blocks=(3, 9), compute_gflops=20.0, load=0.2, battery_soc=0.5, plugged_in=False,
        state="draining", expected_departure=NOW + 60, link_metered=True, region="u3", model_id="m",
    )  # fmt: skip
    c = Candidate.from_record(record, 0.004)
    assert c == Candidate("p", 3, 9, 0.004, 20.0, 0.2, 0.5, False, "draining", NOW + 60, True, "u3")
    assert Candidate.from_record(SimpleNamespace(**{**vars(record), "blocks": None}), 0.004) is None


def test_deterministic_whatever_the_input_order() -> None:
    rng = random.Random(7)
    # Many exact ties: the same few shapes under different peer ids.
    candidates = [cand(f"p{i:02d}", *rng.choice([(0, 10), (10, 20), (20, 30), (0, 30)])) for i in range(20)]
    expected = route(candidates)
    assert peers(expected)[0] == min(c.peer_id for c in candidates if (c.start, c.end) == (0, 30))
    for _ in range(10):
        rng.shuffle(candidates)
        assert route(candidates) == expected


def random_candidate(rng: random.Random, i: int, n: int) -> Candidate:
    start = rng.randrange(n)
    return cand(
        f"peer-{i:03d}",
        start,
        rng.randint(start + 1, n),
        rtt_s=rng.choice([None, rng.uniform(0.0005, 0.08)]),
        compute_gflops=rng.uniform(0.5, 200.0),
        load=rng.uniform(0.0, 1.0),
        battery_soc=rng.random(),
        plugged_in=rng.random() < 0.5,
        state=rng.choice(["online", "online", "online", "draining", "joining"]),
        expected_departure=rng.choice([None, NOW + rng.uniform(0, 3600)]),
        link_metered=rng.random() < 0.3,
        region=rng.choice(["u33d", "u33", "u2", "s0"]),
    )


def brute_force_cost(candidates: list[Candidate], start: int, end: int) -> float:
    """Cheapest route cost by trying every hop of every usable peer (O(blocks^2 * peers))."""
    costs = RouteCosts()
    usable = [c for c in candidates if c.state in ("online", "draining") and c.load <= costs.max_load]
    best = [0.0] + [math.inf] * (end - start)
    for j in range(start + 1, end + 1):
        for i in range(start, j):
            for c in usable:
                if c.start <= i and j <= c.end:
                    hop = hop_cost(c, j - i, now=NOW, my_region="u33d")
                    best[j - start] = min(best[j - start], best[i - start] + hop)
    return best[-1]


def route_cost(hops: list[Hop], candidates: list[Candidate]) -> float:
    by_id = {c.peer_id: c for c in candidates}
    return sum(hop_cost(by_id[h.peer_id], h.end - h.start, now=NOW, my_region="u33d") for h in hops)


@pytest.mark.parametrize("seed", range(60))
def test_matches_a_brute_force_search(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    candidates = [random_candidate(rng, i, n) for i in range(rng.randint(1, 16))]
    try:
        hops = route(candidates, 0, n)
    except NoRoute:
        assert brute_force_cost(candidates, 0, n) == math.inf
        return
    assert_valid(hops, candidates, 0, n)
    assert route_cost(hops, candidates) == pytest.approx(brute_force_cost(candidates, 0, n), rel=1e-9)


def test_two_hundred_random_candidates() -> None:
    rng = random.Random(200)
    candidates = [random_candidate(rng, i, N) for i in range(200)]
    candidates = [dataclasses.replace(c, state="online", load=min(c.load, 0.9)) for c in candidates]
    for _ in range(20):
        start = rng.randrange(N)
        end = rng.randint(start + 1, N)
        assert_valid(route(candidates, start, end), candidates, start, end)


# --- claims are capped; measurements replace them (finding 3 of issue 8) ----------------------------


def test_claimed_compute_is_capped() -> None:
    record = SimpleNamespace(
        peer_id="fake", blocks=(0, 30), compute_gflops=999_999.0, load=0.0, battery_soc=1.0, plugged_in=True,
        state="online", expected_departure=None, link_metered=False, region="u33d", model_id="m",
    )  # fmt: skip
    c = Candidate.from_record(record, 0.001)
    assert c is not None
    assert c.compute_gflops == MAX_CLAIMED_GFLOPS


def test_a_measured_peer_beats_a_fantastic_claim_it_cannot_back() -> None:
    # An honest peer measured at 0.7 ms per block; a stranger claims 999,999 GFLOPS, measured at
    # 50 ms per block (it is slow, or it stalls): the measurement decides, not the claim.
    honest = cand("honest", compute_gflops=1.0, block_s=0.0007)
    boaster = cand("boaster", compute_gflops=MAX_CLAIMED_GFLOPS, block_s=0.05)
    assert peers(route([honest, boaster])) == ["honest"]
    assert hop_cost(boaster, 30, now=NOW) == pytest.approx(boaster.rtt_s + 30 * 0.05)


def test_bad_measurement_is_refused() -> None:
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(LocalProtocolError, match="block_s"):
            cand("a", block_s=bad)


# --- own sessions and followed chains (issue 11) -----------------------------------------------------


def test_own_sessions_slow_a_measured_peer_too() -> None:
    # Both measured equally fast; this client already has sessions on "a": "b" wins. (A measured
    # block_s used to replace the load, so every concurrent generation took the same peer.)
    a = cand("a", block_s=0.001, own_load=0.45)
    b = cand("b", block_s=0.001)
    assert peers(route([a, b])) == ["b"]
    assert hop_cost(a, 30, now=NOW) == pytest.approx(a.rtt_s + 30 * 0.001 / 0.55)
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(LocalProtocolError, match="own_load"):
            cand("a", own_load=bad)


def _columns(b2_block_s: float) -> list[Candidate]:
    """Two hosts per third of the model; this client runs one generation on a1 -> b1 -> c1. b2 is
    measured at ``b2_block_s`` per block, everyone else at 1 ms."""
    cands = []
    for r, start in zip("abc", (0, 10, 20), strict=True):
        for k in (1, 2):
            speed = b2_block_s if f"{r}{k}" == "b2" else 0.001
            cands.append(cand(f"{r}{k}", start, start + 10, block_s=speed,
                              own_load=0.45 if k == 1 else 0.0))
    return cands


FIRST = [Hop("a1", 0, 10), Hop("b1", 10, 20), Hop("c1", 20, 30)]


def test_a_followed_chain_wins_within_the_slack() -> None:
    # Without follow: the idle second column. b2 measured 20% faster than the others: a crossing
    # chain (a2, b2, c2) is still the cheapest; with our first chain to follow, it costs
    # 1.8x: not within 25%, so the fresh chain is taken.
    cands = _columns(0.0008)
    assert peers(route(cands)) == ["a2", "b2", "c2"]
    assert peers(route(cands, follow=[FIRST])) == ["a2", "b2", "c2"]
    # Now the first chain's peers are as loaded as the others (a second chain of ours runs on
    # column 2 too): a fresh search would cross to b2 (faster); the chain of ours wins.
    loaded = [dataclasses.replace(c, own_load=0.45) for c in cands]
    assert peers(route(loaded)) == ["a1", "b2", "c1"]
    second = [Hop("a2", 0, 10), Hop("b2", 10, 20), Hop("c2", 20, 30)]
    assert route(loaded, follow=[FIRST, second]) == second  # the cheaper of the two followed
    # b2 far faster: beyond the slack, the crossing chain wins.
    fast = [dataclasses.replace(c, own_load=0.45) for c in _columns(0.0001)]
    assert peers(route(fast, follow=[FIRST])) == ["a1", "b2", "c1"]
    assert peers(route(fast, follow=[FIRST], costs=RouteCosts(follow_slack=10.0))) == ["a1", "b1", "c1"]


def test_a_followed_chain_must_serve_exactly_the_span_on_usable_peers() -> None:
    loaded = [dataclasses.replace(c, own_load=0.45) for c in _columns(0.0008)]
    crossing = ["a1", "b2", "c1"]
    assert peers(route(loaded, follow=[FIRST], banned=frozenset({"b1"}))) == crossing
    assert peers(route(loaded, follow=[FIRST[:2]])) == crossing  # does not reach block 30
    assert peers(route(loaded, follow=[[FIRST[0], FIRST[2]]])) == crossing  # a gap
    assert peers(route(loaded, follow=[[Hop("a1", 0, 10), Hop("b1", 10, 25), Hop("c1", 25, 30)]])) == crossing
    assert peers(route(loaded, follow=[[]])) == crossing
    # A sub-span (failover of blocks [10, 20)): the followed chain's part that serves exactly it.
    assert route(loaded, 10, 20, follow=[FIRST[1:2]]) == [Hop("b1", 10, 20)]


def test_spread_first_a_chain_of_idle_peers_is_not_traded_for_a_followed_one() -> None:
    # The second generation of a client: column 2 carries none of its sessions. Our first chain,
    # measured fast, costs within the slack of column 2 (claims only), yet column 2 is taken.
    cands = [dataclasses.replace(c, block_s=0.00042) if c.own_load
             else dataclasses.replace(c, block_s=None, compute_gflops=20.0) for c in _columns(0.001)]
    first_cost = sum(hop_cost(c, 10, now=NOW) for c in cands if c.peer_id.endswith("1"))
    fresh_cost = sum(hop_cost(c, 10, now=NOW) for c in cands if c.peer_id.endswith("2"))
    assert fresh_cost < first_cost <= 1.25 * fresh_cost, (first_cost, fresh_cost)
    assert peers(route(cands, follow=[FIRST])) == ["a2", "b2", "c2"]
