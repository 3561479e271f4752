"""Node configuration: one frozen object, from a TOML file and/or command-line flags.

Example ``node.toml``::

    key_file = "~/.idlefleet/node.key"
    listen_host = "127.0.0.1"
    port = 4001
    bootstrap = ["/ip4/127.0.0.1/tcp/4000/p2p/12D3KooW..."]
    region = "u33d"            # geohash prefix of where the car is parked
    vehicle = "sim:commuter:seed=3"   # or "file:/run/car/state.json", or "sysfs"
    consent = true             # the owner opts in to serving work ...
    consent_hours = 8          # ... for this long from start (omit: until revoked)
    data_dir = "~/.idlefleet"  # key, consent log, event log, control socket (owner-only)
    link_kind = "wifi"         # ethernet | wifi | cellular
    link_metered = false
    mdns = true                # find peers on the LAN (no bootstrap needed there)

    [relay]                    # NAT traversal (p2p/nat.py NatConfig); all optional
    relay_service = true       # offer relay slots to peers that cannot be dialled
    max_reservations = 8

    [owner]                    # owner preferences (protocols/policy.py Preferences)
    require_plugged_in = true
    allowed_hours = "22:00-07:00"
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlefleet.p2p.nat import NatConfig
from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.policy import Preferences

GEOHASH_ALPHABET = set("0123456789bcdefghjkmnpqrstuvwxyz")
LINK_KINDS = ("ethernet", "wifi", "cellular")
PUBLISH_POLICIES = ("adaptive", "naive")
DEFAULT_KEY_FILE = Path("~/.idlefleet/node.key")


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node needs. Validated on construction (ConfigError says what to fix)."""

    key_file: Path = DEFAULT_KEY_FILE
    listen_host: str = "127.0.0.1"
    port: int = 0
    bootstrap: tuple[str, ...] = ()
    region: str = "u33d"
    vehicle: str = "sysfs"
    consent: bool = False
    consent_hours: float | None = None
    link_kind: str = "wifi"
    link_metered: bool = False
    # Publishing: on a significant change, plus a slow refresh; "naive" = every second (baseline).
    publish_policy: str = "adaptive"
    refresh_s: float = 20.0
    record_ttl_s: float = 60.0
    vehicle_poll_s: float = 1.0
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 2.0
    heartbeat_misses: int = 2
    target_peers: int = 8
    event_log: Path | None = None
    # Discovery: peers seen are saved here and tried as entry points on the next start (None: off);
    # the DHT routing table is refreshed (self + random lookup) about this often.
    peers_file: Path | None = None
    dht_refresh_s: float = 60.0
    # mDNS (the libp2p mDNS spec): announce on the LAN and join through peers found there.
    mdns: bool = False
    # NAT traversal and the relay service ([relay] table: p2p.nat.NatConfig's fields).
    relay: dict[str, Any] = field(default_factory=dict)
    # Serving model blocks (only with consent): which model, how much memory for weights.
    serve: bool = True
    model: str | None = None
    memory_budget_mb: float | None = None
    rebalance_s: float = 20.0
    max_sessions: int = 16
    kv_budget_mb: float = 256.0
    session_idle_s: float = 60.0
    # The owner's data directory (key, consent log, event log, control socket); None = none
    # (embedded use: consent only from ``consent``/``consent_hours``, events only to event_log).
    data_dir: Path | None = None
    owner: dict[str, Any] = field(default_factory=dict)  # owner preferences (policy.Preferences)
    power_w: float = 100.0  # compute power draw, for the owner report's energy estimate
    unload_grace_s: float = 60.0  # unload block weights after not serving this long
    # TEST TOOLING ONLY (node/faults.py): return wrong outputs, "KIND[:RATE]". Refused unless
    # IDLEFLEET_CHAOS=yes is in the environment too (checked by open_node).
    chaos_fault: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("key_file", "event_log", "peers_file", "data_dir"):  # a path given as a string is a path
            value = getattr(self, name)
            if isinstance(value, str) and value:
                object.__setattr__(self, name, Path(value))
        if isinstance(self.bootstrap, list):
            object.__setattr__(self, "bootstrap", tuple(self.bootstrap))
        _check_types(self)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if not (1 <= len(self.region) <= 12 and set(self.region) <= GEOHASH_ALPHABET):
            raise ConfigError(f"region must be a geohash prefix (1-12 chars of 0-9 b-z without a i l o), "
                              f"got {self.region!r}")
        if self.link_kind not in LINK_KINDS:
            raise ConfigError(f"link_kind must be one of {', '.join(LINK_KINDS)}, got {self.link_kind!r}")
        if self.publish_policy not in PUBLISH_POLICIES:
            raise ConfigError(f"publish_policy must be one of {PUBLISH_POLICIES}, "
                              f"got {self.publish_policy!r}")
        if self.consent_hours is not None and self.consent_hours <= 0:
            raise ConfigError("consent_hours must be positive (omit it for consent until revoked)")
        if not 0 < self.refresh_s <= self.record_ttl_s / 2:
            raise ConfigError("refresh_s must be positive and at most half of record_ttl_s")
        if not 0 < self.record_ttl_s <= 600:
            raise ConfigError("record_ttl_s must be in (0, 600]")
        for name in ("vehicle_poll_s", "heartbeat_s", "heartbeat_timeout_s", "dht_refresh_s"):
            value = getattr(self, name)
            if not 0.05 <= value <= 600:
                raise ConfigError(f"{name} must be a number of seconds in [0.05, 600], got {value!r}")
        for name, lo, hi in (("heartbeat_misses", 1, 1000), ("target_peers", 1, 1000),
                             ("max_sessions", 1, 4096)):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, low, high in (("rebalance_s", 0.1, 86400.0), ("session_idle_s", 0.1, 86400.0),
                                ("kv_budget_mb", 1.0, 2.0**20), ("memory_budget_mb", 1.0, 2.0**24),
                                ("power_w", 0.0, 1e6), ("unload_grace_s", 0.0, 1e6)):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
        if not self.listen_host:
            raise ConfigError("listen_host must not be empty")
        if not self.vehicle:
            raise ConfigError("vehicle must not be empty (sim:PROFILE, file:PATH or sysfs[:ROOT])")
        if self.model is not None and not self.model:
            raise ConfigError("model must be a GGUF path (omit it for the default model)")
        _nat_config(self.relay)
        try:
            Preferences.from_mapping(self.owner)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"owner preferences: {e}") from None
        if self.chaos_fault is not None:
            from idlefleet.node.faults import parse_fault

            parse_fault(self.chaos_fault)  # raises ConfigError naming the kinds
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                raise ConfigError(f"bootstrap address {addr!r} must end in /p2p/<peer id>")

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def key_path(self) -> Path:
        if self.data_dir is not None and self.key_file == DEFAULT_KEY_FILE:
            return self.data_dir.expanduser() / "node.key"
        return self.key_file.expanduser()

    @property
    def events_path(self) -> Path | None:
        """The event log: ``event_log``, else ``DATA_DIR/events.jsonl`` (on by default)."""
        if self.event_log is not None:
            return self.event_log
        return None if self.data_dir is None else self.data_dir.expanduser() / "events.jsonl"

    @property
    def nat_config(self) -> NatConfig:
        return _nat_config(self.relay)

    @property
    def preferences(self) -> Preferences:
        return Preferences.from_mapping(self.owner)


