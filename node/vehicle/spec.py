"""``make_provider``: a vehicle state provider from a spec string (``--vehicle``)."""

from __future__ import annotations

from idlefleet.node.vehicle.simulated import PROFILES, SimulatedVehicle
from idlefleet.node.vehicle.sources import JsonFileVehicle, SysfsVehicle
from idlefleet.node.vehicle.state import VehicleProvider

__all__ = ["make_provider"]

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
