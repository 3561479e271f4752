"""The owner policy (protocols/policy.py): every preference and boundary, pure and table-driven."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from idlefleet.protocols import policy
from idlefleet.protocols.policy import (
    ACTIONS,
    REASONS,
    Consent,
    Decision,
    Preferences,
    VehicleReading,
    consent_from_entries,
    decide,
    parse_hours,
)

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC
P = Preferences()
C = Consent(granted_at=NOW - 3600)
# Parked, plugged in, 80%, cool, no departure known, measured just now: serves.
V = VehicleReading(battery_soc=0.8, plugged_in=True, thermal_headroom_c=30.0, parked=True,
                   expected_departure=None, observed_at=NOW)


def v(**changes: Any) -> VehicleReading:
    return dataclasses.replace(V, **changes)


def p(**changes: Any) -> Preferences:
    return dataclasses.replace(P, **changes)


def outcome(prefs: Preferences = P, consent: Consent = C, vehicle: VehicleReading | None = V,
            now: float = NOW) -> tuple[str, str]:
    d = decide(prefs, consent, vehicle, now)
    return d.action, d.reason


# (case, prefs, consent, vehicle, now, expected (action, reason))
TABLE: list[tuple[str, Preferences, Consent, VehicleReading | None, float, tuple[str, str]]] = [
    ("all fine", P, C, V, NOW, ("serve", "ok")),
    # consent
    ("never granted", P, Consent(), V, NOW, ("stop", "no_consent")),
    ("grant starts later", P, Consent(granted_at=NOW + 1), V, NOW, ("stop", "no_consent")),
    ("grant starts now", P, Consent(granted_at=NOW), V, NOW, ("serve", "ok")),
    ("other scope", P, Consent(granted_at=NOW - 1, scope=("training",)), V, NOW, ("stop", "no_consent")),
    ("expires later", P, Consent(NOW - 10, NOW + 0.001), V, NOW, ("serve", "ok")),
    ("expired just now", P, Consent(NOW - 10, NOW), V, NOW, ("drain", "consent_expired")),
    ("expired within drain", P, Consent(NOW - 10, NOW - 0.999), V, NOW, ("drain", "consent_expired")),
    ("expired past drain", P, Consent(NOW - 10, NOW - 1.0), V, NOW, ("stop", "consent_expired")),
    ("revoked just now", P, Consent(NOW - 10, None, NOW), V, NOW, ("drain", "consent_revoked")),
    ("revoked past drain", P, Consent(NOW - 10, None, NOW - 1), V, NOW, ("stop", "consent_revoked")),
    ("revoked, no drain", p(revoke_drain_s=0), Consent(NOW - 10, None, NOW), V, NOW,
     ("stop", "consent_revoked")),
    # vehicle unknown
    ("no vehicle state", P, C, None, NOW, ("stop", "vehicle_unknown")),
    ("state at max age", P, C, v(observed_at=NOW - 30), NOW, ("serve", "ok")),
    ("state too old", P, C, v(observed_at=NOW - 30.001), NOW, ("stop", "vehicle_unknown")),
    # driving
    ("driving", P, C, v(parked=False), NOW, ("stop", "driving")),
    ("driving beats the battery floor", P, C, v(parked=False, battery_soc=0.0), NOW, ("stop", "driving")),
    # hard floor (plugged in or not)
    ("at hard floor", P, C, v(battery_soc=0.20), NOW, ("serve", "ok")),
    ("under hard floor, plugged", P, C, v(battery_soc=0.199), NOW, ("stop", "battery_floor")),
    ("under hard floor, unplugged", p(require_plugged_in=False), C,
     v(battery_soc=0.1, plugged_in=False), NOW, ("stop", "battery_floor")),
    # thermal
    ("headroom at limit", P, C, v(thermal_headroom_c=10.0), NOW, ("serve", "ok")),
    ("headroom under limit", P, C, v(thermal_headroom_c=9.9), NOW, ("drain", "thermal")),
    ("at throttle point", P, C, v(thermal_headroom_c=0.0), NOW, ("drain", "thermal")),
    ("over throttle point", P, C, v(thermal_headroom_c=-0.1), NOW, ("stop", "overheated")),
    # departure
    ("departure at margin", P, C, v(expected_departure=NOW + 1800), NOW, ("serve", "ok")),
    ("departure inside margin", P, C, v(expected_departure=NOW + 1799), NOW, ("drain", "departure_soon")),
    ("departure passed", P, C, v(expected_departure=NOW - 5), NOW, ("drain", "departure_soon")),
    # plugged in / battery on its own
    ("unplugged (default: plug required)", P, C, v(plugged_in=False), NOW, ("drain", "unplugged")),
    ("unplugged allowed, above min", p(require_plugged_in=False), C, v(plugged_in=False, battery_soc=0.5),
     NOW, ("serve", "ok")),
    ("unplugged allowed, under min", p(require_plugged_in=False), C,
     v(plugged_in=False, battery_soc=0.49), NOW, ("drain", "battery_low")),
    ("plugged in, under min but over floor", P, C, v(battery_soc=0.3), NOW, ("serve", "ok")),
    # link
    ("metered link", P, C, v(link_metered=True), NOW, ("drain", "metered_link")),
    ("metered link allowed", p(allow_metered=True), C, v(link_metered=True), NOW, ("serve", "ok")),
    # hours (NOW is 08:00 UTC)
    ("inside a window", p(allowed_hours=parse_hours("07:00-09:00")), C, V, NOW, ("serve", "ok")),
    ("window start inclusive", p(allowed_hours=parse_hours("08:00-09:00")), C, V, NOW, ("serve", "ok")),
    ("window end exclusive", p(allowed_hours=parse_hours("07:00-08:00")), C, V, NOW,
     ("drain", "outside_hours")),
    ("wrapping window, outside", p(allowed_hours=parse_hours("22:00-07:00")), C, V, NOW,
     ("drain", "outside_hours")),
    ("wrapping window, after midnight", p(allowed_hours=parse_hours("22:00-08:30")), C, V, NOW,
     ("serve", "ok")),
    ("utc offset moves the window", p(allowed_hours=parse_hours("22:00-07:00"), utc_offset_s=-3 * 3600),
     C, V, NOW, ("serve", "ok")),
    ("second window", p(allowed_hours=parse_hours("01:00-02:00,07:59-08:01")), C, V, NOW, ("serve", "ok")),
]


@pytest.mark.parametrize(("prefs", "consent", "vehicle", "now", "expected"),
                         [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_decision_table(prefs: Preferences, consent: Consent, vehicle: VehicleReading | None,
                        now: float, expected: tuple[str, str]) -> None:
    assert outcome(prefs, consent, vehicle, now) == expected


def test_every_reason_is_reachable_and_stop_beats_drain() -> None:
    seen = {outcome(*case[1:5])[1] for case in TABLE}  # type: ignore[arg-type]
    assert seen | {"cooldown"} == set(REASONS)
    # Two problems at once: the more severe one is reported.
    assert outcome(vehicle=v(plugged_in=False, thermal_headroom_c=-1)) == ("stop", "overheated")
    assert outcome(vehicle=v(expected_departure=NOW, battery_soc=0.1)) == ("stop", "battery_floor")
    assert outcome(consent=Consent(), vehicle=None) == ("stop", "no_consent")


def test_hysteresis_waits_the_cooldown_after_a_vehicle_pause() -> None:
    prefs = p(resume_cooldown_s=300)
    d = decide(prefs, C, V, NOW)
    assert (d.action, d.reason, d.since) == ("serve", "ok", NOW)
    hot = decide(prefs, C, v(thermal_headroom_c=5, observed_at=NOW + 10), NOW + 10, d)
    assert (hot.action, hot.reason, hot.vehicle_blocked_at) == ("drain", "thermal", NOW + 10)
    cool = v(observed_at=NOW + 20)
    # Flapping at the boundary: every hot reading restarts the cool-down.
    d = decide(prefs, C, cool, NOW + 20, hot)
    assert (d.action, d.reason, d.since) == ("drain", "cooldown", NOW + 10)
    d = decide(prefs, C, v(thermal_headroom_c=9, observed_at=NOW + 100), NOW + 100, d)
    assert d.vehicle_blocked_at == NOW + 100
    d = decide(prefs, C, v(observed_at=NOW + 399.9), NOW + 399.9, d)
    assert (d.action, d.reason) == ("drain", "cooldown")
    d = decide(prefs, C, v(observed_at=NOW + 400), NOW + 400, d)
    assert (d.action, d.reason, d.since) == ("serve", "ok", NOW + 400)


@pytest.mark.parametrize("reason_vehicle", [
    v(parked=False), v(battery_soc=0.1), v(thermal_headroom_c=-5), v(plugged_in=False),
    v(expected_departure=NOW), None,
])
def test_every_vehicle_pause_has_a_cooldown(reason_vehicle: VehicleReading | None) -> None:
    prefs = p(resume_cooldown_s=60)
    paused = decide(prefs, C, reason_vehicle, NOW)
    assert paused.action != "serve"
    fresh = v(observed_at=NOW + 59)
    assert decide(prefs, C, fresh, NOW + 59, paused).reason == "cooldown"
    assert decide(prefs, C, v(observed_at=NOW + 60), NOW + 60, paused).action == "serve"


def test_owner_choices_take_effect_at_once() -> None:
    """Consent, hours and the link are not vehicle conditions: no cool-down after them."""
    prefs = p(resume_cooldown_s=300)
    revoked = decide(prefs, Consent(NOW - 100, None, NOW - 50), V, NOW)
    assert revoked.action == "stop"
    assert decide(prefs, Consent(NOW + 1), V, NOW + 1, revoked).action == "serve"
    metered = decide(prefs, C, v(link_metered=True), NOW)
    assert decide(prefs, C, V, NOW + 1, metered).action == "serve"


def test_start_up_serves_at_once_and_since_tracks_the_action() -> None:
    d1 = decide(P, C, V, NOW)
    d2 = decide(P, C, v(observed_at=NOW + 5), NOW + 5, d1)
    assert d1.since == d2.since == NOW
    d3 = decide(P, C, v(parked=False, observed_at=NOW + 6), NOW + 6, d2)
    assert (d3.action, d3.since) == ("stop", NOW + 6)


def test_decide_is_deterministic_and_total() -> None:
    """Every combination of the vehicle's extremes gives a valid, repeatable decision."""
    combos = itertools.product((0.0, 0.2, 0.5, 1.0), (True, False), (-10.0, 5.0, 50.0),
                               (True, False), (None, NOW, NOW + 7200), (NOW, NOW - 100))
    for soc, plugged, headroom, parked, departure, observed in combos:
        reading = VehicleReading(soc, plugged, headroom, parked, departure, observed)
        d = decide(P, C, reading, NOW)
        assert d.action in ACTIONS and d.reason in REASONS
        assert d == decide(P, C, reading, NOW)
    with pytest.raises(ValueError, match="finite"):
        decide(P, C, V, float("nan"))


