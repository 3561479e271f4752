"""Shared by the benchmarks: CPU accounting from /proc, and where a run keeps its files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks (fields 14, 15 of proc(5) stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def work_root(stack: contextlib.ExitStack, keep: Path | None) -> Path:
    """Where a run keeps its swarm's keys and logs: ``keep`` (kept), else a temp dir (removed)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return keep
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idlefleet-bench-")))
