"""Vehicle state providers: where a node learns its battery, plug, thermal and parking state.

A provider is synchronous and deterministic: ``read(now)`` returns a ``VehicleState`` for the unix
time ``now`` the caller passes (the node polls every few seconds and gossips the result; policy
decisions such as consent and battery limits are made elsewhere). Providers:

- ``SimulatedVehicle``: a seeded park/drive schedule per profile (commuter, taxi, parked, phone,
  laptop) with battery and thermal integration; ``time_scale`` speeds its clock up for demos.
- ``JsonFileVehicle``: a JSON file written by the car's own daemon (format below).
- ``SysfsVehicle``: Linux ``/sys/class/power_supply`` and thermal zones, so a laptop or phone is
  a real node today.

``make_provider(spec, now=...)`` builds one from a spec string such as ``sim:commuter:seed=3``,
``sim:taxi:seed=7:scale=60``, ``file:/run/car/state.json``, ``sysfs`` or ``sysfs:/custom/root``.

JSON file format (see ``examples/vehicle_state.json``): one object with exactly these fields
(unknown extra keys are ignored, so daemons may add their own)::

    battery_soc         number, 0..1         state of charge
    plugged_in          true/false           connected to a charger (even if full)
    charging_kw         number, 0..350       power flowing into the battery now
    thermal_headroom_c  number, -100..200    degrees C below the throttle point (negative = over)
    parked              true/false
    parked_since        number or null       unix seconds; must be null when parked is false
    expected_departure  number or null       unix seconds, if known

Write it atomically (a temporary file, then ``rename``); a half-written file is tolerated anyway:
the provider keeps the last good state and reports why in ``last_error``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from idlefleet.protocols.errors import IdlefleetError

__all__ = [
    "PROFILES",
    "JsonFileVehicle",
    "SimulatedVehicle",
    "SysfsVehicle",
    "VehicleProvider",
    "VehicleState",
    "VehicleStateError",
    "make_provider",
]

DAY_S = 86_400.0
HOUR_S = 3_600.0
# The bounds a capacity record accepts (protocols/records.py): a state outside them is a unit error.
MAX_CHARGING_KW = 350.0
MIN_HEADROOM_C, MAX_HEADROOM_C = -100.0, 200.0
MAX_TIMESTAMP = 1e10


class VehicleStateError(IdlefleetError):
    """No vehicle state could ever be read from this provider; the message says why."""


@dataclass(frozen=True)
class VehicleState:
    """One measurement of a vehicle (or phone/laptop). Validates itself; raises ValueError."""

    battery_soc: float  # 0..1
    plugged_in: bool
    charging_kw: float  # >= 0, power flowing into the battery
    thermal_headroom_c: float  # degrees C below the throttle point (negative = over)
    parked: bool
    parked_since: float | None  # unix seconds, None while driving
    expected_departure: float | None  # unix seconds, if known

    def __post_init__(self) -> None:
        for name in ("plugged_in", "parked"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")
        _check_number("battery_soc", self.battery_soc, 0.0, 1.0)
        _check_number("charging_kw", self.charging_kw, 0.0, MAX_CHARGING_KW)
        _check_number("thermal_headroom_c", self.thermal_headroom_c, MIN_HEADROOM_C, MAX_HEADROOM_C)
        for name in ("parked_since", "expected_departure"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, 0.0, MAX_TIMESTAMP)
        if not self.parked and self.parked_since is not None:
            raise ValueError("parked_since must be null while not parked")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> VehicleState:
        """Build from a decoded JSON object (the daemon file format); raises ValueError."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"missing field {f.name!r}")
            value = data[f.name]
            if f.name in ("plugged_in", "parked"):
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
            elif value is None and f.name in ("parked_since", "expected_departure"):
                pass
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            else:
                value = float(value)
            values[f.name] = value
        return cls(**values)


