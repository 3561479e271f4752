"""The fleet simulator (node/sim): deterministic, conserving, and driven by the node's own functions.

Small fleets (a few hundred devices, a few simulated hours) keep these fast.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from idlefleet.node.cli.main import main
from idlefleet.node.sim import Scenario, ScenarioError, load_scenario, run_simulation
from idlefleet.node.sim.engine import FAIL_REASONS, T0
from idlefleet.node.sim.report import to_json, to_text
from idlefleet.node.sim.scenario import EventSpec, builtin_scenarios, scenario_from_mapping
from idlefleet.protocols.policy import Consent, Preferences, VehicleReading, decide
from tests.test_layering import imported_modules, sources


def small(**changes: object) -> Scenario:
    """A busy little fleet: a morning rush, a network outage, an overnight batch, high demand."""
    base = load_scenario("morning-rush")
    scn = replace(base, cars=400, hours=3.0, step_s=120.0,
                  fleet=replace(base.fleet, region_cars=50, revoke_per_hour=0.05),
                  events=replace(base.events, rush_at_h=1.0, outage_at_h=1.5, outage_h=0.5,
                                 outage_regions=0.25),
                  demand=replace(base.demand, per_device_hour=4.0, batch_per_device=1.0, batch_hour=6.0))
    return replace(scn, **changes)  # type: ignore[arg-type]


def test_same_seed_gives_the_same_json_and_another_seed_does_not() -> None:
    scn = small()
    first = to_json(run_simulation(scn), timing=False)
    assert to_json(run_simulation(scn), timing=False) == first
    assert to_json(run_simulation(replace(scn, seed=2)), timing=False) != first


def test_every_request_is_served_or_failed_with_a_reason_and_energy_is_conserved() -> None:
    report = run_simulation(small()).report
    tot = report["totals"]
    assert tot["requests"] > 1000
    assert tot["requests"] == tot["served"] + sum(tot["failed"].values())
    assert tot["conserved"] is True
    assert set(tot["failed"]) == set(FAIL_REASONS)
    assert tot["failovers"] > 0 and tot["abrupt_stops"] > 0  # the rush and the outage cut sessions
    for hour in report["hourly"]:
        assert hour["serving"] <= hour["consenting"] <= hour["parked"]
    batch = tot["batch"]
    assert batch["queued"] > 0 and batch["queued"] == batch["served"] + batch["pending"]
    assert tot["energy_used_kwh"] > 0
    assert tot["energy_over_available_steps"] == 0
    assert tot["energy_from_battery_kwh"] > 0  # owners who allow serving on battery did
    assert tot["battery_floor_violations"] == 0


def test_evaluating_only_changed_cars_gives_the_exact_result() -> None:
    """The fast path (decide / should_publish only where an input changed) equals calling both
    for every car at every step."""
    scn = small(cars=250, hours=2.0)
    fast, exact = run_simulation(scn).report, run_simulation(scn, exact=True).report
    calls_fast, calls_exact = fast.pop("node_functions_called"), exact.pop("node_functions_called")
    assert fast == exact
    assert calls_fast["decide"] < calls_exact["decide"]
    assert calls_fast["should_publish"] < calls_exact["should_publish"]


def test_a_policy_threshold_moves_the_node_decision_and_the_fleet_outcome() -> None:
    """The simulator runs protocols.policy.decide: a longer departure margin drains a node whose
    owner leaves in 45 minutes, and drains cars before the rush in the simulation."""
    now = T0 + 7 * 3600
    reading = VehicleReading(battery_soc=0.8, plugged_in=True, thermal_headroom_c=30.0, parked=True,
                             expected_departure=now + 2700, observed_at=now)
    consent = Consent(granted_at=now - 86_400)
    short, long_ = Preferences(departure_margin_s=1800), Preferences(departure_margin_s=3600)
    assert decide(short, consent, reading, now).action == "serve"
    assert decide(long_, consent, reading, now).reason == "departure_soon"

    base = small(cars=300, hours=2.0)
    runs = {m: run_simulation(replace(base, policy=replace(base.policy, departure_margin_s=m))).report
            for m in (1800.0, 3600.0)}
    serving = {m: sum(h["serving"] for h in r["hourly"]) for m, r in runs.items()}
    assert serving[3600.0] < serving[1800.0]
    stops = {m: r["totals"]["abrupt_stops"] for m, r in runs.items()}
    assert stops[3600.0] <= stops[1800.0]


def test_the_simulator_runs_the_node_functions_themselves() -> None:
    from idlefleet.node.sim import demand, gossip, hosting, owner
    from idlefleet.protocols import placement, policy, publish, records, routing

    assert owner.decide is policy.decide
    assert gossip.should_publish is publish.should_publish
    assert (hosting.choose_range, hosting.should_move) == (placement.choose_range, placement.should_move)
    assert (demand.find_route, demand.hop_cost) == (routing.find_route, routing.hop_cost)
    assert gossip.encode_signed is records.encode_signed
    calls = run_simulation(small(cars=200, hours=1.0)).report["node_functions_called"]
    assert all(calls[name] > 0 for name in ("decide", "should_publish", "choose_range", "find_route",
                                            "hop_cost")), calls


def test_routed_regions_call_find_route_and_sampling_limits_it() -> None:
    scn = small(cars=300, hours=1.0)
    routed = run_simulation(scn).report
    sampled = run_simulation(replace(scn, routing=replace(scn.routing, sample_regions=1))).report
    assert routed["routing"]["capacity_bound_regions"] == 0
    assert sampled["routing"]["routed_regions"] == 1
    assert 0 < sampled["node_functions_called"]["find_route"] < routed["node_functions_called"]["find_route"]
    for r in (routed, sampled):
        t = r["totals"]
        assert t["requests"] == t["served"] + sum(t["failed"].values())


def test_gossip_uses_the_real_signed_record_size() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from idlefleet.protocols.records import encode_signed
    from tests.factories import capacity_record

    report = run_simulation(small(cars=200, hours=1.0)).report
    sizes = report["record_bytes"]
    key = Ed25519PrivateKey.generate()
    reference = len(encode_signed(capacity_record(key, blocks=(10, 22), model_id="m"), key))
    assert min(sizes.values()) <= reference + 64 and max(sizes.values()) >= reference - 64
    assert all(h["gossip_bytes_per_s_per_car"]["mean"] > 0 for h in report["hourly"])


def test_builtin_scenarios_load_and_bad_files_are_named_errors(tmp_path: Path) -> None:
    names = builtin_scenarios()
    assert {"city-night", "morning-rush", "regional-outage", "weekday"} <= set(names)
    for name in names:
        assert load_scenario(name).name == name
    assert load_scenario("morning-rush").events.rush_fraction == 0.4
    bad = tmp_path / "bad.toml"
    bad.write_text("cars = 10\n[fleet]\nregion_carz = 3\n")
    with pytest.raises(ScenarioError, match="region_carz"):
        load_scenario(str(bad))
    with pytest.raises(ScenarioError, match="departure_margin_s"):
        scenario_from_mapping({"policy": {"departure_margin_s": -1}})
    with pytest.raises(ScenarioError, match="hours"):
        scenario_from_mapping({"hours": "long"})
    with pytest.raises(ScenarioError, match="outage_kind"):
        replace(Scenario(), events=EventSpec(outage_kind="flood"))
    with pytest.raises(ScenarioError, match="no scenario"):
        load_scenario("no-such-scenario")


def test_cli_prints_json_and_text_and_writes_charts(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--cars", "120", "--hours", "1", "--seed", "3", "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cars"] == 120 and doc["seed"] == 3 and len(doc["hourly"]) == 1
    assert {"wall_s", "peak_rss_mb", "route_ms"} <= set(doc["timing"])
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["simulate", "--scenario", "regional-outage", "--cars", "120", "--hours", "1",
                 "--quiet", "--out", str(out)]) == 0
    assert "requests:" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.txt", "devices.png", "coverage.png",
                                               "requests.png", "gossip.png"}
    assert (out / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["simulate", "--scenario", "nope", "--quiet"]) == 2


def test_text_report_names_the_figures() -> None:
    text = to_text(run_simulation(small(cars=150, hours=1.0)))
    for needle in ("served", "failovers", "route finding", "battery floor violations: 0", "gossip"):
        assert needle in text


def test_the_simulator_imports_no_trio_and_no_libp2p() -> None:
    for path in sources("node/sim"):
        assert not imported_modules(path) & {"trio", "libp2p", "idlefleet.p2p"}, path


def test_the_memo_key_is_the_policy_inputs_and_a_missing_field_fails_loudly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from idlefleet.node.sim import owner
    from idlefleet.protocols import policy

    assert tuple(f.name for f in fields(policy.DecisionInputs)) == owner.INPUT_FIELDS
    # A field decide reads that the simulator does not compute: the first step raises, rather than
    # the memo reusing answers that ignore it.
    monkeypatch.setattr(owner, "INPUT_FIELDS", (*owner.INPUT_FIELDS, "new_condition"))
    with pytest.raises(RuntimeError, match="DecisionInputs has"):
        run_simulation(small(cars=50, hours=0.1))


def test_exact_mode_checks_the_vectorised_inputs_against_the_policys_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from idlefleet.node.sim import owner
    from idlefleet.node.sim.engine import Simulation

    real = owner.inputs

    def wrong(sim: Simulation, now: float) -> dict[str, Any]:
        cols = real(sim, now)
        cols["hot"] = ~cols["hot"]  # a field computed wrongly
        return cols

    monkeypatch.setattr(owner, "inputs", wrong)
    with pytest.raises(RuntimeError, match="!= decision_inputs"):
        run_simulation(small(cars=50, hours=0.1), exact=True)