def test_consent_log_folding() -> None:
    entries = [
        {"op": "grant", "t": 1.0, "start": 1.0, "expires": None, "scope": ["inference"]},
        {"op": "revoke", "t": 5.0},
        {"op": "revoke", "t": 6.0},  # a second revocation does not move the first
        {"op": "grant", "t": 10.0, "start": 10.0, "expires": 20.0, "scope": ["inference"]},
    ]
    assert consent_from_entries(entries[:1]) == Consent(1.0, None, None)
    assert consent_from_entries(entries[:3]) == Consent(1.0, None, 5.0)
    latest = consent_from_entries(entries)
    assert latest == Consent(10.0, 20.0, None)
    assert latest.active(15.0) and not latest.active(20.0) and not latest.active(9.0)
    assert consent_from_entries([{"op": "revoke", "t": 1.0}]) == Consent()


@pytest.mark.parametrize(("spec", "windows"), [
    ("", ()), ("22:00-07:00", ((1320, 420),)), ("00:00-24:00", ((0, 1440),)),
    ("9:30-10:00, 12:00-13:00", ((570, 600), (720, 780))),
])
def test_parse_hours(spec: str, windows: tuple[tuple[int, int], ...]) -> None:
    assert parse_hours(spec) == windows


@pytest.mark.parametrize("spec", ["22-07", "25:00-01:00", "10:60-11:00", "a:00-b:00", "24:30-01:00",
                                  "10:00-11:00-12:00"])