def _check_number(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is outside {lo}..{hi}")


class VehicleProvider(Protocol):
    """Anything the node can poll for vehicle state."""

    name: str

    def read(self, now: float) -> VehicleState:
        """State at unix time ``now``; raises VehicleStateError only if none was ever readable."""
        ...


# --------------------------------------------------------------------------------------------------
# Simulated vehicle


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
        self._battery_kwh = _positive("battery_kwh", _default(battery_kwh, p.battery_kwh))
        self._charger_kw = _positive("charger_kw", _default(charger_kw, p.charger_kw))
        self._drive_kw = p.drive_kw * rng.uniform(0.85, 1.15)
        mean_ambient = rng.uniform(p.ambient_lo_c, p.ambient_hi_c)
        self._ambient_c = mean_ambient if ambient_c is None else ambient_c
        soc = rng.uniform(0.35, 0.9) if initial_soc is None else initial_soc
        _check_number("initial_soc", soc, 0.0, 1.0)
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
        headroom = self._p.limit_c - temp
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
        if leg.driving:
            net_kw = -self._drive_kw
        elif leg.plug_kw > 0:
            net_kw = p_in  # the charger also covers standby draw
        else:
            net_kw = -self._p.standby_kw
        new_soc = min(1.0, max(0.0, soc + net_kw * dt / HOUR_S / self._battery_kwh))
        target = self._target_temp(t + dt / 2, leg, p_in)
        new_temp = target + (temp - target) * math.exp(-dt / self._p.tau_s)
        return new_soc, new_temp

    def _charge_power(self, leg: _Leg, soc: float) -> float:
        """Power into the battery: full below 80%, linear taper (5% floor) above, 0 when full."""
        if leg.driving or leg.plug_kw <= 0 or soc >= 1.0:
            return 0.0
        return leg.plug_kw * min(1.0, max(0.05, (1.0 - soc) / 0.2))

    def _target_temp(self, t: float, leg: _Leg, p_in: float) -> float:
        p = self._p
        hour = (t % DAY_S) / HOUR_S
        ambient = self._ambient_c + p.diurnal_c * math.sin(2 * math.pi * (hour - 9.0) / 24.0)
        target = ambient + p.idle_rise_c
        if leg.driving:
            target += p.drive_rise_c
        elif leg.plug_kw <= 0:
            target += p.solar_c * max(0.0, math.sin(math.pi * (hour - 6.0) / 12.0))
        return target + p.charge_rise_c * min(1.0, p_in / p.charge_ref_kw)

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


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# JSON file written by the car's daemon


class JsonFileVehicle:
    """State from a JSON file the car's own daemon writes (format in the module docstring).

    The file is re-read only when its mtime, size or inode changes. A missing, unreadable, garbage,
    half-written or out-of-range file keeps the last good state and sets ``last_error`` (cleared by
    the next good read); ``read`` raises VehicleStateError only while no good state was ever read.
    ``stale`` is True when, at the last ``read(now)``, the reported state came from a file version
    whose mtime is more than ``stale_after`` seconds old (or there is none).
    """

    MAX_BYTES = 64 * 1024

    def __init__(self, path: str | os.PathLike[str], *, stale_after: float = 120.0) -> None:
        self.path = os.fspath(path)
        self.name = f"file:{self.path}"
        self.stale_after = _positive("stale_after", stale_after)
        self.last_error: str | None = None
        self._state: VehicleState | None = None
        self._signature: tuple[int, int, int] | None = None
        self._changed_at = -math.inf  # mtime of the file version _state came from
        self._now = -math.inf

    @property
    def stale(self) -> bool:
        """True if the last good file version was older than ``stale_after`` at the last read."""
        return self._state is None or self._now - self._changed_at > self.stale_after

    @property
    def changed_at(self) -> float | None:
        """Mtime (unix seconds) of the file version the current state came from."""
        return None if self._state is None else self._changed_at

    def read(self, now: float) -> VehicleState:
        """Latest good state; raises VehicleStateError if the file never held a valid state."""
        self._now = now
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                signature = (st.st_mtime_ns, st.st_size, st.st_ino)
                if signature != self._signature:
                    self._signature = signature
                    self._load(f.read(self.MAX_BYTES + 1), st.st_mtime)
        except OSError as exc:
            self._signature = None  # re-read once it is back, even if unchanged
            self.last_error = f"cannot read {self.path}: {exc.strerror or exc}"
        if self._state is None:
            raise VehicleStateError(f"{self.name}: no valid state yet ({self.last_error})")
        return self._state

    def _load(self, raw: bytes, mtime: float) -> None:
        try:
            if len(raw) > self.MAX_BYTES:
                raise ValueError(f"file is larger than {self.MAX_BYTES} bytes")
            try:
                data = json.loads(raw, parse_constant=_reject_constant)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"not valid JSON (half-written?): {exc}") from None
            if not isinstance(data, dict):
                raise ValueError("top level must be a JSON object")
            state = VehicleState.from_mapping(data)
        except ValueError as exc:
            self.last_error = f"{self.path}: {exc}"
            return
        self._state = state
        self._changed_at = mtime
        self.last_error = None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number")


# --------------------------------------------------------------------------------------------------
# Linux sysfs (laptops, phones, desktops)


