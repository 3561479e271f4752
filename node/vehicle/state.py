"""Vehicle state: what a node learns of its battery, plug, thermal and parking state.

A provider is synchronous and deterministic: ``read(now)`` returns a ``VehicleState`` for the unix
time ``now`` the caller passes (the node polls every few seconds and gossips the result; policy
decisions such as consent and battery limits are made elsewhere). The providers live in
``simulated`` (``SimulatedVehicle``, a seeded trip simulator) and ``sources`` (``JsonFileVehicle``,
a file written by the car's own daemon; ``SysfsVehicle``, Linux ``/sys``); ``spec.make_provider``
builds one from a spec string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from idlefleet.protocols.errors import IdlefleetError

__all__ = [
    "MAX_CHARGING_KW",
    "MAX_HEADROOM_C",
    "MAX_TIMESTAMP",
    "MIN_HEADROOM_C",
    "VehicleProvider",
    "VehicleState",
    "VehicleStateError",
    "check_number",
    "check_positive",
]

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
        check_number("battery_soc", self.battery_soc, 0.0, 1.0)
        check_number("charging_kw", self.charging_kw, 0.0, MAX_CHARGING_KW)
        check_number("thermal_headroom_c", self.thermal_headroom_c, MIN_HEADROOM_C, MAX_HEADROOM_C)
        for name in ("parked_since", "expected_departure"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, 0.0, MAX_TIMESTAMP)
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


def check_number(name: str, value: object, lo: float, hi: float) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a finite number in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is outside {lo}..{hi}")


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; raises ValueError naming ``name`` unless it is finite and > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


class VehicleProvider(Protocol):
    """Anything the node can poll for vehicle state."""

    name: str

    def read(self, now: float) -> VehicleState:
        """State at unix time ``now``; raises VehicleStateError only if none was ever readable."""
        ...

