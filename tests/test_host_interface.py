"""``p2p.interface.HostLike`` is exactly what ``node/`` uses of a host, and ``Host`` implements it.

Both directions read the source or the classes, nothing runs: ``Host`` has every member of the
Protocol with the same signature (mypy checks the types in ``p2p/host.py`` too), and every
attribute ``node/`` reads off a host (``host.x``, ``node.host.x``, ``self._host.x``) is one of
its members, so another network (an in-memory one) can stand in behind the same interface.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from idlefleet.p2p.host import Host
from idlefleet.p2p.interface import HostLike

ROOT = Path(__file__).resolve().parent.parent
#: Names a host goes by in node/: a parameter or local ``host``, a ``.host`` attribute (the node's),
#: and ``self._host`` (serve/relay.py).
HOST_NAMES = {"host", "_host"}
PROPERTIES = {"stats", "misbehaviour"}  # attributes on Host, read-only properties in HostLike


def members() -> set[str]:
    return {name for name in vars(HostLike) if not name.startswith("_")}


def host_uses(path: Path) -> set[str]:
    """Attributes read off something named like a host in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if isinstance(value, ast.Name):
            name = value.id
        elif isinstance(value, ast.Attribute):
            name = value.attr
        else:
            continue
        if name in HOST_NAMES:
            used.add(node.attr)
    return used


def test_node_uses_nothing_of_a_host_outside_host_like() -> None:
    modules = sorted((ROOT / "node").rglob("*.py"))
    uses = {path.relative_to(ROOT).as_posix(): host_uses(path) for path in modules}
    outside = {path: sorted(names - members()) for path, names in uses.items() if names - members()}
    assert outside == {}
    # And HostLike has nothing node/ does not use: it is the narrowest interface that works.
    assert set().union(*uses.values()) == members()


def test_host_implements_every_member_with_the_same_signature() -> None:
    for name in sorted(members() - PROPERTIES):
        wanted, got = getattr(HostLike, name), getattr(Host, name)
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(wanted), name
        assert inspect.signature(got) == inspect.signature(wanted), name


async def test_a_live_host_has_the_properties() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from idlefleet.p2p.boundary import HostStatistics
    from idlefleet.p2p.guard import Misbehaviour
    from idlefleet.p2p.host import open_host

    async with open_host(Ed25519PrivateKey.generate()) as host:
        assert isinstance(host.stats, HostStatistics)
        assert isinstance(host.misbehaviour, Misbehaviour)
        assert {name for name in PROPERTIES if isinstance(getattr(HostLike, name), property)} == PROPERTIES