class SysfsVehicle:
    """State of the machine itself from Linux sysfs under ``root`` (``/`` on a real machine).

    Batteries (``/sys/class/power_supply/*`` with type Battery; device-scope batteries such as a
    mouse's are skipped): ``capacity`` in % (or ``energy_now/full``, ``charge_now/full``),
    ``status``, ``power_now`` in µW (or ``current_now`` µA x ``voltage_now`` µV); several batteries
    are averaged, weighted by ``energy_full`` when known. Mains/USB/Wireless supplies: ``online``.
    No battery (a desktop) means battery_soc 1.0 and plugged in. Thermal zones
    (``/sys/class/thermal/thermal_zone*/temp`` in m°C): the limit is the lowest passive, hot or
    critical trip point (``DEFAULT_LIMIT_C`` without one); headroom is the minimum over zones of
    limit - temp, or ``NO_ZONE_HEADROOM_C`` without any readable zone. An idle machine counts as
    parked: parked=True, parked_since = ``start`` (default: the first read), no expected departure.

    Unreadable fields are skipped and named in ``last_error``. Raises VehicleStateError only if
    ``root`` has no sysfs power_supply or thermal class and no state was read before.
    """

    DEFAULT_LIMIT_C = 90.0
    NO_ZONE_HEADROOM_C = 30.0  # no sensor at all: assume a warm machine, not an unlimited one
    _ADAPTER_TYPES = ("Mains", "USB", "Wireless", "BrickID")

    def __init__(self, root: str | os.PathLike[str] = "/", *, start: float | None = None) -> None:
        """Raises ValueError if ``root`` (other than ``/``) has no sysfs power_supply or thermal class."""
        self.root = os.fspath(root)
        if self.root != "/" and not any(
            os.path.isdir(os.path.join(self.root, "sys", "class", c)) for c in ("power_supply", "thermal")
        ):
            raise ValueError(f"sysfs root {self.root!r} has no sys/class/power_supply or sys/class/thermal")
        self.name = "sysfs" if self.root == "/" else f"sysfs:{self.root}"
        self.start = start
        self.last_error: str | None = None
        self.stale = False
        self._state: VehicleState | None = None

    def read(self, now: float) -> VehicleState:
        """Current state; raises VehicleStateError if nothing was ever readable under ``root``."""
        if self.start is None:
            self.start = now
        supplies = os.path.join(self.root, "sys", "class", "power_supply")
        thermal = os.path.join(self.root, "sys", "class", "thermal")
        if not (os.path.isdir(supplies) or os.path.isdir(thermal)):
            self.last_error = f"no sysfs power_supply or thermal class under {self.root!r}"
            if self._state is None:
                raise VehicleStateError(f"{self.name}: {self.last_error}")
            return self._state
        problems: list[str] = []
        soc, plugged, charging_kw = self._read_power(supplies, problems)
        headroom = self._read_thermal(thermal, problems)
        self.last_error = "; ".join(problems) or None
        self._state = VehicleState(
            battery_soc=soc,
            plugged_in=plugged,
            charging_kw=charging_kw,
            thermal_headroom_c=max(MIN_HEADROOM_C, min(MAX_HEADROOM_C, headroom)),
            parked=True,
            parked_since=self.start,
            expected_departure=None,
        )
        return self._state

    def _read_power(self, supplies: str, problems: list[str]) -> tuple[float, bool, float]:
        socs: list[tuple[float, float | None]] = []  # (soc, energy_full or None)
        statuses: list[str] = []
        charging_kw = 0.0
        adapters: list[bool] = []
        for entry in sorted(glob.glob(os.path.join(glob.escape(supplies), "*"))):
            name = os.path.basename(entry)
            kind = _read_text(os.path.join(entry, "type"))
            if kind == "Battery":
                if _read_text(os.path.join(entry, "scope")) == "Device":
                    continue  # a peripheral's battery (mouse, headset), not ours
                if _read_int(os.path.join(entry, "present")) == 0:
                    continue
                soc = _battery_soc(entry)
                if soc is None:
                    problems.append(f"{name}: no readable capacity")
                    continue
                socs.append((soc, _read_int(os.path.join(entry, "energy_full"))))
                status = _read_text(os.path.join(entry, "status")) or "Unknown"
                statuses.append(status)
                if status == "Charging":
                    kw = _battery_power_kw(entry)
                    if kw is None:
                        problems.append(f"{name}: charging but power unreadable")
                    else:
                        charging_kw += kw
            elif kind is not None and kind.startswith(self._ADAPTER_TYPES):
                online = _read_int(os.path.join(entry, "online"))
                if online is None:
                    problems.append(f"{name}: online unreadable")
                else:
                    adapters.append(online > 0)
        if not socs:
            return 1.0, True, 0.0  # no battery: a desktop on mains
        weights = [full for _, full in socs]
        if all(w is not None and w > 0 for w in weights):
            total = sum(w for w in weights if w is not None)
            soc = sum(s * (w or 0) for s, w in socs) / total
        else:
            soc = sum(s for s, _ in socs) / len(socs)
        if adapters:
            plugged = any(adapters) or "Charging" in statuses
        else:  # no adapter reported (some phones): infer from the battery
            plugged = any(s in ("Charging", "Full", "Not charging") for s in statuses)
        return min(1.0, max(0.0, soc)), plugged, min(charging_kw, MAX_CHARGING_KW)

    def _read_thermal(self, thermal: str, problems: list[str]) -> float:
        headrooms: list[float] = []
        for zone in sorted(glob.glob(os.path.join(glob.escape(thermal), "thermal_zone*"))):
            milli = _read_int(os.path.join(zone, "temp"))
            if milli is None or not -50_000 <= milli <= 200_000:
                problems.append(f"{os.path.basename(zone)}: no plausible temp")
                continue
            limits: list[float] = []
            for type_path in glob.glob(os.path.join(glob.escape(zone), "trip_point_*_type")):
                if _read_text(type_path) in ("passive", "hot", "critical"):
                    trip = _read_int(type_path[: -len("type")] + "temp")
                    if trip is not None and trip > 0:  # 0 or negative: trip disabled
                        limits.append(trip / 1000.0)
            limit = min(limits) if limits else self.DEFAULT_LIMIT_C
            headrooms.append(limit - milli / 1000.0)
        return min(headrooms) if headrooms else self.NO_ZONE_HEADROOM_C


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _battery_soc(entry: str) -> float | None:
    capacity = _read_int(os.path.join(entry, "capacity"))
    if capacity is not None:
        return min(100, max(0, capacity)) / 100.0
    for now_name, full_name in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
        now = _read_int(os.path.join(entry, now_name))
        full = _read_int(os.path.join(entry, full_name))
        if now is not None and full:
            return min(1.0, max(0.0, now / full))
    return None


