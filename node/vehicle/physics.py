"""Battery, charger and thermal physics of a parked or driving vehicle, written once.

Pure functions used by the scalar trip simulator (``simulated.SimulatedVehicle``: one vehicle,
Python floats) and by the fleet simulator (``node/sim``: a million vehicles, numpy arrays). Every
function takes floats or arrays that broadcast together; all-scalar arguments give a Python
``float`` (or ``bool``) back, computed with ``math`` (so one vehicle costs no numpy call), arrays
give an array computed with numpy. The two paths run the same operations in the same order; they
differ only where ``math.exp`` and ``numpy.exp`` round differently (at most one unit in the last
place; ``tests/test_vehicle.py`` checks them against each other on a grid).

Units: state of charge 0..1, power in kW (positive into the battery), energy in kWh, time in
seconds, temperatures in degrees C.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "DAY_S",
    "HOUR_S",
    "TAPER_FLOOR",
    "TAPER_SOC",
    "battery_kw",
    "charge_kw",
    "diurnal",
    "headroom_c",
    "plug_kw",
    "relax_c",
    "soc_after",
    "sun",
    "target_temp_c",
]

DAY_S = 86_400.0
HOUR_S = 3_600.0
#: Charging runs at full power below ``1 - TAPER_SOC`` state of charge, then tapers linearly...
TAPER_SOC = 0.2
#: ... to this fraction of the charger's power just before full (0 once full).
TAPER_FLOOR = 0.05

Num = Any  # float or np.ndarray (numpy's own annotations do not express "a float gives a float")


def _scalar(*values: object) -> bool:
    return not any(isinstance(v, np.ndarray) for v in values)


def _where(cond: Num, a: Num, b: Num) -> Num:
    if _scalar(cond, a, b):
        return a if cond else b
    return np.where(cond, a, b)


def _minimum(a: Num, b: Num) -> Num:
    return min(a, b) if _scalar(a, b) else np.minimum(a, b)


def _maximum(a: Num, b: Num) -> Num:
    return max(a, b) if _scalar(a, b) else np.maximum(a, b)


def _clip(x: Num, lo: float, hi: float) -> Num:
    return min(hi, max(lo, x)) if _scalar(x) else np.clip(x, lo, hi)


def _sin(x: Num) -> Num:
    return math.sin(x) if _scalar(x) else np.sin(x)


def _exp(x: Num) -> Num:
    return math.exp(x) if _scalar(x) else np.exp(x)


def plug_kw(parked: Num, charger_kw: Num, power_out: Num = False) -> Num:
    """Power the charger offers: ``charger_kw`` while parked at it (0 = none) and the grid is up."""
    if _scalar(parked, power_out):
        return charger_kw if parked and not power_out else 0.0
    return np.where(np.logical_and(parked, np.logical_not(power_out)), charger_kw, 0.0)


def charge_kw(plug: Num, soc: Num) -> Num:
    """Power into the battery from a charger offering ``plug`` kW at state of charge ``soc``:
    all of it below ``1 - TAPER_SOC``, then a linear taper (``TAPER_FLOOR`` floor), 0 when full."""
    taper = _clip((1.0 - soc) / TAPER_SOC, TAPER_FLOOR, 1.0)
    return _where(soc >= 1.0, 0.0, plug * taper)


def battery_kw(parked: Num, plug: Num, charge: Num, drive_kw: Num, standby_kw: Num,
               draw_kw: Num = 0.0) -> Num:
    """Net power into the battery (negative: out of it). Driving draws ``drive_kw``. Parked at a
    charger (``plug`` > 0), the charger feeds the compute's ``draw_kw`` first and the battery gets
    the rest, up to its taper (``charge``); unplugged, the battery feeds standby and the compute."""
    parked_kw = _where(plug > 0, _minimum(charge, plug - draw_kw), -standby_kw - draw_kw)
    return _where(parked, parked_kw, -drive_kw)


def soc_after(soc: Num, kw: Num, dt: Num, battery_kwh: Num) -> Num:
    """State of charge after ``dt`` seconds at ``kw`` into a ``battery_kwh`` battery (0..1)."""
    return _clip(soc + kw * dt / HOUR_S / battery_kwh, 0.0, 1.0)


def diurnal(t: Num) -> Num:
    """The day/night ambient swing at time ``t`` (seconds from a UTC midnight): -1..1, warmest at
    15:00."""
    hour = (t % DAY_S) / HOUR_S
    return _sin(2 * math.pi * (hour - 9.0) / 24.0)


def sun(t: Num) -> Num:
    """Sunshine at time ``t`` (seconds from a UTC midnight): 0 at night, rising from 06:00 to 1 at
    noon, 0 again from 18:00."""
    hour = (t % DAY_S) / HOUR_S
    return _maximum(0.0, _sin(math.pi * (hour - 6.0) / 12.0))


def target_temp_c(t: Num, *, ambient_c: Num, diurnal_c: Num, idle_rise_c: Num, driving: Num,
                  drive_rise_c: Num, unplugged: Num, solar_c: Num, charge: Num, charge_rise_c: Num,
                  charge_ref_kw: Num, serve_rise_c: Num = 0.0, util: Num = 0.0) -> Num:
    """The temperature the compute unit relaxes towards at time ``t`` (seconds from a UTC midnight):
    the ambient (mean ``ambient_c``, swinging by ``diurnal_c``) plus ``idle_rise_c``, plus
    ``drive_rise_c`` while driving, or ``solar_c`` of sun while parked ``unplugged`` (outside, on the
    roof), plus ``charge_rise_c`` at ``charge_ref_kw`` of charging (linear, capped), plus
    ``serve_rise_c`` at full compute load (``util`` 0..1)."""
    target = ambient_c + diurnal_c * diurnal(t) + idle_rise_c
    parked_rise = _where(unplugged, solar_c * sun(t), 0.0)
    target = target + _where(driving, drive_rise_c, parked_rise)
    target = target + charge_rise_c * _minimum(1.0, charge / charge_ref_kw)
    return target + serve_rise_c * util


def relax_c(temp: Num, target: Num, dt: Num, tau_s: Num) -> Num:
    """Temperature after ``dt`` seconds of first-order relaxation (time constant ``tau_s``)."""
    return target + (temp - target) * _exp(-dt / tau_s)


def headroom_c(limit_c: Num, temp: Num) -> Num:
    """Degrees below the throttle point ``limit_c`` (negative: over it)."""
    return limit_c - temp
