"""The simulated population: devices, regions and daily schedules, all drawn from one seed.

Everything is a numpy array indexed by device (``Fleet``) or a flat, time-sorted event list
(``Schedule``). Schedules are generated per profile, vectorised over the devices of that profile,
for every day the run touches (plus the day before, so the state at the start is settled). A trip
is an interval away from the parking spot (driving, or a phone/laptop in use); after it the device
parks with a charger of ``plug_kw`` (0 = unplugged). All days are weekdays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from idlefleet.node.sim.scenario import PROFILES, Scenario
from idlefleet.protocols.records import GEOHASH_ALPHABET

__all__ = ["DAY_S", "HOUR_S", "KINDS", "T0", "Fleet", "Schedule", "build_fleet", "region_name"]

HOUR_S = 3600.0
DAY_S = 86_400.0
#: Unix time of day 0, 00:00 local (2026-03-03, a Tuesday; every car shares UTC as local time).
T0 = 1_772_496_000.0
#: Device kinds: 0 = car (commuter, parked, taxi, van), 1 = phone, 2 = laptop.
KINDS = ("car", "phone", "laptop")
_KIND_OF_PROFILE = np.array([0, 0, 0, 0, 1, 2], dtype=np.int8)
MB = 1024 * 1024


def region_name(index: int) -> str:
    """A geohash-5 cell name for region ``index`` (siblings ``2k``, ``2k+1`` share 4 characters)."""
    chars = []
    for _ in range(4):
        chars.append(GEOHASH_ALPHABET[index % 32])
        index //= 32
    return "u" + "".join(reversed(chars))


@dataclass
class Schedule:
    """Trips as a flat event list sorted by time: departures (``kind`` 0) and arrivals (1).

    For an arrival, ``plug_kw`` is the charger there and ``announced`` the departure time the car
    announces for its next trip (NaN: unannounced or no next trip in the horizon).
    """

    t: np.ndarray  # float64 seconds since T0
    car: np.ndarray  # int64
    kind: np.ndarray  # int8
    plug_kw: np.ndarray  # float64
    announced: np.ndarray  # float64


@dataclass
class Fleet:
    """Per-device constants and the initial state at the simulation start."""

    n: int
    regions: int
    region: np.ndarray  # int32
    profile: np.ndarray  # int8 index into PROFILES
    kind: np.ndarray  # int8 index into KINDS
    battery_kwh: np.ndarray
    drive_kw: np.ndarray
    standby_kw: np.ndarray
    compute_kw: np.ndarray  # draw at full load while serving
    idle_kw: np.ndarray  # draw while serving with no session
    gflops: np.ndarray
    budget_bytes: np.ndarray  # int64 memory for weights
    limit_c: np.ndarray  # throttle point
    ambient_c: np.ndarray
    tau_s: np.ndarray
    serve_rise_c: np.ndarray  # above ambient at full load
    opted_in: np.ndarray  # bool: runs a node at all
    revoke_at: np.ndarray  # seconds since T0, NaN = never
    on_battery: np.ndarray  # bool: owner allows serving unplugged
    metered: np.ndarray  # bool
    # initial state at the start
    soc: np.ndarray
    parked: np.ndarray
    plug_kw: np.ndarray
    parked_since: np.ndarray  # NaN while away
    announced: np.ndarray  # NaN = none
    schedule: Schedule


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return rng.uniform(lo, hi, n)


def _trips(scn: Scenario, rng: np.random.Generator, profile: int, cars: np.ndarray, days: range,
           home_kw: np.ndarray, work_kw: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """(car, depart_h, arrive_h, plug_kw_after) arrays for one profile, hours since day 0."""
    n = len(cars)
    name = PROFILES[profile]
    out: list[tuple[np.ndarray, ...]] = []
    if name == "commuter":
        dep_h, work_h = _uniform(rng, 6.5, 8.5, n), _uniform(rng, 8.0, 9.5, n)
        com_h = _uniform(rng, 0.25, 0.8, n)
        for d in days:
            t1 = d * 24 + dep_h + _uniform(rng, -0.5, 0.5, n)
            c1 = com_h * _uniform(rng, 0.8, 1.4, n)
            t3 = t1 + c1 + work_h + _uniform(rng, -0.75, 0.75, n)
            c2 = com_h * _uniform(rng, 0.8, 1.5, n)
            out += [(cars, t1, t1 + c1, work_kw), (cars, t3, t3 + c2, home_kw)]
            errand = rng.random(n) < 0.4
            te = t3 + c2 + _uniform(rng, 1.0, 2.5, n)
            away = _uniform(rng, 0.8, 2.3, n)
            out.append((cars[errand], te[errand], (te + away)[errand], home_kw[errand]))
    elif name == "parked":
        for d in days:
            go = rng.random(n) < 0.3
            t = d * 24 + _uniform(rng, 10.0, 16.0, n)
            out.append((cars[go], t[go], (t + _uniform(rng, 0.5, 2.5, n))[go], home_kw[go]))
    elif name == "taxi":
        shift = _uniform(rng, 5.0, 7.0, n)
        fast = np.full(n, 50.0)
        for d in days:
            s = d * 24 + shift + _uniform(rng, -0.5, 0.5, n)
            end = np.minimum(s + _uniform(rng, 14.0, 16.0, n), d * 24 + 22.5)
            b1, l1 = s + _uniform(rng, 4.0, 5.0, n), _uniform(rng, 0.5, 0.8, n)
            b2, l2 = s + _uniform(rng, 9.5, 10.5, n), _uniform(rng, 0.5, 0.8, n)
            out += [(cars, s, b1, fast), (cars, b1 + l1, b2, fast), (cars, b2 + l2, end, home_kw)]
    elif name == "van":
        for d in days:
            t = d * 24 + _uniform(rng, 7.5, 8.5, n)
            out.append((cars, t, d * 24 + _uniform(rng, 16.5, 18.0, n), home_kw))
    elif name == "phone":
        for d in days:
            out.append((cars, d * 24 + _uniform(rng, 6.0, 8.0, n), d * 24 + _uniform(rng, 22.0, 23.5, n),
                        home_kw))
    else:  # laptop: to the desk (plugged), home in the evening, plugged overnight 70% of nights
        for d in days:
            t1 = d * 24 + _uniform(rng, 8.0, 9.0, n)
            t2 = d * 24 + _uniform(rng, 17.0, 18.5, n)
            night = np.where(rng.random(n) < 0.7, home_kw, 0.0)
            out += [(cars, t1, t1 + _uniform(rng, 0.3, 0.8, n), home_kw),
                    (cars, t2, t2 + _uniform(rng, 0.5, 2.0, n), night)]
    return out


def _rush(scn: Scenario, rng: np.random.Generator, trips: tuple[np.ndarray, ...], vehicles: np.ndarray,
          home_kw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Replace the trips of ``rush_fraction`` of the vehicles around the rush with one rush trip."""
    car, dep, arr, plug = trips
    e = scn.events
    t0 = scn.start_hour + e.rush_at_h
    t1 = t0 + e.rush_within_h + e.rush_away_h
    away_at_t0 = np.zeros(len(home_kw), dtype=bool)
    inside = (dep <= t0) & (arr > t0)
    away_at_t0[car[inside]] = True
    eligible = vehicles[~away_at_t0[vehicles]]
    k = min(len(eligible), round(e.rush_fraction * len(vehicles)))
    chosen = np.sort(rng.choice(eligible, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)
    picked = np.zeros(len(home_kw), dtype=bool)
    picked[chosen] = True
    keep = ~(picked[car] & (arr > t0 - 1.0) & (dep < t1 + 1.0))
    leave = t0 + rng.uniform(0.0, e.rush_within_h, k)
    back = leave + e.rush_away_h
    return (np.concatenate([car[keep], chosen]), np.concatenate([dep[keep], leave]),
            np.concatenate([arr[keep], back]), np.concatenate([plug[keep], home_kw[chosen]]))


def build_fleet(scn: Scenario) -> Fleet:
    """Draw the whole population and its schedules from ``scn.seed``; deterministic."""
    rng = np.random.Generator(np.random.PCG64(scn.seed))
    n, f, m = scn.cars, scn.fleet, scn.model
    regions = scn.regions
    weights = np.exp(rng.normal(0.0, f.region_spread, regions))
    counts = rng.multinomial(n, weights / weights.sum())
    region = np.repeat(np.arange(regions, dtype=np.int32), counts)
    names = [p for p, _ in f.profiles]
    w = np.array([x for _, x in f.profiles], dtype=float)
    profile = np.array([PROFILES.index(p) for p in names], dtype=np.int8)[
        rng.choice(len(names), size=n, p=w / w.sum())]
    kind = _KIND_OF_PROFILE[profile]
    is_car, is_phone, is_laptop = kind == 0, kind == 1, kind == 2

    Span = tuple[float, float]

    def per_kind(car: Span, phone: Span, laptop: Span) -> np.ndarray:
        out = np.empty(n)
        for mask, (lo, hi) in ((is_car, car), (is_phone, phone), (is_laptop, laptop)):
            out[mask] = rng.uniform(lo, hi, int(mask.sum()))
        return out

    battery_kwh = per_kind((55.0, 100.0), (0.012, 0.018), (0.05, 0.08))
    drive_kw = per_kind((10.0, 14.0), (0.0008, 0.001), (0.01, 0.014))
    drive_kw[profile == PROFILES.index("taxi")] *= 0.3  # a shift's mean: urban driving, waiting at stands
    standby_kw = per_kind((0.03, 0.03), (0.0001, 0.0001), (0.0015, 0.0015))
    compute_kw = per_kind((0.8, 1.2), (0.005, 0.007), (0.035, 0.05))
    idle_kw = compute_kw * 0.15
    gflops = np.round(per_kind((1_500.0, 2_500.0), (60.0, 100.0), (250.0, 400.0)), -1)  # 10 GFLOPS steps
    memory_mb = per_kind(m.car_memory_mb, m.phone_memory_mb, m.laptop_memory_mb)
    budget_bytes = (memory_mb * MB).astype(np.int64)
    limit_c = np.select([is_car, is_phone], [85.0, 45.0], 95.0)
    outdoor = f.ambient_c + rng.uniform(-f.ambient_spread_c, f.ambient_spread_c, n)
    ambient_c = np.where(is_car, outdoor, rng.uniform(20.0, 25.0, n))
    tau_s = np.where(is_car, 900.0, 300.0)
    serve_rise_c = np.select([is_car, is_phone], [30.0, 12.0], 20.0)
    opted_in = rng.random(n) < f.consent
    hazard = f.revoke_per_hour
    revoke_h = rng.exponential(1.0 / hazard, n) if hazard > 0 else np.full(n, np.inf)
    revoke_at = np.where(revoke_h < scn.hours, (scn.start_hour + revoke_h) * HOUR_S, np.nan)
    on_battery = rng.random(n) < f.on_battery
    metered = rng.random(n) < f.metered
    has_home = rng.random(n) < f.home_charger
    car_home = np.where(profile >= PROFILES.index("taxi"), 22.0, rng.choice([7.4, 11.0], n))
    home_kw = np.select([is_car, is_phone], [np.where(has_home, car_home, 0.0), 0.018], 0.065)
    work_kw = np.where(rng.random(n) < f.work_charger, 11.0, 0.0)
    soc = rng.uniform(0.35, 0.9, n)

    first_day = math.floor(scn.start_hour / 24) - 1
    last_day = math.ceil((scn.start_hour + scn.hours) / 24) + 1
    days = range(first_day, last_day + 1)
    parts: list[tuple[np.ndarray, ...]] = []
    for p in range(len(PROFILES)):
        cars = np.flatnonzero(profile == p)
        if len(cars):
            parts += _trips(scn, rng, p, cars, days, home_kw[cars], work_kw[cars])
    trips = tuple(np.concatenate([part[i] for part in parts]) if parts else np.zeros(0) for i in range(4))
    car = trips[0].astype(np.int64)
    trips = (car, trips[1], trips[2], trips[3])
    if scn.events.rush_fraction > 0:
        trips = _rush(scn, rng, trips, np.flatnonzero(is_car), home_kw)
    car, dep_h, arr_h, plug = trips
    order = np.lexsort((dep_h, car))
    car, dep, arr, plug = car[order], dep_h[order] * HOUR_S, arr_h[order] * HOUR_S, plug[order]
    same_next = np.zeros(len(car), dtype=bool)
    same_next[:-1] = car[1:] == car[:-1]
    next_dep = np.full(len(car), np.nan)
    next_dep[:-1] = np.where(same_next[:-1], dep[1:], np.nan)
    err = rng.normal(0.0, f.departure_error_s, len(car))
    announced = np.where(rng.random(len(car)) < f.announce_departure, next_dep + err, np.nan)

    start = scn.start_hour * HOUR_S
    # Initial state: the last trip that began at or before the start decides.
    before = dep <= start
    last = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(before)
    np.maximum.at(last, car[idx], idx)  # trips are sorted by (car, dep): the largest index is the latest
    has = last >= 0
    li = last[has]
    parked = np.ones(n, dtype=bool)
    plug_kw = home_kw.copy()
    parked_since = np.full(n, first_day * DAY_S)
    first_trip = np.full(n, np.nan)
    firsts = np.flatnonzero(~np.concatenate([[False], same_next[:-1]]))
    first_trip[car[firsts]] = dep[firsts]
    ann = np.where(rng.random(n) < f.announce_departure, first_trip, np.nan)  # no trip yet: next is first
    cars_has = np.flatnonzero(has)
    away = arr[li] > start
    parked[cars_has] = ~away
    plug_kw[cars_has] = np.where(away, 0.0, plug[li])
    parked_since[cars_has] = np.where(away, np.nan, arr[li])
    ann[cars_has] = np.where(away, np.nan, announced[li])

    t = np.concatenate([dep, arr])
    ev_car = np.concatenate([car, car])
    ev_kind = np.concatenate([np.zeros(len(car), np.int8), np.ones(len(car), np.int8)])
    ev_plug = np.concatenate([np.zeros(len(car)), plug])
    ev_ann = np.concatenate([np.full(len(car), np.nan), announced])
    keep = t > start
    order = np.lexsort((ev_kind[keep], ev_car[keep], t[keep]))
    schedule = Schedule(t[keep][order], ev_car[keep][order], ev_kind[keep][order], ev_plug[keep][order],
                        ev_ann[keep][order])
    return Fleet(
        n=n, regions=regions, region=region, profile=profile, kind=kind, battery_kwh=battery_kwh,
        drive_kw=drive_kw, standby_kw=standby_kw, compute_kw=compute_kw, idle_kw=idle_kw, gflops=gflops,
        budget_bytes=budget_bytes, limit_c=limit_c, ambient_c=ambient_c, tau_s=tau_s,
        serve_rise_c=serve_rise_c, opted_in=opted_in, revoke_at=revoke_at, on_battery=on_battery,
        metered=metered, soc=soc, parked=parked, plug_kw=plug_kw, parked_since=parked_since,
        announced=ann, schedule=schedule,
    )
