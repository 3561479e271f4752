"""Block hosting in the fleet: a car that may serve joins with ``placement.choose_range`` of its
region's coverage, one that may not leaves (abruptly or draining), and hosts of regions whose
coverage changed ask ``placement.should_move`` (memoised)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from idlefleet.node.sim.owner import SERVE, STOP
from idlefleet.protocols.errors import LocalProtocolError
from idlefleet.protocols.placement import choose_range, should_move

if TYPE_CHECKING:
    from idlefleet.node.sim.engine import Simulation


def leave(sim: Simulation, i: int) -> None:
    r = sim.fleet.region[i]
    sim.cov[r, sim.h_start[i]:sim.h_end[i]] -= 1
    sim.cov_dirty[r] = True
    sim.hosting[i] = False


def join(sim: Simulation, i: int) -> bool:
    f = sim.fleet
    r = f.region[i]
    try:
        s, e = choose_range(sim.B, sim.block_bytes, int(f.budget_bytes[i]), sim.cov[r].tolist())
    except LocalProtocolError:
        return False  # not even one block fits
    finally:
        sim.calls["choose_range"] += 1
    sim.h_start[i], sim.h_end[i] = s, e
    sim.cov[r, s:e] += 1
    sim.cov_dirty[r] = True
    sim.hosting[i] = True
    sim.h["joins"] += 1
    sim.totals["joins"] += 1
    sim.h["dht_lookups"] += e - s  # one DHT provide (a lookup) per hosted block
    return True


def hosting(sim: Simulation, departed: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Join / leave per decision; returns abrupt stops as (car, region, start, end, lost)."""
    can_serve = (sim.action == SERVE) & sim.parked & ~sim.net_out
    lost_list: list[tuple[int, int, int, int, int]] = []
    leaving = np.flatnonzero(sim.hosting & ~can_serve)
    conc = sim.used / sim.scn.step_s
    u = sim.rng.random(len(leaving))
    for k, i in enumerate(leaving.tolist()):
        abrupt = departed[i] or sim.action[i] == STOP or sim.net_out[i] or not sim.parked[i]
        sessions = int(conc[i] + u[k])
        r, s, e = int(sim.fleet.region[i]), int(sim.h_start[i]), int(sim.h_end[i])
        leave(sim, i)
        if abrupt:
            sim.totals["abrupt_stops"] += 1
            if sessions:
                lost_list.append((i, r, s, e, sessions))
        else:
            sim.h["migrations"] += sessions
            sim.totals["migrations"] += sessions
    for i in np.flatnonzero(can_serve & ~sim.hosting & (sim.n_fit > 0)).tolist():
        join(sim, i)
    return lost_list


def rebalance(sim: Simulation, *, gaps_only: bool = False) -> None:
    """Hosts of regions whose coverage changed ask ``should_move``: ``rebalance_checks``
    distinct (budget, range) groups per region in turn; in a region with a block nobody hosts
    (``gaps_only``, every step) every group asks, as nodes checking every ~20 s would."""
    f = sim.fleet
    if gaps_only:
        gap = sim.cov_dirty & (sim.cov.min(axis=1) == 0)
        regions = np.flatnonzero(gap)
        sim.cov_dirty &= ~gap
    else:
        regions = np.flatnonzero(sim.cov_dirty)
        sim.cov_dirty[:] = False
        sim.rebalance_round += 1
    if not len(regions):
        return
    hosts = np.flatnonzero(sim.hosting)
    order = np.argsort(f.region[hosts], kind="stable")
    hosts = hosts[order]
    hr = f.region[hosts]
    bounds = np.searchsorted(hr, np.arange(f.regions + 1))
    # (blocks that fit, start, end) of every host as one sortable int
    W = sim.B + 1
    codes = (sim.n_fit[hosts] * W + sim.h_start[hosts]) * W + sim.h_end[hosts]
    for r in regions.tolist():
        members = hosts[bounds[r]:bounds[r + 1]]
        if not len(members):
            continue
        mcodes = codes[bounds[r]:bounds[r + 1]]
        keys = np.unique(mcodes).tolist()
        k = len(keys) if gaps_only else sim.scn.rebalance_checks
        first = (sim.rebalance_round * k) % len(keys)
        for code in (keys + keys)[first:first + min(k, len(keys))]:
            fit, s, e = code // (W * W), code // W % W, code % W
            cars = members[mcodes == code].tolist()
            while cars:
                wo = sim.cov[r].copy()
                wo[s:e] -= 1
                mkey = (fit, s, e, wo.tobytes())
                if mkey in sim.move_memo:
                    better = sim.move_memo[mkey]
                else:
                    # Uniform block sizes: the answer depends on the budget only through how
                    # many blocks fit, so the memo is keyed by that.
                    better = should_move(sim.B, sim.block_bytes, int(f.budget_bytes[cars[0]]),
                                         wo.tolist(), (s, e))
                    sim.calls["should_move"] += 1
                    if len(sim.move_memo) > 200_000:
                        sim.move_memo.clear()
                    sim.move_memo[mkey] = better
                if better is None:
                    break
                i = cars.pop()
                sim.cov[r, s:e] -= 1
                sim.h_start[i], sim.h_end[i] = better
                sim.cov[r, better[0]:better[1]] += 1
                sim.h["moves"] += 1
                sim.totals["moves"] += 1
                sim.h["dht_lookups"] += better[1] - better[0]
