"""Vehicle state from the outside world: a JSON file written by the car's own daemon
(``JsonFileVehicle``, spec ``file:/run/car/state.json``) and Linux ``/sys/class/power_supply`` and
thermal zones (``SysfsVehicle``, spec ``sysfs`` or ``sysfs:/custom/root``), so a laptop or phone is a
real node today.

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

from idlefleet.node.vehicle.state import (
    MAX_CHARGING_KW,
    MAX_HEADROOM_C,
    MIN_HEADROOM_C,
    VehicleState,
    VehicleStateError,
    check_positive,
)

__all__ = ["JsonFileVehicle", "SysfsVehicle"]


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
        self.stale_after = check_positive("stale_after", stale_after)
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