def _battery_power_kw(entry: str) -> float | None:
    power = _read_int(os.path.join(entry, "power_now"))  # µW; some drivers sign it
    if power is not None:
        return abs(power) / 1e9
    current = _read_int(os.path.join(entry, "current_now"))  # µA
    voltage = _read_int(os.path.join(entry, "voltage_now"))  # µV
    if current is not None and voltage is not None:
        return abs(current) * abs(voltage) / 1e15
    return None


# --------------------------------------------------------------------------------------------------
# Specs

_SPEC_HELP = (
    "expected sim:PROFILE[:seed=N][:scale=X][:battery_kwh=K], file:PATH, sysfs or sysfs:ROOT"
)


def make_provider(spec: str, *, now: float) -> VehicleProvider:
    """Build a provider from a spec string; ``now`` is the simulation / provider start time.

    ``sim:commuter:seed=3``, ``sim:taxi:seed=7:scale=60`` (scale = time_scale, seed defaults to 0),
    ``file:/path/state.json``, ``sysfs``, ``sysfs:/custom/root``. Raises ValueError on a bad spec.
    """
    kind, _, rest = spec.partition(":")
    if kind == "sim":
        profile, *options = rest.split(":") if rest else [""]
        if profile not in PROFILES:
            raise ValueError(
                f"bad vehicle spec {spec!r}: unknown profile {profile!r} "
                f"(profiles: {', '.join(PROFILES)})"
            )
        seed = 0
        kwargs: dict[str, float] = {}
        for option in options:
            key, eq, value = option.partition("=")
            try:
                if not eq:
                    raise ValueError("not key=value")
                if key == "seed":
                    seed = int(value)
                elif key == "scale":
                    kwargs["time_scale"] = float(value)
                elif key == "battery_kwh":
                    kwargs["battery_kwh"] = float(value)
                else:
                    raise ValueError("unknown option; use seed, scale or battery_kwh")
            except ValueError as exc:
                raise ValueError(f"bad vehicle spec {spec!r}: option {option!r}: {exc}") from None
        try:
            return SimulatedVehicle(seed, profile, now, **kwargs)
        except ValueError as exc:
            raise ValueError(f"bad vehicle spec {spec!r}: {exc}") from None
    if kind == "file":
        if not rest:
            raise ValueError(f"bad vehicle spec {spec!r}: file needs a path ({_SPEC_HELP})")
        return JsonFileVehicle(rest)
    if kind == "sysfs":
        return SysfsVehicle(rest or "/", start=now)
    raise ValueError(f"bad vehicle spec {spec!r}: {_SPEC_HELP}")