def test_parse_hours_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="bad hours window"):
        parse_hours(spec)


@pytest.mark.parametrize(("field", "value"), [
    ("min_battery_pct", 101), ("hard_floor_pct", -1), ("min_headroom_c", float("nan")),
    ("require_plugged_in", 1), ("max_state_age_s", 0), ("resume_cooldown_s", "300"),
    ("allowed_hours", ((0, 2000),)), ("utc_offset_s", 20 * 3600),
])
def test_preferences_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Preferences(**{field: value})


def test_preferences_from_mapping() -> None:
    prefs = Preferences.from_mapping({"allowed_hours": "22:00-07:00", "require_plugged_in": False})
    assert prefs.allowed_hours == ((1320, 420),) and not prefs.require_plugged_in
    with pytest.raises(ValueError, match="unknown owner preference"):
        Preferences.from_mapping({"min_batery_pct": 50})


def test_decision_serving_flag() -> None:
    assert Decision("serve", "ok", NOW).serving
    assert not Decision("drain", "cooldown", NOW).serving


# -- DecisionInputs: what decide reads, as one object ---------------------------------------------


def _rule_reads() -> tuple[set[str], set[str]]:
    """(attributes ``rule`` reads of its argument, other names it loads), from its source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(policy.rule)))
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    (arg,) = [a.arg for a in func.args.args]
    attrs, names = set(), set()
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == arg:
            attrs.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id != arg:
            names.add(node.id)
    return attrs, names


def test_rule_reads_exactly_the_fields_of_decision_inputs_and_nothing_else() -> None:
    # A condition decide tests must be a field of DecisionInputs, or rule could not read it; so a
    # memo keyed on DecisionInputs (the fleet simulator's) cannot miss it.
    attrs, names = _rule_reads()
    assert attrs == {f.name for f in dataclasses.fields(policy.DecisionInputs)}
    assert names <= {"DecisionInputs", "tuple", "str"}  # no globals, no preferences, no clock


def test_decide_takes_its_action_and_reason_from_the_inputs() -> None:
    cases = itertools.product(
        (C, Consent(), Consent(NOW - 10, revoked_at=NOW - 0.5), Consent(NOW - 10, expires_at=NOW - 5)),
        (V, None, dataclasses.replace(V, battery_soc=0.1), dataclasses.replace(V, plugged_in=False),
         dataclasses.replace(V, thermal_headroom_c=5.0), dataclasses.replace(V, parked=False),
         dataclasses.replace(V, expected_departure=NOW + 60), dataclasses.replace(V, link_metered=True)),
        (None, Decision("drain", "thermal", NOW - 100, NOW - 100)),
        (P, Preferences(require_plugged_in=False), Preferences(allowed_hours=parse_hours("22:00-23:00"))),
    )
    for consent, vehicle, previous, prefs in cases:
        d = decide(prefs, consent, vehicle, NOW, previous)
        inputs = policy.decision_inputs(prefs, consent, vehicle, NOW, previous)
        assert (d.action, d.reason) == policy.rule(inputs)


def test_every_input_field_can_change_the_answer() -> None:
    # No field is dead weight in the key: for each one some inputs answer differently when it flips.
    import random

    rng = random.Random(0)
    names = [f.name for f in dataclasses.fields(policy.DecisionInputs)]
    serving = policy.decision_inputs(P, C, V, NOW)
    assert policy.rule(serving) == ("serve", "ok")
    # around the serving inputs, each field flipped now and then
    samples = [policy.DecisionInputs(*(getattr(serving, n) != (rng.random() < 0.15) for n in names))
               for _ in range(4000)]
    for name in names:
        assert any(policy.rule(x) != policy.rule(dataclasses.replace(x, **{name: not getattr(x, name)}))
                   for x in samples), name
