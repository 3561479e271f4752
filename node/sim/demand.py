"""Demand and routing in the fleet: Poisson arrivals per region, ``routing.find_route`` over a
routed region's online hosts, the per-block capacity bound elsewhere, failovers of lost sessions,
the sibling region, the overnight batch queue."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from idlefleet.node.sim.fleet import HOUR_S, T0
from idlefleet.node.sim.owner import SERVE
from idlefleet.protocols.routing import Candidate, NoRoute, find_route, hop_cost

if TYPE_CHECKING:
    from idlefleet.node.sim.engine import Simulation

#: Why a request was not served.
FAIL_REASONS = ("no_coverage", "overloaded", "failover_failed")
#: A prompt token costs this fraction of a decode token (prefill runs in chunks).
PREFILL_FRACTION = 1 / 8


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal candidate cache keys where the departure (index 4) may be NaN on both sides."""
    return a[:4] == b[:4] and a[5:] == b[5:] and math.isnan(a[4]) and math.isnan(b[4])


def online_index(sim: Simulation) -> tuple[np.ndarray, np.ndarray]:
    f = sim.fleet
    online = sim.hosting & (sim.action == SERVE)
    hosts = np.flatnonzero(online)
    hosts = hosts[np.argsort(f.region[hosts], kind="stable")]
    bounds = np.searchsorted(f.region[hosts], np.arange(f.regions + 1))
    return hosts, bounds


def candidate(sim: Simulation, i: int, now_u: float, region: str) -> Candidate:
    """Car ``i`` as a routing candidate. Candidates are cached per car: routing reads the
    battery only as ``battery_soc < costs.low_battery_soc``, so a cached one whose other fields
    and that predicate are unchanged routes exactly like a new one."""
    f = sim.fleet
    ann = sim.announced[i]
    soc = min(1.0, max(0.0, float(sim.soc[i])))
    used = float(sim.used[i])
    plugged = plug_kw_i(sim, i) > 0
    key = (int(sim.h_start[i]), int(sim.h_end[i]), soc < sim.costs.low_battery_soc, plugged,
           float(ann), used)
    hit = sim.cand_cache.get(i)
    if hit is not None and (hit[0] == key or (math.isnan(ann) and _same_key(hit[0], key))):
        return hit[1]
    cand = Candidate(
        peer_id=f"car{i:08d}", start=key[0], end=key[1], rtt_s=sim.scn.routing.rtt_s,
        compute_gflops=float(f.gflops[i]), load=min(1.0, used / sim.cap), battery_soc=soc,
        plugged_in=plugged, state="online",
        expected_departure=None if math.isnan(ann) else T0 + float(ann),
        link_metered=bool(f.metered[i]), region=region)
    sim.cand_cache[i] = (key, cand)
    return cand


def plug_kw_i(sim: Simulation, i: int) -> float:
    return 0.0 if sim.power_out[i] or not sim.parked[i] else float(sim.plug_kw[i])


