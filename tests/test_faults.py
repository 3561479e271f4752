"""The chaos fault injector (test tooling): off unless deliberately enabled twice (``--chaos-fault``
and ``IDLEFLEET_CHAOS=yes``), and each kind detectably wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

from idlefleet.node.config import NodeConfig, load_config
from idlefleet.node.faults import ENV_GUARD, FaultInjector, parse_fault
from idlefleet.node.runtime.node import open_node
from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.verification import TOLERANCE, row_mismatch

ON = {ENV_GUARD: "yes"}
IDLEFLEET = [sys.executable, "-m", "idlefleet.node.cli"]


def rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 576)).astype(np.float32)


def test_needs_the_environment_guard() -> None:
    with pytest.raises(ConfigError, match=ENV_GUARD):
        FaultInjector("corrupt", environ={})
    with pytest.raises(ConfigError, match=ENV_GUARD):
        FaultInjector("corrupt", environ={ENV_GUARD: "1"})


@pytest.mark.parametrize("spec", ["", "noise", "corrupt:0", "corrupt:2", "skip:x", "stale:nan"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_fault(spec)


@pytest.mark.parametrize("kind", ["corrupt", "skip", "stale"])
def test_every_fault_is_outside_every_tolerance(kind: str) -> None:
    fault = FaultInjector(kind, environ=ON)
    for step in range(5):
        x, y = rows(step), rows(100 + step) * 10
        out = fault.apply(x, y)
        if kind == "stale" and step == 0:
            assert row_mismatch(out, y).max() > TOLERANCE["int8"]  # nothing to replay yet: noise
        else:
            assert row_mismatch(out, y).min() > TOLERANCE["int8"], (kind, step)
    assert fault.faulted == 5


def test_rate_is_a_fraction_of_steps_deterministically() -> None:
    def run() -> int:
        fault = FaultInjector("corrupt:0.25", seed=3, environ=ON)
        for i in range(2000):
            fault.apply(rows(i), rows(i + 1))
        return fault.faulted

    assert run() == run()
    assert 400 < run() < 600


# --- the node option ------------------------------------------------------------------------------

def test_node_flag_is_refused_without_the_environment_guard(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_GUARD}
    data_dir = tmp_path / "data"
    out = subprocess.run([*IDLEFLEET, "node", "--data-dir", str(data_dir), "--chaos-fault", "corrupt"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    assert f"{ENV_GUARD}=yes" in out.stderr and "test tooling" in out.stderr
    assert not data_dir.exists()  # no node started: no identity, no logs
    bad = subprocess.run([*IDLEFLEET, "node", "--data-dir", str(data_dir), "--chaos-fault", "evil:2"],
                         capture_output=True, text=True, timeout=60, env={**env, ENV_GUARD: "yes"})
    assert bad.returncode == 2 and "corrupt, skip, stale" in bad.stderr


def test_config_key_and_kinds(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('chaos_fault = "skip:0.5"\n')
    assert load_config(toml).chaos_fault == "skip:0.5"
    assert NodeConfig().chaos_fault is None  # off unless asked for
    for spec in ("corrupt:0", "stale:1.5", "lazy", 3):
        with pytest.raises(ConfigError):
            NodeConfig(chaos_fault=spec)  # type: ignore[arg-type]


async def test_node_passes_its_fault_to_the_stage_server(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_GUARD, "yes")
    events = tmp_path / "events.jsonl"
    config = NodeConfig(key_file=tmp_path / "node.key", vehicle="sim:parked:seed=1", consent=True,
                        memory_budget_mb=20, event_log=events, chaos_fault="stale:0.5")
    async with open_node(config) as node:
        with trio.fail_after(60):
            while node.hosting is None or node.hosting.server is None:
                await trio.sleep(0.1)
        assert node.fault is not None and (node.fault.kind, node.fault.rate) == ("stale", 0.5)
        assert node.hosting.server.fault is node.fault
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    assert {"event": "chaos_fault", "kind": "stale", "rate": 0.5} in [
        {k: e[k] for k in ("event", "kind", "rate") if k in e} for e in logged]


# --- idlefleet swarm --faulty ---------------------------------------------------------------------

def test_swarm_faulty_spec_picks_the_last_nodes_never_the_bootstrap() -> None:
    from idlefleet.node.cli.swarm import parse_faulty

    assert parse_faulty("2", 6) == {4: "corrupt", 5: "corrupt"}
    assert parse_faulty("1:stale:0.5", 3) == {2: "stale:0.5"}
    for spec, n in (("0", 3), ("3", 3), ("x", 3), ("1:evil", 3), ("1:skip:7", 3)):
        with pytest.raises(ConfigError):
            parse_faulty(spec, n)
    out = subprocess.run([*IDLEFLEET, "swarm", "--nodes", "2", "--faulty", "2"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "bootstrap node" in out.stderr  # refused before any node starts
