"""Deliberately wrong stage outputs: test tooling for verification and chaos runs. NEVER for real use.

A node started with ``--chaos-fault KIND[:RATE]`` returns wrong hidden states on a fraction
``RATE`` (default 1.0) of its steps, the way a buggy, lazy or cheating car would:

- ``corrupt``: add noise (5% of each row's largest magnitude) to the output;
- ``skip``: return the step's input unchanged, as if no block ran;
- ``stale``: return the previous step's output again (when its shape fits; else ``corrupt``).

Turning it on takes two deliberate acts: the flag, and ``IDLEFLEET_CHAOS=yes`` in the node's
environment (``idlefleet swarm --faulty`` sets both for the nodes it marks faulty). A node with a
fault says so loudly at start-up and in its event log.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from idlefleet.protocols.errors import ConfigError

KINDS = ("corrupt", "skip", "stale")
DEFAULT_KIND = "corrupt"  # idlefleet swarm --faulty K without a kind
ENV_GUARD = "IDLEFLEET_CHAOS"


def parse_fault(spec: str) -> tuple[str, float]:
    """``"corrupt"`` or ``"skip:0.5"`` -> (kind, rate). Raises ConfigError."""
    kind, _, rate_text = spec.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"chaos fault must be one of {', '.join(KINDS)}[:RATE], got {spec!r}")
    try:
        rate = float(rate_text) if rate_text else 1.0
    except ValueError:
        raise ConfigError(f"chaos fault rate must be a number in (0, 1], got {rate_text!r}") from None
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"chaos fault rate must be in (0, 1], got {rate}")
    return kind, rate


class FaultInjector:
    """Applies one fault kind to a fraction of steps; deterministic for a given seed."""

    def __init__(self, spec: str, *, seed: int = 0, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        if env.get(ENV_GUARD) != "yes":
            raise ConfigError(f"--chaos-fault makes this node return WRONG outputs; it is test tooling and "
                              f"needs {ENV_GUARD}=yes in the environment as well")
        self.kind, self.rate = parse_fault(spec)
        self._rng = np.random.default_rng(seed)
        self._previous: npt.NDArray[np.float32] | None = None
        self.faulted = 0  # steps this injector falsified

    def apply(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The output to send for input ``x`` whose true output is ``y``."""
        previous, self._previous = self._previous, y
        if self._rng.random() >= self.rate:
            return y
        self.faulted += 1
        if self.kind == "skip":
            return x.copy()
        if self.kind == "stale" and previous is not None and previous.shape == y.shape:
            return previous.copy()
        scale = np.abs(y).max(axis=1, keepdims=True)
        noise = self._rng.standard_normal(y.shape).astype(np.float32)
        out: npt.NDArray[np.float32] = (y + 0.05 * scale * noise).astype(np.float32)
        return out