def load_config(path: Path | None = None, **overrides: Any) -> NodeConfig:
    """Read a TOML config file (if given) and apply non-None overrides (from flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    if "bootstrap" in values:
        b = values["bootstrap"]
        if isinstance(b, str):
            b = [b]
        if not isinstance(b, list | tuple):
            raise ConfigError(f"bootstrap must be a multiaddr or a list of them, got {b!r}")
        values["bootstrap"] = tuple(b)
    return NodeConfig(**values)


# Every setting is checked against its annotation. Numbers: an int is accepted where a float is
# expected (TOML ``8`` for ``8.0``), a bool never is (``consent = "false"`` is an error, not
# consent), NaN and infinities are refused.
_TYPE_NAMES = {Path: "a path", str: "a string", int: "an integer", bool: "a boolean (true or false)",
               float: "a number", tuple: "a list of strings", dict: "a table", type(None): "omitted"}


def _type_ok(value: object, kind: Any) -> bool:
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return type(value) is bool
    if origin is int:
        return type(value) is int
    if origin is float:
        return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
    if origin is tuple:
        item = (typing.get_args(kind) or (object,))[0]
        return isinstance(value, tuple) and all(_type_ok(v, item) for v in value)
    if kind is Any or kind is object:
        return True
    return isinstance(value, origin)


def _check_types(config: NodeConfig) -> None:
    """Raise ConfigError naming the first setting whose value does not have its declared type."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) \
            else (hint,)
        if not any(_type_ok(value, kind) for kind in kinds):
            want = " or ".join(_TYPE_NAMES.get(typing.get_origin(k) or k, str(k)) for k in kinds)
            raise ConfigError(f"config key {f.name} must be {want}, got {value!r}")


_RELAY_RANGES = {"max_reservations": (0, 4096), "max_circuits": (1, 4096),
                 "max_circuit_bytes": (1024, 2**40), "max_circuit_duration_s": (1, 86400),
                 "reservation_ttl_s": (60, 86400), "autonat_servers": (1, 16),
                 "check_s": (1.0, 86400.0), "first_check_s": (0.0, 3600.0), "op_timeout_s": (0.1, 120.0),
                 "hole_punch_s": (0.1, 3600.0), "hole_punch_timeout_s": (1.0, 600.0),
                 "relay_close_s": (0.0, 3600.0)}


def _nat_config(table: dict[str, Any]) -> NatConfig:
    """The ``[relay]`` table as a NatConfig; ConfigError names the first bad key."""
    hints = typing.get_type_hints(NatConfig)
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"unknown [relay] key {key!r} (known: {', '.join(sorted(hints))})")
        if not _type_ok(value, hints[key]):
            want = _TYPE_NAMES.get(hints[key], hints[key])
            raise ConfigError(f"[relay] {key} must be {want}, got {value!r}")
        low, high = _RELAY_RANGES.get(key, (None, None))
        if low is not None and not low <= value <= high:
            raise ConfigError(f"[relay] {key} must be in [{low}, {high}], got {value!r}")
    return NatConfig(**table)
