"""Simulation scenarios: one frozen ``Scenario`` per run, read from a small TOML file.

A scenario file has top-level run settings and optional sections; anything omitted keeps the
default below. Unknown keys and wrong types are errors (``ScenarioError`` names the key), so a typo
never silently simulates something else. ``[policy]``, ``[publish]`` and ``[routing.costs]`` are
passed straight to the node's own ``Preferences``, ``PublishPolicy`` and ``RouteCosts`` (so they
accept exactly the fields those classes have). Built-in scenarios live in ``examples/sim/``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from idlefleet.protocols.errors import ConfigError, LocalProtocolError
from idlefleet.protocols.policy import Preferences
from idlefleet.protocols.publish import PublishPolicy
from idlefleet.protocols.routing import RouteCosts

__all__ = [
    "PROFILES",
    "SCENARIO_DIR",
    "DemandSpec",
    "EventSpec",
    "FleetSpec",
    "ModelSpec",
    "RoutingSpec",
    "Scenario",
    "ScenarioError",
    "builtin_scenarios",
    "load_scenario",
]

#: Car profiles (schedules in ``fleet.py``): four vehicle kinds, then phones and laptops.
PROFILES = ("commuter", "parked", "taxi", "van", "phone", "laptop")
#: Where the built-in scenarios live (the source checkout's ``examples/sim``).
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "examples" / "sim"

# Relative interactive demand per hour of day (peak 1.0): quiet nights, a lunch bump, evening peak.
_DAILY_CURVE = (0.15, 0.1, 0.08, 0.08, 0.1, 0.15, 0.3, 0.5, 0.65, 0.7, 0.72, 0.75,
                0.8, 0.75, 0.72, 0.72, 0.75, 0.8, 0.9, 0.95, 1.0, 0.9, 0.6, 0.3)  # fmt: skip


class ScenarioError(ConfigError):
    """A scenario file or option is invalid; the message names the key and what is wrong."""


@dataclass(frozen=True)
class FleetSpec:
    """Who the cars are. Fractions are of all devices unless said otherwise."""

    region_cars: int = 250  # mean devices per region (a GossipSub topic, a geohash-5 cell)
    region_spread: float = 0.5  # lognormal sigma of region populations (density differences)
    profiles: tuple[tuple[str, float], ...] = (
        ("commuter", 0.45), ("parked", 0.15), ("taxi", 0.05), ("van", 0.05),
        ("phone", 0.2), ("laptop", 0.1),
    )  # fmt: skip
    consent: float = 0.7  # owners who opted in (the others run no node)
    revoke_per_hour: float = 0.002  # chance per hour that a consenting owner revokes
    consent_hours: float = 0.0  # > 0: every grant expires after this many hours from the start
    announce_departure: float = 0.8  # departures the car knows in advance (calendar, habit)
    departure_error_s: float = 600.0  # std dev of an announced departure vs the real one
    metered: float = 0.1  # devices on a metered cellular link (the rest: home Wi-Fi)
    home_charger: float = 0.8  # vehicles with a charger where they park overnight
    work_charger: float = 0.25  # commuters who plug in at work
    on_battery: float = 0.1  # owners who allow serving unplugged (require_plugged_in = false)
    ambient_c: float = 15.0  # mean outdoor temperature
    ambient_spread_c: float = 8.0  # +- spread of per-car ambient (climate, garage vs street)


@dataclass(frozen=True)
class ModelSpec:
    """The model being served. Default: a 70B-class llama, int8 (80 blocks of ~850 MB)."""

    blocks: int = 80
    block_mb: float = 850.0
    block_gflop: float = 1.7  # per token per block (2 x parameters per block)
    # Memory for weights by device kind, MB (uniform in [lo, hi]).
    car_memory_mb: tuple[float, float] = (8_000.0, 16_000.0)
    laptop_memory_mb: tuple[float, float] = (2_000.0, 4_000.0)
    phone_memory_mb: tuple[float, float] = (900.0, 1_800.0)


@dataclass(frozen=True)
class DemandSpec:
    """Requests: a daily curve of interactive requests plus an overnight batch queue."""

    per_device_hour: float = 0.3  # interactive requests per device per hour at the curve's peak
    curve: tuple[float, ...] = _DAILY_CURVE
    prompt_tokens: int = 512
    new_tokens: int = 256
    slots: int = 8  # concurrent sessions a host serves (batched decode)
    batch_per_device: float = 0.5  # overnight batch requests queued per device (0 = none)
    batch_hour: float = 22.0  # hour of day the batch queue fills
    batch_new_tokens: int = 1024


@dataclass(frozen=True)
class RoutingSpec:
    """How routes are computed. ``sample_regions`` = N > 0: requests in N regions (evenly spread)
    go through ``find_route``, the other regions use the per-block capacity bound (see
    ``engine.py``); a fleet with at most N regions is routed everywhere. 0: every region.
    ``max_calls`` caps ``find_route`` calls per region and step."""

    sample_regions: int = 8
    max_calls: int = 64
    rtt_s: float = 0.02  # round trip between two cars in one cell
    costs: RouteCosts = field(default_factory=RouteCosts)


@dataclass(frozen=True)
class EventSpec:
    """Optional scenario events (times are hours since the simulation start).

    Rush: ``rush_fraction`` of the vehicles leave at uniform times within ``rush_within_h`` of
    ``rush_at_h`` and stay away ``rush_away_h`` (their other trips that day are dropped); departures
    are announced like any other (``FleetSpec.announce_departure``).
    Outage: ``outage_regions`` (fraction, the most populous first) lose ``outage_kind`` ("power":
    chargers off; "network": nodes unreachable) from ``outage_at_h`` for ``outage_h`` hours.
    """

    rush_at_h: float = 0.0
    rush_fraction: float = 0.0
    rush_within_h: float = 1.0
    rush_away_h: float = 9.0
    outage_at_h: float = 0.0
    outage_h: float = 0.0
    outage_regions: float = 0.0
    outage_kind: str = "network"


@dataclass(frozen=True)
class Scenario:
    """Everything one run needs. ``cars``, ``hours`` and ``seed`` may be overridden on the CLI."""

    name: str = "default"
    description: str = "a weekday in a mixed fleet"
    cars: int = 2_000
    hours: float = 24.0
    seed: int = 1
    start_hour: float = 0.0  # local time of day at the start (all cars share one time zone)
    step_s: float = 60.0
    rebalance_s: float = 600.0  # how often a region's hosts look for a better range (0 = never)
    rebalance_checks: int = 2  # hosts (distinct ranges) per region that ask should_move each time
    fleet: FleetSpec = FleetSpec()
    model: ModelSpec = ModelSpec()
    demand: DemandSpec = DemandSpec()
    routing: RoutingSpec = RoutingSpec()
    events: EventSpec = EventSpec()
    policy: Preferences = field(default_factory=Preferences)
    publish: PublishPolicy = field(default_factory=PublishPolicy)
    gossip_degree: int = 6  # GossipSub mesh degree D (p2p/config.py default)
    pubsub_overhead_bytes: int = 180  # RPC framing, from, seqno, topic, signature, key per message
    record_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        _check("cars", self.cars, 1, 10_000_000)
        _check("hours", self.hours, 1 / 60, 24 * 14)
        _check("seed", self.seed, 0, 2**32 - 1)
        _check("start_hour", self.start_hour, 0.0, 24.0)
        _check("step_s", self.step_s, 1.0, 3600.0)
        _check("rebalance_s", self.rebalance_s, 0.0, 86_400.0)
        _check("rebalance_checks", self.rebalance_checks, 1, 1_000_000)
        _check("gossip_degree", self.gossip_degree, 1, 100)
        _check("pubsub_overhead_bytes", self.pubsub_overhead_bytes, 0, 100_000)
        _check("record_ttl_s", self.record_ttl_s, 1.0, 600.0)
        f = self.fleet
        _check("fleet.region_cars", f.region_cars, 1, 10_000_000)
        _check("fleet.region_spread", f.region_spread, 0.0, 3.0)
        for name in ("consent", "announce_departure", "metered", "home_charger", "work_charger",
                     "on_battery", "revoke_per_hour"):
            _check(f"fleet.{name}", getattr(f, name), 0.0, 1.0)
        _check("fleet.consent_hours", f.consent_hours, 0.0, 24 * 365)
        _check("fleet.departure_error_s", f.departure_error_s, 0.0, 86_400.0)
        _check("fleet.ambient_c", f.ambient_c, -50.0, 60.0)
        _check("fleet.ambient_spread_c", f.ambient_spread_c, 0.0, 40.0)
        names = [p for p, _ in f.profiles]
        if not f.profiles or any(p not in PROFILES for p in names) or len(set(names)) != len(names):
            raise ScenarioError(f"fleet.profiles: keys must be distinct, from {', '.join(PROFILES)}")
        for p, w in f.profiles:
            _check(f"fleet.profiles.{p}", w, 0.0, 1e9)
        if sum(w for _, w in f.profiles) <= 0:
            raise ScenarioError("fleet.profiles: weights must not all be 0")
        m = self.model
        _check("model.blocks", m.blocks, 1, 10_000)
        _check("model.block_mb", m.block_mb, 0.001, 1e6)
        _check("model.block_gflop", m.block_gflop, 1e-6, 1e6)
        for name in ("car_memory_mb", "laptop_memory_mb", "phone_memory_mb"):
            lo, hi = getattr(m, name)
            if not (0 <= lo <= hi <= 1e7):
                raise ScenarioError(f"model.{name}: need 0 <= lo <= hi, got [{lo}, {hi}]")
        d = self.demand
        _check("demand.per_device_hour", d.per_device_hour, 0.0, 1e4)
        if len(d.curve) != 24 or not all(_finite(c) and c >= 0 for c in d.curve):
            raise ScenarioError("demand.curve: need 24 non-negative numbers, one per hour of day")
        _check("demand.prompt_tokens", d.prompt_tokens, 0, 1_000_000)
        _check("demand.new_tokens", d.new_tokens, 1, 1_000_000)
        _check("demand.batch_new_tokens", d.batch_new_tokens, 1, 1_000_000)
        _check("demand.slots", d.slots, 1, 10_000)
        _check("demand.batch_per_device", d.batch_per_device, 0.0, 1e4)
        _check("demand.batch_hour", d.batch_hour, 0.0, 24.0)
        r = self.routing
        _check("routing.sample_regions", r.sample_regions, 0, 10_000_000)
        _check("routing.max_calls", r.max_calls, 1, 1_000_000)
        _check("routing.rtt_s", r.rtt_s, 0.0, 10.0)
        e = self.events
        _check("events.rush_fraction", e.rush_fraction, 0.0, 1.0)
        _check("events.outage_regions", e.outage_regions, 0.0, 1.0)
        for name in ("rush_at_h", "rush_within_h", "rush_away_h", "outage_at_h", "outage_h"):
            _check(f"events.{name}", getattr(e, name), 0.0, 24 * 14)
        if e.outage_kind not in ("power", "network"):
            raise ScenarioError(f"events.outage_kind must be power or network, got {e.outage_kind!r}")

    @property
    def regions(self) -> int:
        return max(1, round(self.cars / self.fleet.region_cars))

    def with_overrides(self, *, cars: int | None = None, hours: float | None = None,
                       seed: int | None = None) -> Scenario:
        """This scenario with the CLI's ``--cars/--hours/--seed`` applied (None keeps the value)."""
        changes: dict[str, Any] = {}
        if cars is not None:
            changes["cars"] = cars
        if hours is not None:
            changes["hours"] = hours
        if seed is not None:
            changes["seed"] = seed
        return replace(self, **changes)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, value: object, lo: float, hi: float) -> None:
    if not _finite(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise ScenarioError(f"{name}={value!r} is outside {lo:g}..{hi:g}")


def _convert(where: str, default: object, value: object) -> object:
    """``value`` from TOML, checked against the type of the field's ``default``."""
    if isinstance(default, bool):
        if type(value) is not bool:
            raise ScenarioError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if type(value) is not int:
            raise ScenarioError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not _finite(value):
            raise ScenarioError(f"{where} must be a number, got {value!r}")
        return float(value)  # type: ignore[arg-type]
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ScenarioError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple) and default and isinstance(default[0], tuple):  # profiles table
        if not isinstance(value, dict):
            raise ScenarioError(f"{where} must be a table of name = weight")
        return tuple((str(k), _convert(f"{where}.{k}", 1.0, v)) for k, v in value.items())
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(_finite(v) for v in value):
            raise ScenarioError(f"{where} must be an array of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    raise ScenarioError(f"{where}: unsupported setting")  # pragma: no cover - every field handled


def _section(cls: Any, data: object, where: str, base: Any) -> Any:
    if not isinstance(data, dict):
        raise ScenarioError(f"[{where}] must be a table")
    known = {f.name: getattr(base, f.name) for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ScenarioError(f"[{where}] unknown key(s): {', '.join(unknown)}")
    return replace(base, **{k: _convert(f"{where}.{k}", known[k], v) for k, v in data.items()})


def _foreign(cls: Any, data: object, where: str, base: Any) -> Any:
    """A node-side settings class (Preferences, PublishPolicy, RouteCosts) from a TOML table."""
    if not isinstance(data, dict):
        raise ScenarioError(f"[{where}] must be a table")
    try:
        if cls is Preferences:
            return Preferences.from_mapping({**{f.name: getattr(base, f.name) for f in fields(cls)},
                                             **data})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ScenarioError(f"[{where}] unknown key(s): {', '.join(unknown)}")
        return replace(base, **data)
    except (ValueError, TypeError, LocalProtocolError) as e:
        raise ScenarioError(f"[{where}] {e}") from None


_SECTIONS: dict[str, Any] = {"fleet": FleetSpec, "model": ModelSpec, "demand": DemandSpec,
                             "events": EventSpec}


def scenario_from_mapping(data: Mapping[str, Any], *, where: str = "scenario") -> Scenario:
    """Build a ``Scenario`` from parsed TOML. Raises ``ScenarioError`` naming the bad key."""
    base = Scenario()
    changes: dict[str, Any] = {}
    top = {f.name: getattr(base, f.name) for f in fields(Scenario)
           if f.name not in ("policy", "publish", "routing", *_SECTIONS)}
    for key, value in data.items():
        if key in _SECTIONS:
            changes[key] = _section(_SECTIONS[key], value, key, getattr(base, key))
        elif key == "policy":
            changes[key] = _foreign(Preferences, value, key, base.policy)
        elif key == "publish":
            changes[key] = _foreign(PublishPolicy, value, key, base.publish)
        elif key == "routing":
            if not isinstance(value, dict):
                raise ScenarioError("[routing] must be a table")
            value = dict(value)
            costs = value.pop("costs", None)
            routing = _section(RoutingSpec, value, "routing", base.routing)
            if costs is not None:
                costs = _foreign(RouteCosts, costs, "routing.costs", base.routing.costs)
                routing = replace(routing, costs=costs)
            changes[key] = routing
        elif key in top:
            changes[key] = _convert(key, top[key], value)
        else:
            raise ScenarioError(f"{where}: unknown key {key!r}")
    try:
        return replace(base, **changes)
    except ScenarioError as e:
        raise ScenarioError(f"{where}: {e}") from None


def builtin_scenarios() -> dict[str, Path]:
    """Built-in scenario names (file stems in ``examples/sim``) and their files."""
    if not SCENARIO_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.toml"))}


def load_scenario(name_or_file: str | None) -> Scenario:
    """A built-in scenario by name, a TOML file by path, or the default scenario for None.

    Raises ``ScenarioError`` for an unknown name, an unreadable file or invalid contents.
    """
    if name_or_file is None:
        return Scenario()
    path = Path(name_or_file)
    builtins = builtin_scenarios()
    if not path.suffix and name_or_file in builtins:
        path = builtins[name_or_file]
    elif not path.is_file():
        names = ", ".join(builtins) or f"none found in {SCENARIO_DIR}"
        raise ScenarioError(f"no scenario {name_or_file!r}: not a file, and not a built-in ({names})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"cannot read scenario {str(path)!r}: {e}") from None
    scenario = scenario_from_mapping(data, where=str(path))
    if "name" not in data:
        scenario = replace(scenario, name=path.stem)
    return scenario
