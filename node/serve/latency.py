"""Step latency as a fixed-bucket histogram: the stage server observes it, ``/metrics`` exports it."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class LatencyHistogram:
    """Fixed-bucket histogram (no dependency, O(1) memory) of step latencies in seconds."""

    bounds: Sequence[float] = STEP_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS_S) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
