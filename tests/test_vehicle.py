"""Vehicle state providers: simulated schedules, the daemon's JSON file, Linux sysfs, specs."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from idlefleet.node.vehicle.simulated import PROFILES, SimulatedVehicle
from idlefleet.node.vehicle.sources import JsonFileVehicle, SysfsVehicle
from idlefleet.node.vehicle.spec import make_provider
from idlefleet.node.vehicle.state import VehicleState, VehicleStateError
from idlefleet.protocols.errors import IdlefleetError

T0 = 1_718_000_000.0  # Monday 2024-06-10 06:13 UTC
HOUR = 3600.0
DAY = 86_400.0
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "vehicle_state.json"


def sample(v: SimulatedVehicle, hours: float, every_s: float) -> list[tuple[float, VehicleState]]:
    times = [v.start + i * every_s for i in range(int(hours * HOUR / every_s) + 1)]
    return [(t, v.read(t)) for t in times]


# -- simulated vehicle ---------------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_same_seed_profile_and_times_give_identical_states(profile: str) -> None:
    a = sample(SimulatedVehicle(3, profile, T0), 48, 600)
    b = sample(SimulatedVehicle(3, profile, T0), 48, 600)
    c = sample(SimulatedVehicle(4, profile, T0), 48, 600)
    assert a == b
    assert a != c


def test_state_does_not_depend_on_how_often_it_was_read() -> None:
    polled = SimulatedVehicle(5, "taxi", T0)
    for i in range(1, 500):
        polled.read(T0 + i * 97.3)
    end = T0 + 3 * DAY + 12.5
    assert polled.read(end) == SimulatedVehicle(5, "taxi", T0).read(end)


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_battery_and_thermal_stay_bounded_over_a_week(profile: str, seed: int) -> None:
    v = SimulatedVehicle(seed, profile, T0)
    limit = PROFILES[profile].limit_c
    for _, s in sample(v, 7 * 24, 900):
        assert 0.0 <= s.battery_soc <= 1.0
        assert s.charging_kw >= 0.0
        assert -10.0 < s.thermal_headroom_c < limit + 10.0


def test_battery_hits_zero_and_one_but_never_leaves_the_range() -> None:
    empty = SimulatedVehicle(1, "taxi", T0, initial_soc=0.0, battery_kwh=5.0)
    full = SimulatedVehicle(1, "parked", T0, initial_soc=0.99)
    socs = [s.battery_soc for _, s in sample(empty, 24, 300)]
    assert min(socs) == 0.0
    end = full.read(T0 + 6 * HOUR)
    assert end.battery_soc == 1.0
    assert end.charging_kw == 0.0  # full: nothing flows although plugged in
    assert end.plugged_in


def test_drains_while_driving_and_charges_while_plugged() -> None:
    v = SimulatedVehicle(2, "commuter", T0, initial_soc=0.5)
    states = sample(v, 3 * 24, 300)
    drove = charged = 0
    for (_, a), (_, b) in itertools.pairwise(states):
        if not a.parked and not b.parked:
            assert b.battery_soc < a.battery_soc
            assert a.charging_kw == 0.0
            drove += 1
        if a.plugged_in and b.plugged_in and a.battery_soc < 1.0:
            assert b.battery_soc > a.battery_soc
            assert a.charging_kw > 0.0
            charged += 1
        if not a.plugged_in:
            assert a.charging_kw == 0.0
    assert drove > 5
    assert charged > 5


def test_charging_tapers_above_80_percent() -> None:
    v = SimulatedVehicle(0, "parked", T0, initial_soc=0.3, charger_kw=11.0)
    powers = {round(s.battery_soc, 1): s.charging_kw for _, s in sample(v, 8, 120)}
    assert powers[0.5] == pytest.approx(11.0)
    assert 0 < powers[0.9] < 11.0


@pytest.mark.parametrize("seed", range(6))
def test_commuter_is_parked_most_hours_and_drives_on_weekdays(seed: int) -> None:
    v = SimulatedVehicle(seed, "commuter", T0)
    states = sample(v, 7 * 24, 300)
    hourly = states[:: int(HOUR / 300)]
    assert sum(s.parked for _, s in hourly) >= 0.8 * len(hourly)
    monday = [s for t, s in states if t < T0 + 15 * HOUR]
    assert any(not s.parked for s in monday)


@pytest.mark.parametrize("profile", ["commuter", "taxi", "phone", "laptop"])
def test_parked_times_are_consistent_and_departure_is_in_the_future(profile: str) -> None:
    for seed in range(3):
        known = 0
        for t, s in sample(SimulatedVehicle(seed, profile, T0), 3 * 24, 600):
            if not s.parked:
                assert s.parked_since is None
                assert not s.plugged_in
                continue
            assert s.parked_since is not None
            assert s.parked_since <= t
            assert s.expected_departure is not None
            assert s.expected_departure > t
            known += 1
        assert known > 0


def test_always_parked_profile_has_no_departure() -> None:
    for t, s in sample(SimulatedVehicle(9, "parked", T0), 48, 3600):
        assert s.parked
        assert s.plugged_in
        assert s.expected_departure is None
        assert s.parked_since is not None
        assert s.parked_since <= t


def test_taxi_drives_most_of_the_day_with_short_parks() -> None:
    states = sample(SimulatedVehicle(7, "taxi", T0), 7 * 24, 300)
    driving = sum(not s.parked for _, s in states) / len(states)
    assert driving > 0.35
    daytime_parks = [
        s.expected_departure - s.parked_since
        for _, s in states
        if s.parked and s.expected_departure is not None and s.parked_since is not None
    ]
    assert min(daytime_parks) < 0.5 * HOUR


def test_time_scale_runs_the_simulated_clock_faster() -> None:
    fast = SimulatedVehicle(3, "commuter", T0, time_scale=60)
    slow = SimulatedVehicle(3, "commuter", T0)
    f = fast.read(T0 + 600)  # ten real minutes = ten simulated hours
    s = slow.read(T0 + 600 * 60)
    assert f.battery_soc == pytest.approx(s.battery_soc)
    assert f.parked == s.parked
    if s.expected_departure is not None:
        assert f.expected_departure is not None
        # Timestamps come back on the caller's clock.
        assert f.expected_departure - T0 == pytest.approx((s.expected_departure - T0) / 60)


def test_read_rejects_time_going_backwards_or_before_start() -> None:
    v = SimulatedVehicle(1, "phone", T0)
    v.read(T0 + 100)
    with pytest.raises(ValueError, match="backwards"):
        v.read(T0 + 99)
    with pytest.raises(ValueError, match="before the simulation start"):
        SimulatedVehicle(1, "phone", T0).read(T0 - 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"profile": "bus"}, "unknown profile"),
        ({"time_scale": 0}, "time_scale"),
        ({"battery_kwh": -1.0}, "battery_kwh"),
        ({"initial_soc": 1.5}, "initial_soc"),
    ],
)
def test_bad_simulation_options(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"seed": 0, "profile": "commuter", "start": T0, **kwargs}
    with pytest.raises(ValueError, match=match):
        SimulatedVehicle(**args)


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("seed", range(4))
def test_schedule_covers_every_day_without_gaps(profile: str, seed: int) -> None:
    v = SimulatedVehicle(seed, profile, T0)
    day0 = math.floor(T0 / DAY)
    for day in range(day0 - 1, day0 + 30):
        legs = v._legs(day)
        assert legs[0].start == day * DAY
        assert legs[-1].end == (day + 1) * DAY
        for a, b in itertools.pairwise(legs):
            assert a.end == b.start
            assert a.start < a.end


# -- JSON file -----------------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "battery_soc": 0.5,
    "plugged_in": True,
    "charging_kw": 7.2,
    "thermal_headroom_c": 30.0,
    "parked": True,
    "parked_since": T0 - HOUR,
    "expected_departure": T0 + HOUR,
}


def write(path: Path, data: object, mtime: float = T0) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    os.utime(path, (mtime, mtime))


def test_example_file_is_valid() -> None:
    state = JsonFileVehicle(EXAMPLE).read(T0)
    assert state.plugged_in
    assert 0 <= state.battery_soc <= 1


def test_json_file_valid(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, GOOD)
    v = JsonFileVehicle(path)
    assert v.read(T0 + 1) == VehicleState(**GOOD)
    assert v.last_error is None
    assert not v.stale
    assert v.name == f"file:{path}"


def test_json_file_update_is_picked_up_by_mtime(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, {**GOOD, "battery_soc": 0.5})
    v = JsonFileVehicle(path)
    assert v.read(T0).battery_soc == 0.5
    write(path, {**GOOD, "battery_soc": 0.6}, mtime=T0 + 5)
    assert v.read(T0 + 5).battery_soc == 0.6


def test_json_file_is_not_reparsed_when_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, {**GOOD, "battery_soc": 0.5})
    v = JsonFileVehicle(path)
    v.read(T0)
    write(path, {**GOOD, "battery_soc": 0.6})  # same size, same mtime: treated as unchanged
    assert v.read(T0 + 1).battery_soc == 0.5


@pytest.mark.parametrize(
    "bad", ["{not json", '{"battery_soc": 0.7, "plug', "", "\xff\xfe", "[1, 2]"]
)
def test_json_garbage_keeps_last_good_state(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "state.json"
    write(path, GOOD)
    v = JsonFileVehicle(path)
    good = v.read(T0)
    write(path, bad, mtime=T0 + 5)
    assert v.read(T0 + 5) == good
    assert v.last_error
    write(path, {**GOOD, "battery_soc": 0.9}, mtime=T0 + 10)
    assert v.read(T0 + 10).battery_soc == 0.9
    assert v.last_error is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"battery_soc": 1.5}, "battery_soc"),
        ({"battery_soc": -0.01}, "battery_soc"),
        ({"battery_soc": True}, "battery_soc"),
        ({"battery_soc": "0.5"}, "battery_soc"),
        ({"charging_kw": -1}, "charging_kw"),
        ({"charging_kw": 351}, "charging_kw"),
        ({"thermal_headroom_c": -101}, "thermal_headroom_c"),
        ({"parked_since": 1e11}, "parked_since"),
        ({"thermal_headroom_c": "hot"}, "thermal_headroom_c"),
        ({"plugged_in": 1}, "plugged_in"),
        ({"parked": "yes"}, "parked"),
        ({"parked": False}, "parked_since"),
        ({"expected_departure": -5}, "expected_departure"),
        ({"battery_soc": None}, "battery_soc"),
    ],
)
def test_json_range_and_type_violations_are_rejected(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    path = tmp_path / "state.json"
    write(path, {**GOOD, **change})
    v = JsonFileVehicle(path)
    with pytest.raises(VehicleStateError, match=field):
        v.read(T0)
    assert v.last_error is not None
    assert field in v.last_error


def test_json_missing_field_and_nan_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    missing = {k: v for k, v in GOOD.items() if k != "parked"}
    write(path, missing)
    with pytest.raises(VehicleStateError, match="missing field 'parked'"):
        JsonFileVehicle(path).read(T0)
    write(path, json.dumps(GOOD).replace("0.5", "NaN"), mtime=T0 + 1)
    with pytest.raises(VehicleStateError, match="NaN"):
        JsonFileVehicle(path).read(T0)


def test_json_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    v = JsonFileVehicle(path)
    with pytest.raises(VehicleStateError, match="no valid state yet") as info:
        v.read(T0)
    assert isinstance(info.value, IdlefleetError)
    write(path, GOOD)
    good = v.read(T0)
    path.unlink()
    assert v.read(T0 + 1) == good
    assert v.last_error is not None
    assert "cannot read" in v.last_error


def test_json_stale_after_the_file_stops_changing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, GOOD, mtime=T0)
    v = JsonFileVehicle(path, stale_after=60)
    v.read(T0 + 30)
    assert not v.stale
    v.read(T0 + 61)
    assert v.stale
    write(path, GOOD | {"battery_soc": 0.4}, mtime=T0 + 70)
    v.read(T0 + 71)
    assert not v.stale
    assert v.changed_at == pytest.approx(T0 + 70)
    write(path, "garbage", mtime=T0 + 120)  # changes, but to nothing usable
    v.read(T0 + 140)
    assert v.stale


# -- sysfs ---------------------------------------------------------------------------------------


def supply(root: Path, name: str, **files: object) -> None:
    d = root / "sys" / "class" / "power_supply" / name
    d.mkdir(parents=True)
    for key, value in files.items():
        (d / key).write_text(f"{value}\n")


def zone(root: Path, index: int, temp_mc: int, *trips: tuple[str, int]) -> None:
    d = root / "sys" / "class" / "thermal" / f"thermal_zone{index}"
    d.mkdir(parents=True)
    (d / "temp").write_text(f"{temp_mc}\n")
    for i, (kind, temp) in enumerate(trips):
        (d / f"trip_point_{i}_type").write_text(f"{kind}\n")
        (d / f"trip_point_{i}_temp").write_text(f"{temp}\n")


def test_sysfs_laptop_discharging(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity=64, status="Discharging", power_now=9_000_000)
    supply(tmp_path, "AC", type="Mains", online=0)
    zone(tmp_path, 0, 50_000, ("active", 60_000), ("passive", 80_000), ("critical", 100_000))
    v = SysfsVehicle(tmp_path, start=T0 - 10)
    s = v.read(T0)
    assert s == VehicleState(0.64, False, 0.0, 30.0, True, T0 - 10, None)
    assert v.last_error is None
    assert v.name == f"sysfs:{tmp_path}"


def test_sysfs_charging_from_current_and_voltage(tmp_path: Path) -> None:
    battery = {"capacity": 40, "current_now": 2_000_000, "voltage_now": 12_000_000}
    supply(tmp_path, "BAT0", type="Battery", status="Charging", **battery)
    supply(tmp_path, "ADP1", type="Mains", online=1)
    s = SysfsVehicle(tmp_path).read(T0)
    assert s.plugged_in
    assert s.charging_kw == pytest.approx(0.024)  # 2 A x 12 V
    assert s.parked_since == T0  # defaults to the first read


def test_sysfs_ac_online_battery_full(tmp_path: Path) -> None:
    supply(tmp_path, "BAT1", type="Battery", capacity=100, status="Full", power_now=0)
    supply(tmp_path, "usb", type="USB", online=1)
    s = SysfsVehicle(tmp_path).read(T0)
    assert s.plugged_in
    assert s.battery_soc == 1.0
    assert s.charging_kw == 0.0


def test_sysfs_phone_without_adapter_infers_plug_from_status(tmp_path: Path) -> None:
    supply(
        tmp_path, "battery", type="Battery", capacity=55, status="Charging", power_now=-5_000_000
    )
    s = SysfsVehicle(tmp_path).read(T0)
    assert s.plugged_in
    assert s.charging_kw == pytest.approx(0.005)


def test_sysfs_two_batteries_weighted_and_peripherals_ignored(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity=100, energy_full=30_000_000, status="Full")
    supply(tmp_path, "BAT1", type="Battery", capacity=0, energy_full=10_000_000, status="Unknown")
    supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", capacity=5)
    s = SysfsVehicle(tmp_path).read(T0)
    assert s.battery_soc == pytest.approx(0.75)


def test_sysfs_desktop_without_battery(tmp_path: Path) -> None:
    (tmp_path / "sys" / "class" / "power_supply").mkdir(parents=True)
    s = SysfsVehicle(tmp_path).read(T0)
    assert (s.battery_soc, s.plugged_in, s.charging_kw) == (1.0, True, 0.0)
    assert s.thermal_headroom_c == SysfsVehicle.NO_ZONE_HEADROOM_C


def test_sysfs_thermal_headroom_is_min_over_zones(tmp_path: Path) -> None:
    zone(tmp_path, 0, 50_000, ("passive", 80_000), ("critical", 100_000))  # 30
    zone(tmp_path, 1, 70_000)  # no trips: default 90 -> 20
    zone(tmp_path, 2, 40_000, ("hot", 0), ("critical", 105_000))  # disabled trip skipped: 65
    zone(tmp_path, 3, 99_000, ("hot", 95_000))  # over the limit -> -4
    assert SysfsVehicle(tmp_path).read(T0).thermal_headroom_c == pytest.approx(-4.0)
    (tmp_path / "sys/class/thermal/thermal_zone3/temp").write_text("garbage\n")
    v = SysfsVehicle(tmp_path)
    assert v.read(T0).thermal_headroom_c == pytest.approx(20.0)
    assert v.last_error is not None
    assert "thermal_zone3" in v.last_error


def test_sysfs_unreadable_battery_is_reported(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", status="Discharging")
    v = SysfsVehicle(tmp_path)
    v.read(T0)
    assert v.last_error is not None
    assert "BAT0" in v.last_error


def test_sysfs_root_without_sysfs_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no sys/class/power_supply"):
        SysfsVehicle(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no sys/class/power_supply"):
        make_provider(f"sysfs:{tmp_path}", now=T0)


def test_sysfs_that_disappears_before_the_first_read_raises(tmp_path: Path) -> None:
    (tmp_path / "sys" / "class" / "thermal").mkdir(parents=True)
    v = SysfsVehicle(tmp_path)
    (tmp_path / "sys" / "class" / "thermal").rmdir()
    with pytest.raises(VehicleStateError, match="no sysfs"):
        v.read(T0)


# -- specs ---------------------------------------------------------------------------------------


def test_make_provider_good_specs(tmp_path: Path) -> None:
    sim = make_provider("sim:commuter:seed=3", now=T0)
    assert isinstance(sim, SimulatedVehicle)
    assert (sim.profile, sim.seed, sim.time_scale, sim.start) == ("commuter", 3, 1.0, T0)
    fast = make_provider("sim:taxi:seed=7:scale=60", now=T0)
    assert isinstance(fast, SimulatedVehicle)
    assert (fast.profile, fast.seed, fast.time_scale) == ("taxi", 7, 60.0)
    assert fast.name == "sim:taxi:seed=7:scale=60"
    f = make_provider("file:/path/state.json", now=T0)
    assert isinstance(f, JsonFileVehicle)
    assert f.path == "/path/state.json"
    s = make_provider("sysfs", now=T0)
    assert isinstance(s, SysfsVehicle)
    assert s.root == "/"
    (tmp_path / "sys" / "class" / "power_supply").mkdir(parents=True)
    custom = make_provider(f"sysfs:{tmp_path}", now=T0)
    assert isinstance(custom, SysfsVehicle)
    assert custom.root == str(tmp_path)
    supply(tmp_path, "AC", type="Mains", online=1)
    assert custom.read(T0 + 5).parked_since == T0


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "sim",
        "sim:",
        "sim:bus:seed=1",
        "sim:taxi:seed=x",
        "sim:taxi:seed",
        "sim:taxi:speed=3",
        "sim:taxi:scale=0",
        "sim:taxi:scale=-2",
        "file:",
        "usb:/dev/x",
        "SIM:taxi",
    ],
)
def test_make_provider_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="bad vehicle spec"):
        make_provider(spec, now=T0)


def test_start_at_the_epoch_with_time_scale() -> None:
    v = SimulatedVehicle(1, "commuter", 0.0, time_scale=60)
    for i in range(0, 3000, 7):
        s = v.read(float(i))
        assert s.parked_since is None or s.parked_since >= 0.0


# -- physics: one vehicle (floats) and a fleet (arrays) run the same functions ------------------


def test_physics_scalar_and_array_paths_agree_on_a_grid() -> None:
    import numpy as np

    from idlefleet.node.vehicle import physics

    grid = list(itertools.product(
        (0.0, 0.3, 0.8, 0.85, 0.99, 1.0),  # soc
        (0.0, 0.018, 7.4, 50.0),  # charger kW
        (False, True),  # parked
        (False, True),  # power out
        (0.0, 3 * HOUR, 7.5 * HOUR, 12 * HOUR, 17.9 * HOUR, DAY + 5),  # time of day
        (-5.0, 20.0, 60.0),  # temperature
    ))
    soc, charger, parked, out, t, temp = (np.array(col) for col in zip(*grid, strict=True))
    plug = physics.plug_kw(parked, charger, out)
    charge = physics.charge_kw(plug, soc)
    kw = physics.battery_kw(parked, plug, charge, 12.0, 0.03, np.where(parked, 1.0, 0.0))
    new_soc = physics.soc_after(soc, kw, 120.0, 75.0)
    target = physics.target_temp_c(t, ambient_c=15.0, diurnal_c=6.0, idle_rise_c=2.0, driving=~parked,
                                   drive_rise_c=25.0, unplugged=plug <= 0, solar_c=12.0, charge=charge,
                                   charge_rise_c=20.0, charge_ref_kw=50.0, serve_rise_c=30.0, util=0.5)
    relaxed = physics.relax_c(temp, target, 120.0, 900.0)
    for k, (s, c, p, o, tk, tc) in enumerate(grid):
        pk = physics.plug_kw(p, c, o)
        ck = physics.charge_kw(pk, s)
        bk = physics.battery_kw(p, pk, ck, 12.0, 0.03, 1.0 if p else 0.0)
        tg = physics.target_temp_c(tk, ambient_c=15.0, diurnal_c=6.0, idle_rise_c=2.0, driving=not p,
                                   drive_rise_c=25.0, unplugged=pk <= 0, solar_c=12.0, charge=ck,
                                   charge_rise_c=20.0, charge_ref_kw=50.0, serve_rise_c=30.0, util=0.5)
        scalars = (pk, ck, bk, physics.soc_after(s, bk, 120.0, 75.0), tg)
        assert all(type(x) is float for x in scalars), scalars  # a float in gives a float out
        # + - * / and comparisons round alike in numpy and math: equal to the last bit
        assert scalars == (plug[k], charge[k], kw[k], new_soc[k], target[k])
        # exp may differ by one unit in the last place between math and numpy
        assert physics.relax_c(tc, tg, 120.0, 900.0) == pytest.approx(relaxed[k], rel=1e-15, abs=1e-12)
    assert ((new_soc >= 0.0) & (new_soc <= 1.0)).all()
    assert (charge <= plug).all() and (charge[soc >= 1.0] == 0).all()