def route_assign(sim: Simulation, r: int, members: np.ndarray, count: int, span: tuple[int, int],
                  tokens: tuple[int, int], now_u: float,
                  banned: frozenset[str] = frozenset()) -> tuple[int, str | None]:
    """Serve up to ``count`` requests of region ``r``'s clients over ``span`` with
    ``find_route`` on the region's online hosts. Returns (served, reason the rest failed)."""
    name = sim.region_names[r]
    cands = {f"car{i:08d}": candidate(sim, i, now_u, name) for i in members.tolist()}
    done, calls = 0, 0
    prompt, new = tokens
    work_tokens = new + prompt * PREFILL_FRACTION
    while done < count and calls < sim.scn.routing.max_calls:
        t = time.perf_counter()
        try:
            route = find_route(cands.values(), span[0], span[1], now=now_u, my_region=name,
                               banned=banned, costs=sim.costs)
        except NoRoute as exc:
            hosted = any(c.start <= exc.block < c.end and c.peer_id not in banned for c in cands.values())
            return done, "overloaded" if hosted else "no_coverage"
        finally:
            sim.route_ms.append((time.perf_counter() - t) * 1000.0)
            sim.route_cands.append(len(cands))
            sim.calls["find_route"] += 1
            calls += 1
        sim.route_hops.append(len(route))
        per_token = 0.0
        for hop in route:
            per_token += hop_cost(cands[hop.peer_id], hop.end - hop.start, now=now_u,
                                  costs=sim.latency_costs)
        sim.calls["hop_cost"] += len(route)
        svc = work_tokens * per_token
        idx = [int(h.peer_id[3:]) for h in route]
        room = min(int((sim.cap - sim.used[i]) // svc) for i in idx)
        if room <= 0:  # the busiest hop is full: it takes no more sessions this step
            full = min(idx, key=lambda i: sim.cap - sim.used[i])
            key = f"car{full:08d}"
            cands[key] = replace(cands[key], load=1.0)
            continue
        take = min(room, count - done)
        for hop, i in zip(route, idx, strict=True):
            sim.used[i] += take * svc
            sim.credits[i] += take * (prompt + new) * (hop.end - hop.start)
            cands[hop.peer_id] = replace(cands[hop.peer_id], load=min(1.0, sim.used[i] / sim.cap))
        done += take
    if done < count:  # out of route computations this step: the capacity bound for the rest
        extra, reason = fluid_one(sim, r, members, count - done, span, work_tokens, tokens)
        return done + extra, reason
    return done, None


def svc_s(sim: Simulation, members: np.ndarray, work_tokens: float) -> float:
    """Service time of one request over one region's hosts (see ``_region_svc``)."""
    rr = np.zeros(len(members), dtype=np.int64)
    return float(region_svc(sim, rr, members, 1, work_tokens)[0])


def region_svc(sim: Simulation, rr: np.ndarray, hosts: np.ndarray, R: int, work_tokens: float) -> np.ndarray:
    """Service time of one request per region: ``work_tokens`` times the per-token time of a
    route through hosts of the region's typical speed — per-block compute averaged over the
    blocks hosted (a route's blocks come mostly from the hosts with many of them), plus a round
    trip per hop for hosts of the mean length. Per-host times come from ``routing.hop_cost``."""
    length = (sim.h_end[hosts] - sim.h_start[hosts]).astype(float)
    cnt = np.maximum(np.bincount(rr, minlength=R).astype(float), 1.0)
    blocks = np.maximum(np.bincount(rr, weights=length, minlength=R), 1.0)
    per_block = np.bincount(rr, weights=sim.per_block_s[hosts] * length, minlength=R) / blocks
    fixed = np.bincount(rr, weights=sim.hop_fixed_s[hosts], minlength=R) / cnt
    hops = np.ceil(sim.B / np.maximum(blocks / cnt, 1.0))
    out: np.ndarray = work_tokens * (sim.B * per_block + hops * fixed)
    return out


def fluid_one(sim: Simulation, r: int, members: np.ndarray, count: int, span: tuple[int, int],
               work_tokens: float, tokens: tuple[int, int]) -> tuple[int, str | None]:
    """The capacity bound for one region: ``n`` requests fit if every block of ``span`` has
    ``n * svc`` free slot-seconds among its hosts; the load is shared in proportion to free room."""
    if count <= 0:
        return 0, None
    if not len(members):
        return 0, "no_coverage"
    s0, e0 = span
    starts = np.maximum(sim.h_start[members], s0)
    ends = np.minimum(sim.h_end[members], e0)
    ok = starts < ends
    m, starts, ends = members[ok], starts[ok], ends[ok]
    if not len(m):
        return 0, "no_coverage"
    free = np.maximum(0.0, sim.cap - sim.used[m])
    width = e0 - s0
    diff = np.zeros(width + 1)
    np.add.at(diff, starts - s0, free)
    np.add.at(diff, ends - s0, -free)
    F = np.cumsum(diff)[:width]
    cnt = np.zeros(width + 1)
    np.add.at(cnt, starts - s0, 1)
    np.add.at(cnt, ends - s0, -1)
    if np.any(np.cumsum(cnt)[:width] <= 0):
        return 0, "no_coverage"
    svc = svc_s(sim, m, work_tokens) * width / sim.B
    n_ok = min(count, int(F.min() // svc)) if svc > 0 else count
    if n_ok > 0:
        inv = np.concatenate([[0.0], np.cumsum(1.0 / np.maximum(F, 1e-12))])
        share = n_ok * free * (inv[ends - s0] - inv[starts - s0])  # requests x blocks served
        sim.used[m] += svc * share / (ends - starts)
        sim.credits[m] += share * (tokens[0] + tokens[1])
    return n_ok, None if n_ok == count else "overloaded"


def fluid_all(sim: Simulation, hosts: np.ndarray, bounds: np.ndarray, want: np.ndarray, work_tokens: float,
               tokens: tuple[int, int], regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The capacity bound for many regions at once (vectorised ``_fluid_one`` over the full
    model). Returns (served per region, no-coverage mask)."""
    f, B = sim.fleet, sim.B
    R = f.regions
    served = np.zeros(R, dtype=np.int64)
    sel = np.zeros(R, dtype=bool)
    sel[regions] = True
    sel &= want > 0
    hr = f.region[hosts]
    use = sel[hr]
    h = hosts[use]
    rr = hr[use]
    nocov = sel.copy()
    if not len(h):
        return served, nocov
    free = np.maximum(0.0, sim.cap - sim.used[h])
    s, e = sim.h_start[h], sim.h_end[h]
    W = B + 1
    F = np.bincount(rr * W + s, weights=free, minlength=R * W) - np.bincount(rr * W + e, weights=free,
                                                                             minlength=R * W)
    F = np.cumsum(F.reshape(R, W), axis=1)[:, :B]
    C = np.bincount(rr * W + s, minlength=R * W) - np.bincount(rr * W + e, minlength=R * W)
    C = np.cumsum(C.reshape(R, W), axis=1)[:, :B]
    covered = (C > 0).all(axis=1)
    nocov = sel & ~covered
    svc = region_svc(sim, rr, h, R, work_tokens)
    ok = sel & covered & (svc > 0)
    fit = np.where(ok, np.floor(F.min(axis=1) / np.where(ok, svc, 1.0)), 0.0)
    served = np.where(ok, np.minimum(want, fit), 0).astype(np.int64)
    if served.any():
        inv = np.concatenate([np.zeros((R, 1)), np.cumsum(1.0 / np.maximum(F, 1e-12), axis=1)], axis=1)
        share = served[rr] * free * (inv[rr, e] - inv[rr, s])
        sim.used[h] += svc[rr] * share / (e - s)
        sim.credits[h] += share * (tokens[0] + tokens[1])
    return served, nocov


def demand(sim: Simulation, now: float, lost: list[tuple[int, int, int, int, int]]) -> None:
    f, scn, d = sim.fleet, sim.scn, sim.scn.demand
    R = f.regions
    now_u = T0 + now
    dt = scn.step_s
    sim.used[:] = 0.0
    hosts, bounds = online_index(sim)
    tokens = (d.prompt_tokens, d.new_tokens)
    work = d.new_tokens + d.prompt_tokens * PREFILL_FRACTION
    # 1. failovers of sessions lost to abrupt stops: the remaining half of their work, on the span
    for i, r, s, e, sessions in lost:
        members = hosts[bounds[r]:bounds[r + 1]]
        if sim.routed[r]:
            half = (d.prompt_tokens // 2, d.new_tokens // 2)
            ok, _ = route_assign(sim, r, members, sessions, (s, e), half,
                                       now_u, banned=frozenset({f"car{i:08d}"}))
        else:
            ok, _ = fluid_one(sim, r, members, sessions, (s, e), work / 2, tokens)
        sim.h["failovers"] += sessions
        sim.totals["failovers"] += sessions
        failed = sessions - ok
        sim.h["failed"]["failover_failed"] += failed
        sim.failed["failover_failed"] += failed
        sim.h["served"] -= failed  # they had been counted as served when they started
        sim.totals["served"] -= failed
    # 2. interactive arrivals
    hour = int(((now - dt / 2) % 86_400.0) // HOUR_S)
    lam = d.per_device_hour * d.curve[hour] * sim.pop * dt / HOUR_S
    arrivals = sim.rng.poisson(lam)
    total = int(arrivals.sum())
    sim.h["arrived"] += total
    sim.totals["arrived"] += total
    left = arrivals.copy()
    reason = np.full(R, -1, dtype=np.int8)  # index into FAIL_REASONS of the last failure
    for r in np.flatnonzero(sim.routed & (arrivals > 0)).tolist():
        members = hosts[bounds[r]:bounds[r + 1]]
        if not len(members):
            reason[r] = 0
            continue
        ok, why = route_assign(sim, r, members, int(arrivals[r]), (0, sim.B), tokens, now_u)
        left[r] -= ok
        if why is not None:
            reason[r] = FAIL_REASONS.index(why)
    fluid_regions = np.flatnonzero(~sim.routed)
    served, nocov = fluid_all(sim, hosts, bounds, left, work, tokens, fluid_regions)
    left -= served
    reason = np.where(~sim.routed & (left > 0), np.where(nocov, 0, 1), reason)
    served_home = int((arrivals - left).sum())
    for key, mask in (("routed", sim.routed), ("bound", ~sim.routed)):
        sim.by_method[key][0] += int(arrivals[mask].sum())
        sim.by_method[key][1] += int((arrivals - left)[mask].sum())
    # 3. what is left tries the sibling region (the clients' routing penalty for another region)
    remote = 0
    sib = sim.sibling
    want = np.zeros(R, dtype=np.int64)
    has_sib = (left > 0) & (sib >= 0)
    np.add.at(want, sib[has_sib], left[has_sib])
    if want.any():
        got, _ = fluid_all(sim, hosts, bounds, want, work, tokens, np.flatnonzero(want > 0))
        # hand back per origin region in order
        for r in np.flatnonzero(has_sib).tolist():
            t = sib[r]
            take = int(min(left[r], got[t]))
            got[t] -= take
            left[r] -= take
            remote += take
    for r in np.flatnonzero(left > 0).tolist():
        why = FAIL_REASONS[max(0, int(reason[r]))]
        sim.h["failed"][why] += int(left[r])
        sim.failed[why] += int(left[r])
    ok_total = served_home + remote
    sim.h["served"] += ok_total
    sim.h["served_remote"] += remote
    sim.totals["served"] += ok_total
    sim.totals["served_remote"] += remote
    sim.h["tokens"] += ok_total * (d.prompt_tokens + d.new_tokens)
    sim.totals["tokens"] += ok_total * (d.prompt_tokens + d.new_tokens)
    # 4. the overnight batch queue takes what capacity is left
    if d.batch_per_device > 0:
        bh = d.batch_hour * HOUR_S
        prev = now - dt
        if math.floor((prev - bh) / 86_400.0) != math.floor((now - bh) / 86_400.0):
            add = np.round(d.batch_per_device * sim.pop).astype(np.int64)
            sim.queue += add
            sim.totals["batch_arrived"] += int(add.sum())
        if sim.queue.any():
            btok = (d.prompt_tokens, d.batch_new_tokens)
            bwork = d.batch_new_tokens + d.prompt_tokens * PREFILL_FRACTION
            got, _ = fluid_all(sim, hosts, bounds, sim.queue, bwork, btok, np.flatnonzero(sim.queue))
            sim.queue -= got
            sim.h["batch_served"] += int(got.sum())
            sim.totals["batch_served"] += int(got.sum())
            sim.h["tokens"] += int(got.sum()) * sum(btok)
            sim.totals["tokens"] += int(got.sum()) * sum(btok)
    sim.util = np.minimum(1.0, sim.used / sim.cap)
    sim.served_s += sim.used
