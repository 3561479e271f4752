"""Child processes that die with their parent, however the parent ends.

Every process idlefleet starts (``idlefleet swarm``'s nodes, the ``generate`` client it runs, the
nodes tests and benchmarks start) is tied to the process that started it in two ways:

- **a lifeline pipe**: the parent holds the write end of one pipe for its whole life and never
  writes to it; each child gets the read end (``IDLEFLEET_LIFELINE_FD``). When the parent process
  ends — exit, SIGTERM, SIGKILL — the kernel closes the write end and every child reads EOF.
  ``idlefleet node`` watches it (``node.run``) and then leaves as on SIGTERM: drain, ``offline``,
  exit. Unlike the death signal below, this follows the parent *process*, not the thread that
  spawned the child.
- **``PR_SET_PDEATHSIG``** (Linux): the child gets SIGTERM when its parent dies. The kernel ties it
  to the parent *thread* that forked, so it is set only when spawning from the main thread (a
  worker thread that exits would kill the child early). It covers children that do not watch the
  lifeline; a parent that died before the child set it is caught by a ``getppid`` check.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

LIFELINE_ENV = "IDLEFLEET_LIFELINE_FD"
PR_SET_PDEATHSIG = 1

_lock = threading.Lock()
_lifeline: tuple[int, int] | None = None  # (read end, write end), kept open for the process's life
_libc: Any = None


def _lifeline_read_end() -> int:
    global _lifeline
    with _lock:
        if _lifeline is None or _lifeline[0] < 0:
            _lifeline = os.pipe()  # both ends close-on-exec: a child gets the read end via pass_fds
        return _lifeline[0]


def _death_signal_preexec(sig: int) -> Callable[[], None] | None:
    global _libc
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc, parent = _libc, os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no locks, no allocation-heavy work
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return preexec


def tied_popen_kwargs(env: Mapping[str, str] | None = None, *,
                      death_signal: int = signal.SIGTERM) -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` / ``trio.run_process`` that tie the child to this
    process: ``env`` (default ``os.environ``) plus the lifeline fd, ``pass_fds`` and, from the main
    thread on Linux, a ``preexec_fn`` arming ``PR_SET_PDEATHSIG``."""
    fd = _lifeline_read_end()
    kwargs: dict[str, Any] = {"env": {**(os.environ if env is None else env), LIFELINE_ENV: str(fd)},
                              "pass_fds": (fd,), "close_fds": True}
    preexec = _death_signal_preexec(death_signal)
    if preexec is not None:
        kwargs["preexec_fn"] = preexec
    return kwargs


def lifeline_fd(environ: Mapping[str, str] = os.environ) -> int | None:
    """The lifeline fd this process was given (None: not started by an idlefleet launcher, or the
    variable does not name an open pipe)."""
    raw = environ.get(LIFELINE_ENV)
    if raw is None or not raw.isdigit():
        return None
    fd = int(raw)
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return fd
    return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie that nobody reaped counts as gone)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
