"""A simulated vehicle: a seeded park/drive schedule per profile (commuter, taxi, parked, phone,
laptop) with battery and thermal integration (``physics``); ``time_scale`` speeds its clock up for
demos. Spec strings ``sim:commuter:seed=3`` or ``sim:taxi:seed=7:scale=60`` (``spec.make_provider``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from idlefleet.node.vehicle import physics
from idlefleet.node.vehicle.physics import DAY_S, HOUR_S
from idlefleet.node.vehicle.state import VehicleState, check_number, check_positive

__all__ = ["PROFILES", "SimulatedVehicle"]



@dataclass(frozen=True)
class _Profile:
    battery_kwh: float
    drive_kw: float  # draw while driving (phones/laptops: while in use)
    standby_kw: float  # draw while parked and unplugged
    charger_kw: float  # home / desk charger
    fast_kw: float  # fast charger on taxi breaks
    limit_c: float  # throttle point of the compute unit
    idle_rise_c: float  # above ambient when parked
    drive_rise_c: float  # extra when driving / in use
    charge_rise_c: float  # extra at charge_ref_kw of charging power
    charge_ref_kw: float
    solar_c: float  # extra when parked unplugged at midday (sun on the roof)
    ambient_lo_c: float  # the vehicle's mean ambient is drawn from lo..hi
    ambient_hi_c: float
    diurnal_c: float  # amplitude of the day/night ambient swing
    tau_s: float  # thermal time constant


_CAR = _Profile(
    battery_kwh=75.0, drive_kw=12.0, standby_kw=0.03, charger_kw=11.0, fast_kw=50.0,
    limit_c=85.0, idle_rise_c=2.0, drive_rise_c=25.0, charge_rise_c=20.0, charge_ref_kw=50.0,
    solar_c=12.0, ambient_lo_c=0.0, ambient_hi_c=28.0, diurnal_c=6.0, tau_s=900.0,
)  # fmt: skip

PROFILES: dict[str, _Profile] = {
    "commuter": _CAR,
    "taxi": _Profile(**{**_CAR.__dict__, "drive_kw": 7.0}),  # urban driving draws less
    "parked": _Profile(**{**_CAR.__dict__, "charger_kw": 7.4}),
    "phone": _Profile(
        battery_kwh=0.015, drive_kw=0.0009, standby_kw=0.00012, charger_kw=0.018, fast_kw=0.018,
        limit_c=45.0, idle_rise_c=3.0, drive_rise_c=9.0, charge_rise_c=8.0, charge_ref_kw=0.018,
        solar_c=0.0, ambient_lo_c=19.0, ambient_hi_c=25.0, diurnal_c=2.0, tau_s=300.0,
    ),
    "laptop": _Profile(
        battery_kwh=0.06, drive_kw=0.012, standby_kw=0.0015, charger_kw=0.065, fast_kw=0.065,
        limit_c=95.0, idle_rise_c=20.0, drive_rise_c=25.0, charge_rise_c=5.0, charge_ref_kw=0.065,
        solar_c=0.0, ambient_lo_c=19.0, ambient_hi_c=25.0, diurnal_c=2.0, tau_s=300.0,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class _Leg:
    """A stretch of simulated time in one mode: driving, or parked with a charger of ``plug_kw``."""

    start: float
    end: float
    driving: bool
    plug_kw: float  # 0 = unplugged


_Plan = list[tuple[float, bool, float]]  # (hour of day, driving, plug_kw), hours increasing


class SimulatedVehicle:
    """A deterministic simulated vehicle: same seed, profile, start and read times => same states.

    The schedule is generated per (UTC) day from ``seed`` and ``profile``; ``read(now)`` integrates
    battery and temperature in fixed steps of simulated time. ``time_scale`` runs the simulated
    clock faster than ``now`` (60 = one simulated minute per real second, so a day passes in 24
    minutes); timestamps in the returned state (``parked_since``, ``expected_departure``) are mapped
    back to the caller's clock, so they compare directly with ``now``. Results depend only on the
    constructor arguments and ``now``, not on how often ``read`` was called.

    ``battery_kwh``, ``charger_kw``, ``initial_soc`` and ``ambient_c`` (mean ambient temperature)
    default to the profile's values or to values drawn from the seed. Raises ValueError on an
    unknown profile or bad option.
    """

    STEP_S = 120.0  # integration step in simulated seconds
    _PLAN_CACHE = 16  # days of schedule kept

    def __init__(
        self,
        seed: int,
        profile: str,
        start: float,
        *,
        battery_kwh: float | None = None,
        charger_kw: float | None = None,
        initial_soc: float | None = None,
        ambient_c: float | None = None,
        time_scale: float = 1.0,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        if not math.isfinite(start):
            raise ValueError(f"start must be a finite unix time, got {start!r}")
        p = PROFILES[profile]
        rng = random.Random(f"idlefleet-sim:{profile}:{seed}")  # str seeds hash the same everywhere
        self.seed = seed
        self.profile = profile
        self.start = float(start)
        self.time_scale = float(time_scale)
        scale = f":scale={time_scale:g}" if time_scale != 1 else ""
        self.name = f"sim:{profile}:seed={seed}{scale}"
        self.last_error: str | None = None
        self.stale = False
        self._p = p
        self._battery_kwh = check_positive("battery_kwh", _default(battery_kwh, p.battery_kwh))
        self._charger_kw = check_positive("charger_kw", _default(charger_kw, p.charger_kw))
        self._drive_kw = p.drive_kw * rng.uniform(0.85, 1.15)
        mean_ambient = rng.uniform(p.ambient_lo_c, p.ambient_hi_c)
        self._ambient_c = mean_ambient if ambient_c is None else ambient_c
        soc = rng.uniform(0.35, 0.9) if initial_soc is None else initial_soc
        check_number("initial_soc", soc, 0.0, 1.0)
        # Per-vehicle habits, fixed for its life.
        self._habit_depart_h = rng.uniform(6.5, 8.5)
        self._habit_work_h = rng.uniform(8.0, 9.5)
        self._habit_commute_h = rng.uniform(0.25, 0.8)
        self._habit_work_charger = rng.random() < 0.25
        self._habit_shift_h = rng.uniform(5.0, 7.0)
        self._plans: dict[int, list[_Leg]] = {}
        # (leg start, leg end, parked since, parked until) of the last parked leg read
        self._run_cache: tuple[float, float, float, float | None] | None = None
        # Integration state at the last committed grid point (simulated time).
        self._k = 0  # grid index: next grid point is start + (k + 1) * STEP_S
        self._t = self.start
        self._soc = float(soc)
        leg = self._leg_at(self.start)
        self._temp = self._target_temp(self.start, leg, self._charge_power(leg, self._soc))
        self._last_now = -math.inf

    # -- public ------------------------------------------------------------------------------------

    def read(self, now: float) -> VehicleState:
        """State at ``now``; raises ValueError if ``now`` is before ``start`` or the last read."""
        if not math.isfinite(now) or now < self.start:
            raise ValueError(f"now={now!r} is before the simulation start {self.start!r}")
        if now < self._last_now:
            raise ValueError(f"time went backwards: now={now!r} < previous read {self._last_now!r}")
        self._last_now = now
        sim = self.start + (now - self.start) * self.time_scale
        self._advance(sim)
        leg = self._leg_at(self._t)
        soc, temp = self._step(self._t, sim - self._t, leg, self._soc, self._temp)
        headroom = physics.headroom_c(self._p.limit_c, temp)
        if leg.driving:
            return VehicleState(soc, False, 0.0, headroom, False, None, None)
        since, until = self._park_run(leg)
        return VehicleState(
            battery_soc=soc,
            plugged_in=leg.plug_kw > 0,
            charging_kw=self._charge_power(leg, soc),
            thermal_headroom_c=headroom,
            parked=True,
            parked_since=self._real(since),
            expected_departure=None if until is None else self._real(until),
        )

    # -- integration -------------------------------------------------------------------------------

    def _advance(self, sim: float) -> None:
        """Commit steps up to the last grid point or leg boundary at or before ``sim``."""
        while True:
            leg = self._leg_at(self._t)
            grid = self.start + (self._k + 1) * self.STEP_S
            nxt = min(grid, leg.end)
            if nxt > sim:
                return
            self._soc, self._temp = self._step(self._t, nxt - self._t, leg, self._soc, self._temp)
            self._t = nxt
            if nxt == grid:
                self._k += 1

    def _step(self, t: float, dt: float, leg: _Leg, soc: float, temp: float) -> tuple[float, float]:
        """Integrate ``dt`` simulated seconds from ``t`` within one leg; returns (soc, temp)."""
        if dt <= 0:
            return soc, temp
        p_in = self._charge_power(leg, soc)
        net_kw = physics.battery_kw(not leg.driving, leg.plug_kw, p_in, self._drive_kw, self._p.standby_kw)
        new_soc = physics.soc_after(soc, net_kw, dt, self._battery_kwh)
        target = self._target_temp(t + dt / 2, leg, p_in)
        return new_soc, physics.relax_c(temp, target, dt, self._p.tau_s)

    def _charge_power(self, leg: _Leg, soc: float) -> float:
        """Power into the battery at ``soc`` from the leg's charger (0 while driving)."""
        plug: float = physics.plug_kw(not leg.driving, leg.plug_kw)
        out: float = physics.charge_kw(plug, soc)
        return out

    def _target_temp(self, t: float, leg: _Leg, p_in: float) -> float:
        p = self._p
        target: float = physics.target_temp_c(
            t, ambient_c=self._ambient_c, diurnal_c=p.diurnal_c, idle_rise_c=p.idle_rise_c,
            driving=leg.driving, drive_rise_c=p.drive_rise_c, unplugged=leg.plug_kw <= 0,
            solar_c=p.solar_c, charge=p_in, charge_rise_c=p.charge_rise_c, charge_ref_kw=p.charge_ref_kw)
        return target

    def _real(self, sim: float) -> float:
        """Simulated time on the caller's clock (never before the epoch, for a start near 0)."""
        return max(0.0, self.start + (sim - self.start) / self.time_scale)

    # -- schedule ----------------------------------------------------------------------------------

    def _leg_at(self, t: float) -> _Leg:
        for leg in self._legs(math.floor(t / DAY_S)):
            if leg.start <= t < leg.end:
                return leg
        raise AssertionError(f"schedule has a gap at {t}")  # pragma: no cover - plans cover the day

    def _leg_before(self, leg: _Leg) -> _Leg:
        day = round(leg.start // DAY_S)
        legs = self._legs(day)
        i = legs.index(leg)
        return legs[i - 1] if i > 0 else self._legs(day - 1)[-1]

    def _park_run(self, leg: _Leg) -> tuple[float, float | None]:
        """(since, until) of the parked stretch at ``leg``; until None: no drive within 7 days."""
        cache = self._run_cache
        if cache is not None and cache[0] == leg.start:
            return cache[2], cache[3]
        if cache is not None and cache[1] == leg.start:
            since = cache[2]  # the previous leg was parked too: same stretch
        else:
            # Walk back no further than the day before the simulation start: a stable answer.
            floor = (math.floor(self.start / DAY_S) - 1) * DAY_S
            prev = leg
            while prev.start > floor:
                before = self._leg_before(prev)
                if before.driving:
                    break
                prev = before
            since = max(prev.start, floor)
        until: float | None = leg.end
        horizon = leg.start + 7 * DAY_S
        while until is not None and not self._leg_at(until).driving:
            until = self._leg_at(until).end
            if until > horizon:
                until = None
        self._run_cache = (leg.start, leg.end, since, until)
        return since, until

    def _legs(self, day: int) -> list[_Leg]:
        legs = self._plans.get(day)
        if legs is None:
            if len(self._plans) >= self._PLAN_CACHE:
                del self._plans[next(iter(self._plans))]
            legs = self._plans[day] = self._make_legs(day)
        return legs

    def _make_legs(self, day: int) -> list[_Leg]:
        plan = self._plan(day)
        base = day * DAY_S
        legs: list[_Leg] = []
        for i, (hour, driving, plug_kw) in enumerate(plan):
            end_h = plan[i + 1][0] if i + 1 < len(plan) else 24.0
            start, end = base + hour * HOUR_S, base + end_h * HOUR_S
            if end < start:
                raise AssertionError(f"plan for day {day} goes backwards at hour {hour}")
            if end == start:
                continue
            if legs and legs[-1].driving == driving and legs[-1].plug_kw == plug_kw:
                legs[-1] = _Leg(legs[-1].start, end, driving, plug_kw)
            else:
                legs.append(_Leg(start, end, driving, plug_kw))
        return legs

    def _day_rng(self, day: int) -> random.Random:
        return random.Random(f"idlefleet-sim:{self.profile}:{self.seed}:day={day}")

    def _plan(self, day: int) -> _Plan:
        """Mode changes over one day; starts at hour 0 in the state the previous day ended in."""
        rng = self._day_rng(day)
        home = self._charger_kw
        weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        plan: _Plan = []
        if self.profile == "parked":
            return [(0.0, False, home)]
        if self.profile == "commuter":
            plan.append((0.0, False, home))
            if weekend:
                if rng.random() < 0.7:
                    at_h, drive_h = rng.uniform(9.5, 14.0), rng.uniform(0.3, 1.0)
                    _round_trip(plan, at_h, drive_h, rng.uniform(1.0, 4.0), home)
                return plan
            t = self._habit_depart_h + rng.uniform(-0.5, 0.5)
            c1 = self._habit_commute_h * rng.uniform(0.8, 1.4)
            plan.append((t, True, 0.0))
            work_kw = home if self._habit_work_charger else 0.0
            plan.append((t + c1, False, work_kw))
            t += c1 + self._habit_work_h + rng.uniform(-0.75, 0.75)
            c2 = self._habit_commute_h * rng.uniform(0.8, 1.5)
            plan.append((t, True, 0.0))
            plan.append((t + c2, False, home))
            if rng.random() < 0.4:
                t_errand = t + c2 + rng.uniform(1.0, 2.5)
                drive_h, stay_h = rng.uniform(0.15, 0.4), rng.uniform(0.5, 1.5)
                _round_trip(plan, t_errand, drive_h, stay_h, home)
            return plan
        if self.profile == "taxi":
            plan.append((0.0, False, home))  # at the depot, plugged
            t = self._habit_shift_h + rng.uniform(-0.5, 0.5)
            end = min(t + rng.uniform(14.0, 16.0), 22.5)
            breaks = [t + rng.uniform(4.0, 5.0), t + rng.uniform(9.5, 10.5)]
            while t < end:
                plan.append((t, True, 0.0))
                t += rng.uniform(0.3, 1.0)
                if t >= end:
                    break
                if breaks and t >= breaks[0]:
                    breaks.pop(0)
                    plan.append((t, False, self._p.fast_kw))
                    t += rng.uniform(0.5, 0.8)
                else:
                    plan.append((t, False, 0.0))
                    t += rng.uniform(5.0, 20.0) / 60.0
            plan.append((t, False, home))  # last short park runs into the night at the depot
            return _clip(plan)
        if self.profile == "phone":
            plan.append((0.0, False, home))  # on the nightstand charger
            t = rng.uniform(6.0, 8.0)
            bed = rng.uniform(22.0, 23.5)
            while t < bed:
                plan.append((t, True, 0.0))  # carried and used
                t += rng.uniform(1.0, 3.0)
                if t >= bed:
                    break
                plan.append((t, False, home if rng.random() < 0.3 else 0.0))  # idle on a desk
                t += rng.uniform(0.5, 2.0)
            plan.append((bed, False, home))
            return _clip(plan)
        # laptop: the night before's plug state carries over midnight
        plan.append((0.0, False, home if self._laptop_night_plugged(day - 1) else 0.0))
        night_kw = home if self._laptop_night_plugged(day) else 0.0
        if weekend:
            if rng.random() < 0.6:
                t = rng.uniform(10.0, 16.0)
                plan.append((t, True, 0.0))
                plan.append((t + rng.uniform(1.0, 3.0), False, night_kw))
            else:
                plan.append((rng.uniform(8.0, 12.0), False, night_kw))
            return plan
        t = rng.uniform(8.0, 9.0)
        plan.append((t, True, 0.0))  # in a bag / first meeting
        plan.append((t + rng.uniform(0.3, 0.8), False, home))  # desk, plugged
        t = rng.uniform(12.0, 13.0)
        plan.append((t, True, 0.0))
        plan.append((t + rng.uniform(0.5, 1.5), False, home))
        t = rng.uniform(17.0, 18.5)
        plan.append((t, True, 0.0))  # evening on the couch
        plan.append((t + rng.uniform(0.5, 2.0), False, night_kw))
        return plan

    def _laptop_night_plugged(self, day: int) -> bool:
        """Whether the laptop is left on its charger overnight after ``day`` (70% of nights)."""
        return random.Random(f"idlefleet-sim:laptop-night:{self.seed}:{day}").random() < 0.7


def _round_trip(plan: _Plan, at_h: float, drive_h: float, stay_h: float, home_kw: float) -> None:
    """Append an outing (drive, park unplugged, drive back, park at home) ending by 23:30."""
    if at_h + 2 * drive_h + stay_h > 23.5:
        return
    plan.append((at_h, True, 0.0))
    plan.append((at_h + drive_h, False, 0.0))
    plan.append((at_h + drive_h + stay_h, True, 0.0))
    plan.append((at_h + 2 * drive_h + stay_h, False, home_kw))


def _clip(plan: _Plan) -> _Plan:
    """Drop mode changes past the end of the day; the last state then runs into the night."""
    clipped = [entry for entry in plan if entry[0] < 23.9]
    if plan[-1][0] >= 23.9:
        clipped.append((23.9, *plan[-1][1:]))
    return clipped


def _default(value: float | None, default: float) -> float:
    return default if value is None else value

