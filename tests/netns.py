"""Network namespaces for tests: a LAN (a bridge), hosts on it, a home network behind a NAT.

Everything is created under names unique to this test process (``if<pid><tag>-...``) inside
namespaces of its own: the machine's own network (the root namespace) is never touched. Use
``NetLab`` as a context manager: leaving it deletes every namespace it created (their veths and
bridges go with them); stop the processes running in them first.

Needs root and ``ip`` (iproute2); the NAT needs ``iptables`` too. ``require`` skips the test with
a clear message when they cannot be had (CI installs them in ``.ci/run`` and runs as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from types import TracebackType

import pytest

IP_TIMEOUT_S = 10.0


def require(*tools: str) -> None:
    """Skip unless we are root and ``tools`` are installed; try ``apt-get install`` once if not."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("network namespace tests need root on Linux")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and shutil.which("apt-get"):
        packages = {"ip": "iproute2", "iptables": "iptables"}
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["apt-get", "install", "-y", *(packages.get(t, t) for t in missing)],
                           capture_output=True, timeout=600, check=False,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install -y iproute2 iptables; .ci/run does)")


class NetLab:
    """Namespaces, bridges and veth pairs created by this test, deleted on exit."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"if{os.getpid() % 100000}{tag}"
        self.namespaces: list[str] = []

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT_S, check=False)
        self.namespaces.clear()

    def ip(self, *args: str, ns: str | None = None) -> str:
        """Run ``ip ARGS`` (in ``ns``); raises CalledProcessError with ip's message."""
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return done.stdout

    def run(self, ns: str, *cmd: str) -> str:
        """Run ``cmd`` inside ``ns`` (bounded); raises CalledProcessError."""
        done = subprocess.run(self.exec_prefix(ns) + list(cmd), capture_output=True, text=True,
                              timeout=IP_TIMEOUT_S, check=False)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return done.stdout

    def exec_prefix(self, ns: str) -> list[str]:
        """Prefix a command with this to run it in ``ns`` (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", ns]

    def namespace(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        self.ip("netns", "add", ns)
        self.namespaces.append(ns)
        self.ip("link", "set", "lo", "up", ns=ns)
        return ns

    def switch(self, name: str) -> str:
        """A namespace holding one bridge ``br0`` (multicast flooded: no snooping)."""
        ns = self.namespace(name)
        self.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=ns)
        self.ip("link", "set", "br0", "up", ns=ns)
        return ns

    def plug(self, ns: str, switch: str, cidr: str, *, ifname: str = "eth0",
             gateway: str | None = None) -> str:
        """Connect ``ns`` to ``switch``'s bridge with address ``cidr`` on ``ifname``; returns the IP."""
        port = f"p{len(self.namespaces)}{ifname}"[:15]
        self.ip("link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns, ns=switch)
        self.ip("link", "set", port, "master", "br0", ns=switch)
        self.ip("link", "set", port, "up", ns=switch)
        self.ip("addr", "add", cidr, "dev", ifname, ns=ns)
        self.ip("link", "set", ifname, "multicast", "on", "up", ns=ns)
        if gateway:
            self.ip("route", "add", "default", "via", gateway, ns=ns)
        return cidr.split("/")[0]

    def link(self, a: str, a_cidr: str, b: str, b_cidr: str, *, a_if: str, b_if: str) -> None:
        """A point-to-point veth between namespaces ``a`` and ``b``."""
        self.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b, ns=a)
        self.ip("addr", "add", a_cidr, "dev", a_if, ns=a)
        self.ip("addr", "add", b_cidr, "dev", b_if, ns=b)
        self.ip("link", "set", a_if, "up", ns=a)
        self.ip("link", "set", b_if, "up", ns=b)

    def masquerade(self, router: str, out_if: str, *, silent: bool = False,
                   random_ports: bool = False) -> None:
        """Make ``router`` a NAT: forward, and rewrite sources leaving on ``out_if`` (a home router:
        inside hosts reach out, nothing outside can open a connection in). Packets that belong to
        a connection an inside host opened (conntrack: its replies, and a SYN crossing its own
        outbound SYN, i.e. TCP simultaneous open) still come in.

        ``silent``: a connection attempt to the router's own outside address is dropped rather
        than refused with a reset (so a hole punching SYN that arrives a moment before the inside
        host's own SYN went out is retransmitted, not fatal), as home routers do.

        ``random_ports``: outgoing connections get a random outside port (``--random-fully``), as
        carrier-grade NATs do, instead of keeping the inside port where it is free: nobody can
        predict where to reach an inside host, so hole punching cannot work."""
        self.run(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.run(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", out_if, "-j", "MASQUERADE",
                 *(["--random-fully"] if random_ports else []))
        self.run(router, "iptables", "-A", "FORWARD", "-i", out_if, "-m", "conntrack",
                 "--ctstate", "NEW", "-j", "DROP")
        if silent:
            self.run(router, "iptables", "-A", "INPUT", "-i", out_if, "-m", "conntrack",
                     "--ctstate", "NEW", "-j", "DROP")
