"""Processes die with their parent (issue 8, finding 7): the lifeline pipe and PR_SET_PDEATHSIG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from idlefleet.node.cli.procs import LIFELINE_ENV, lifeline_fd, pid_alive, tied_popen_kwargs
from idlefleet.node.cli.run import _watch_lifeline

# A launcher that starts one tied child (``sleep``), prints its pid, then waits to be killed.
LAUNCHER = """
import subprocess, sys, time
from idlefleet.node.cli.procs import tied_popen_kwargs
child = subprocess.Popen(["sleep", "120"], **tied_popen_kwargs())
print(child.pid, flush=True)
time.sleep(120)
"""


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_tied_child_dies_when_its_launcher_is_sigkilled() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True,
                                **tied_popen_kwargs())
    child = 0
    try:
        assert launcher.stdout is not None
        child = int(launcher.stdout.readline())
        assert pid_alive(child)
        launcher.kill()
        launcher.wait(timeout=10)
        assert wait_gone(child)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_tied_kwargs_pass_only_the_lifeline_read_end() -> None:
    kwargs = tied_popen_kwargs({"A": "1"})
    fd = int(kwargs["env"][LIFELINE_ENV])
    assert kwargs["pass_fds"] == (fd,)
    assert kwargs["env"]["A"] == "1"
    assert lifeline_fd(kwargs["env"]) == fd
    assert lifeline_fd({LIFELINE_ENV: "x"}) is None
    assert lifeline_fd({}) is None


async def test_a_node_leaves_when_its_lifeline_closes() -> None:
    read, write = os.pipe()
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_lifeline, read, stop)
            await trio.sleep(0.05)
            assert not stop.is_set()
            os.close(write)  # what the kernel does when the launcher ends, however it ends
            write = -1
            with trio.fail_after(5):
                await stop.wait()
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
