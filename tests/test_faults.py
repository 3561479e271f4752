"""The chaos fault injector: off unless deliberately enabled, and each kind detectably wrong."""

from __future__ import annotations

import numpy as np
import pytest

from idlefleet.node.faults import ENV_GUARD, FaultInjector, parse_fault
from idlefleet.protocols.errors import ConfigError
from idlefleet.protocols.verification import TOLERANCE, row_mismatch

ON = {ENV_GUARD: "yes"}


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
