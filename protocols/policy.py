"""The owner's policy: may this node serve work right now? One pure function, no I/O.

``decide(prefs, consent, vehicle, now, previous=None) -> Decision`` returns one of three actions:

- ``serve``: take new sessions;
- ``drain``: take no new sessions, ask clients to move running ones (they replay elsewhere);
- ``stop``: end every session now (clients fail over), compute nothing.

with a machine-readable ``reason`` (``REASONS``). The rules, most severe first (the first that
applies wins; a ``stop`` reason always beats a ``drain`` reason):

=====================  ======  ==============================================================
reason                 action  when
=====================  ======  ==============================================================
``no_consent``         stop    the owner never granted consent (or the grant has no ``inference``
                               scope / starts in the future)
``consent_expired``    drain   the grant ran out less than ``revoke_drain_s`` ago; stop after
``consent_revoked``    drain   the owner revoked less than ``revoke_drain_s`` ago; stop after
``vehicle_unknown``    stop    no vehicle state, or one older than ``max_state_age_s`` (a dead
                               daemon, an unreadable or invalid file): we cannot rule out driving
``driving``            stop    not parked
``battery_floor``      stop    state of charge below ``hard_floor_pct`` (plugged in or not)
``overheated``         stop    thermal headroom below 0 (at or over the throttle point)
``departure_soon``     drain   expected departure within ``departure_margin_s``
``thermal``            drain   thermal headroom below ``min_headroom_c``
``unplugged``          drain   not plugged in and ``require_plugged_in``
``battery_low``        drain   unplugged and state of charge below ``min_battery_pct``
``metered_link``       drain   the link is metered and ``allow_metered`` is off
``outside_hours``      drain   ``now`` (local time, ``utc_offset_s``) outside ``allowed_hours``
``cooldown``           drain   every condition is fine, but a vehicle condition (any reason in
                               ``COOLDOWN_REASONS``) held less than ``resume_cooldown_s`` ago
``ok``                 serve   otherwise
=====================  ======  ==============================================================

Hysteresis: ``previous`` is the last ``Decision`` (None at start). ``Decision.vehicle_blocked_at``
remembers the last time a vehicle condition blocked serving; a resume waits ``resume_cooldown_s``
after it, so a car whose battery hovers at a floor or whose heat hovers at a limit does not flap
(BOINC waits 300 s after a heat or low-charge pause). Consent, hours and the link are the owner's
explicit choices: they take effect at once in both directions.

The conditions the table tests are one object, ``DecisionInputs`` (``decision_inputs(prefs,
consent, vehicle, now, previous)``); ``rule(inputs)`` is the table itself and reads nothing else,
so a simulator that keeps a decision while a car's inputs stay equal cannot miss a condition.

Defaults are chosen for a car (see ``Preferences``); everything here is deterministic and cheap (a
fleet simulator calls it for thousands of cars per simulated second).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACTIONS",
    "COOLDOWN_REASONS",
    "REASONS",
    "SCOPE_INFERENCE",
    "Consent",
    "Decision",
    "DecisionInputs",
    "Preferences",
    "VehicleReading",
    "consent_from_entries",
    "decide",
    "decision_inputs",
    "parse_hours",
    "rule",
]

ACTIONS = ("serve", "drain", "stop")
REASONS = (
    "no_consent",
    "consent_expired",
    "consent_revoked",
    "vehicle_unknown",
    "driving",
    "battery_floor",
    "overheated",
    "departure_soon",
    "thermal",
    "unplugged",
    "battery_low",
    "metered_link",
    "outside_hours",
    "cooldown",
    "ok",
)
#: Vehicle conditions after which a resume waits ``resume_cooldown_s`` (hysteresis).
COOLDOWN_REASONS = frozenset(
    {"vehicle_unknown", "driving", "battery_floor", "overheated", "thermal", "battery_low",
     "unplugged", "departure_soon"}
)  # fmt: skip
SCOPE_INFERENCE = "inference"
DAY_MIN = 24 * 60


def parse_hours(spec: str) -> tuple[tuple[int, int], ...]:
    """Parse ``"22:00-07:00,12:00-13:30"`` into minute-of-day windows ``((1320, 420), ...)``.

    A window may wrap midnight (start > end). An empty string means no restriction (``()``).
    Raises ValueError with the offending part.
    """
    windows: list[tuple[int, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            a, b = part.split("-")
            windows.append((_minute(a), _minute(b)))
        except ValueError:
            raise ValueError(f"bad hours window {part!r}: expected HH:MM-HH:MM") from None
    return tuple(windows)


def _minute(text: str) -> int:
    h, m = text.strip().split(":")
    if not (h.isdigit() and m.isdigit() and len(m) == 2):
        raise ValueError(text)
    hour, minute = int(h), int(m)
    if not (0 <= hour <= 24 and 0 <= minute < 60) or (hour == 24 and minute):
        raise ValueError(text)
    return hour * 60 + minute


@dataclass(frozen=True)
class Preferences:
    """The owner's preferences. Validated on construction (ValueError names the field).

    Defaults, chosen for a car (BOINC's Android defaults in brackets, from its ``lib/prefs.cpp``):

    - ``require_plugged_in=True`` [run only while charging]: a car's battery is its range, and
      every extra cycle wears a pack that costs thousands; on the charger the compute (~1 kW) is
      a small share of what a home charger (7-11 kW) delivers.
    - ``min_battery_pct=50`` [90%]: only used when the owner allows serving on battery. A car pack
      is ~75 kWh, so 1 kW of compute for an hour costs ~1.3 points: 50% keeps well over half the
      range; a phone's 90% would leave a car idle for no reason.
    - ``hard_floor_pct=20``: never serve below this, even plugged in: the car must be able to
      leave for an emergency, and the charger's power should go to the battery first.
    - ``min_headroom_c=10`` [battery at most 40 C]: drain 10 C before the compute unit's throttle
      point (a car reports headroom, not a battery temperature); stop at the throttle point.
    - ``departure_margin_s=1800``: drain 30 minutes before an expected departure, so sessions
      move away calmly and the car cools and preconditions on its own power budget.
    - ``allowed_hours=()``: any time (a car parked at home is idle all night and most of the
      day); the owner may restrict it, e.g. ``parse_hours("22:00-07:00")``.
    - ``allow_metered=False`` [Wi-Fi only]: hidden states are ~2 KB per token per hop; a
      cellular plan must not pay for strangers' inference.
    - ``max_state_age_s=30``: the vehicle daemon writes every few seconds; 30 s without a fresh
      state means it is dead, and a dead daemon's last "parked" may be a car driving away.
    - ``resume_cooldown_s=300`` [wait 300 s after a heat or low-charge pause]: BOINC's value.
    - ``revoke_drain_s=1``: after a revocation or expiry, sessions get one second to move, then
      everything stops (the issue's "takes effect within a second: drain, then stop").
    """

    require_plugged_in: bool = True
    min_battery_pct: float = 50.0
    hard_floor_pct: float = 20.0
    min_headroom_c: float = 10.0
    departure_margin_s: float = 1800.0
    allowed_hours: tuple[tuple[int, int], ...] = ()
    utc_offset_s: float = 0.0
    allow_metered: bool = False
    max_state_age_s: float = 30.0
    resume_cooldown_s: float = 300.0
    revoke_drain_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("require_plugged_in", "allow_metered"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be true or false")
        _number("min_battery_pct", self.min_battery_pct, 0.0, 100.0)
        _number("hard_floor_pct", self.hard_floor_pct, 0.0, 100.0)
        _number("min_headroom_c", self.min_headroom_c, 0.0, 200.0)
        _number("departure_margin_s", self.departure_margin_s, 0.0, 7 * 86_400.0)
        _number("utc_offset_s", self.utc_offset_s, -14 * 3600.0, 14 * 3600.0)
        _number("max_state_age_s", self.max_state_age_s, 0.1, 86_400.0)
        _number("resume_cooldown_s", self.resume_cooldown_s, 0.0, 86_400.0)
        _number("revoke_drain_s", self.revoke_drain_s, 0.0, 3600.0)
        if not isinstance(self.allowed_hours, tuple) or not all(
            isinstance(w, tuple) and len(w) == 2
            and all(type(m) is int and 0 <= m <= DAY_MIN for m in w)
            for w in self.allowed_hours
        ):
            raise ValueError("allowed_hours must be minute-of-day windows (use parse_hours)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Preferences:
        """From a config table; ``allowed_hours`` may be a ``"22:00-07:00"`` string. ValueError."""
        values = dict(data)
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown owner preference(s): {', '.join(unknown)}")
        hours = values.get("allowed_hours")
        if isinstance(hours, str):
            values["allowed_hours"] = parse_hours(hours)
        return cls(**values)


def _number(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name}={value!r} is outside {lo:g}..{hi:g}")


@dataclass(frozen=True)
class Consent:
    """The owner's consent as of now: the latest grant and whether it was revoked since.

    ``granted_at`` None = never granted. ``expires_at`` None = until revoked. ``revoked_at`` is
    the revocation after the latest grant (None if none).
    """

    granted_at: float | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    scope: tuple[str, ...] = (SCOPE_INFERENCE,)

    def active(self, now: float) -> bool:
        return (self.granted_at is not None and self.granted_at <= now
                and SCOPE_INFERENCE in self.scope and self.revoked_at is None
                and (self.expires_at is None or now < self.expires_at))


def consent_from_entries(entries: Iterable[Mapping[str, Any]]) -> Consent:
    """Fold consent log entries (``{"op": "grant"|"revoke", "t", "start", "expires", "scope"}``,
    oldest first, already verified) into the current ``Consent``: a grant replaces everything
    before it; a revocation ends the latest grant."""
    consent = Consent()
    for entry in entries:
        op = entry.get("op")
        if op == "grant":
            consent = Consent(granted_at=float(entry["start"]),
                              expires_at=None if entry.get("expires") is None else float(entry["expires"]),
                              scope=tuple(entry.get("scope") or (SCOPE_INFERENCE,)))
        elif op == "revoke" and consent.granted_at is not None and consent.revoked_at is None:
            consent = Consent(consent.granted_at, consent.expires_at, float(entry["t"]), consent.scope)
    return consent


@dataclass(frozen=True)
class VehicleReading:
    """What the policy needs from a vehicle state, and when it was measured (unix seconds)."""

    battery_soc: float
    plugged_in: bool
    thermal_headroom_c: float
    parked: bool
    expected_departure: float | None
    observed_at: float
    link_metered: bool = False


@dataclass(frozen=True)
class Decision:
    """``action`` in ``ACTIONS``, ``reason`` in ``REASONS``; ``since`` = when this action began;
    ``vehicle_blocked_at`` = the last time a vehicle condition blocked serving (hysteresis)."""

    action: str
    reason: str
    since: float
    vehicle_blocked_at: float | None = None
    detail: str = field(default="", compare=False)

    @property
    def serving(self) -> bool:
        return self.action == "serve"


@dataclass(frozen=True)
class DecisionInputs:
    """Every condition ``decide`` tests, as of one moment: ``decide``'s action and reason are a
    function of this object alone (``rule``), so two moments with equal inputs get the same action
    and reason (a simulator may keep a decision while its inputs stay equal). Built by
    ``decision_inputs``; a field per condition of the rule table."""

    consented: bool  # a grant with the inference scope has started
    revoked: bool  # the owner revoked it
    expired: bool  # it ran out
    drain_over: bool  # the revocation (or, unrevoked, the expiry) is revoke_drain_s old
    vehicle_known: bool  # a vehicle state no older than max_state_age_s
    parked: bool
    below_floor: bool  # state of charge below hard_floor_pct
    overheated: bool  # thermal headroom below 0
    departure_soon: bool  # expected departure within departure_margin_s
    hot: bool  # thermal headroom below min_headroom_c
    plugged_in: bool
    require_plugged_in: bool
    below_min_battery: bool  # state of charge below min_battery_pct
    metered_blocked: bool  # a metered link and allow_metered off
    outside_hours: bool  # allowed_hours set and now outside them
    cooling_down: bool  # the last vehicle block was less than resume_cooldown_s ago


def decision_inputs(prefs: Preferences, consent: Consent, vehicle: VehicleReading | None, now: float,
                    previous: Decision | None = None) -> DecisionInputs:
    """The conditions ``decide`` tests at ``now`` (vehicle fields are False without a vehicle)."""
    revoked = consent.revoked_at is not None
    expired = consent.expires_at is not None and now >= consent.expires_at
    if consent.revoked_at is not None:
        drain_over = now - consent.revoked_at >= prefs.revoke_drain_s
    else:
        drain_over = consent.expires_at is not None and now - consent.expires_at >= prefs.revoke_drain_s
    blocked_at = previous.vehicle_blocked_at if previous is not None else None
    cooling = blocked_at is not None and now - blocked_at < prefs.resume_cooldown_s
    hours = bool(prefs.allowed_hours) and not _within_hours(prefs, now)
    consented = (consent.granted_at is not None and consent.granted_at <= now
                 and SCOPE_INFERENCE in consent.scope)
    if vehicle is None:
        return DecisionInputs(consented, revoked, expired, drain_over, False, False, False, False,
                              False, False, False, prefs.require_plugged_in, False, False, hours, cooling)
    pct = vehicle.battery_soc * 100.0
    return DecisionInputs(
        consented=consented, revoked=revoked, expired=expired, drain_over=drain_over,
        vehicle_known=now - vehicle.observed_at <= prefs.max_state_age_s,
        parked=vehicle.parked,
        below_floor=pct < prefs.hard_floor_pct,
        overheated=vehicle.thermal_headroom_c < 0,
        departure_soon=(vehicle.expected_departure is not None
                        and vehicle.expected_departure - now < prefs.departure_margin_s),
        hot=vehicle.thermal_headroom_c < prefs.min_headroom_c,
        plugged_in=vehicle.plugged_in,
        require_plugged_in=prefs.require_plugged_in,
        below_min_battery=pct < prefs.min_battery_pct,
        metered_blocked=vehicle.link_metered and not prefs.allow_metered,
        outside_hours=hours,
        cooling_down=cooling,
    )


def rule(inputs: DecisionInputs) -> tuple[str, str]:
    """(action, reason) of the rule table for ``inputs``: the first rule that applies wins. Reads
    nothing but ``inputs`` (``tests/test_policy.py`` checks), so equal inputs, equal answer."""
    if not inputs.consented:
        return "stop", "no_consent"
    if inputs.revoked:
        return ("stop" if inputs.drain_over else "drain"), "consent_revoked"
    if inputs.expired:
        return ("stop" if inputs.drain_over else "drain"), "consent_expired"
    if not inputs.vehicle_known:
        return "stop", "vehicle_unknown"
    if not inputs.parked:
        return "stop", "driving"
    if inputs.below_floor:
        return "stop", "battery_floor"
    if inputs.overheated:
        return "stop", "overheated"
    if inputs.departure_soon:
        return "drain", "departure_soon"
    if inputs.hot:
        return "drain", "thermal"
    if not inputs.plugged_in:
        if inputs.require_plugged_in:
            return "drain", "unplugged"
        if inputs.below_min_battery:
            return "drain", "battery_low"
    if inputs.metered_blocked:
        return "drain", "metered_link"
    if inputs.outside_hours:
        return "drain", "outside_hours"
    if inputs.cooling_down:
        return "drain", "cooldown"
    return "serve", "ok"


def _detail(reason: str, prefs: Preferences, vehicle: VehicleReading | None, now: float,
            previous: Decision | None) -> str:
    """The human-readable detail of ``reason`` (values, not conditions: not part of the inputs)."""
    if reason == "vehicle_unknown":
        return ("no vehicle state" if vehicle is None
                else f"vehicle state is {now - vehicle.observed_at:.0f}s old")
    if vehicle is not None:
        pct = vehicle.battery_soc * 100.0
        head = vehicle.thermal_headroom_c
        if reason == "battery_floor":
            return f"battery {pct:.0f}% < floor {prefs.hard_floor_pct:g}%"
        if reason == "overheated":
            return f"{-head:.0f} C over the throttle point"
        if reason == "thermal":
            return f"headroom {head:.0f} C < {prefs.min_headroom_c:g} C"
        if reason == "battery_low":
            return f"battery {pct:.0f}% < {prefs.min_battery_pct:g}% on battery"
    if reason == "cooldown" and previous is not None and previous.vehicle_blocked_at is not None:
        wait = previous.vehicle_blocked_at + prefs.resume_cooldown_s - now
        return f"resuming {wait:.0f}s after the last pause"
    return _DETAILS.get(reason, "")


_DETAILS = {
    "no_consent": "the owner has not consented to inference",
    "consent_revoked": "the owner revoked consent",
    "consent_expired": "the owner's consent ran out",
    "driving": "the vehicle is not parked",
    "departure_soon": "departure expected soon",
    "unplugged": "not plugged in",
    "metered_link": "the link is metered",
    "outside_hours": "outside the allowed hours",
}


def _within_hours(prefs: Preferences, now: float) -> bool:
    minute = int(((now + prefs.utc_offset_s) % 86_400.0) // 60)
    for start, end in prefs.allowed_hours:
        if start <= end:
            if start <= minute < end:
                return True
        elif minute >= start or minute < end:  # wraps midnight
            return True
    return False


def decide(prefs: Preferences, consent: Consent, vehicle: VehicleReading | None, now: float,
           previous: Decision | None = None) -> Decision:
    """The owner's decision at unix time ``now`` (pure; see the module docstring for the rules).

    ``previous`` is the last decision (None at start-up: a node that starts within the cool-down
    of nothing serves at once). Raises ValueError only for a non-finite ``now``.
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
    action, reason = rule(decision_inputs(prefs, consent, vehicle, now, previous))
    blocked_at = previous.vehicle_blocked_at if previous is not None else None
    if reason in COOLDOWN_REASONS:
        blocked_at = now
    since = now
    if previous is not None and previous.action == action:
        since = previous.since
    return Decision(action, reason, since, blocked_at, _detail(reason, prefs, vehicle, now, previous))
