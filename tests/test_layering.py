"""Imports point down only: idlefleet.node -> .p2p -> .protocols. Only p2p/ may import libp2p.

Inside ``node/`` the rooms are layered too (``ROOMS``): the faces (``cli``, ``api``) build on the
client, the client on the runtime, the runtime on serving and the owner; the model, the vehicle and the
simulator import nothing of the runtime.

The checks read the source with ``ast`` (nothing is imported), so they also cover modules that are
only imported lazily inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _package(module: str) -> str:
    """The layer of a module: ``idlefleet.p2p.host`` -> ``idlefleet.p2p``, ``trio.lowlevel`` -> ``trio``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "idlefleet" and len(parts) > 1 else parts[0]


def imported_modules(path: Path) -> set[str]:
    """Packages a module imports (absolute imports only); our own layers by their ``idlefleet.X`` name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(_package(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(_package(node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(_package(node.args[0].value))
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        for path in sources(package)
        if (bad := imported_modules(path) & forbidden)
    ]


def test_protocols_is_sans_io() -> None:
    assert sources("protocols"), "protocols/ has no modules?"
    assert violations("protocols", {"trio", "anyio", "libp2p", "idlefleet.p2p", "idlefleet.node"}) == []


def test_only_p2p_imports_libp2p() -> None:
    assert violations("node", {"libp2p"}) == []


def test_p2p_does_not_import_node() -> None:
    assert violations("p2p", {"idlefleet.node"}) == []


# room of idlefleet.node -> the rooms it may import (besides itself). A room is a subpackage or a
# top-level module of node/. Nothing imports cli; api only cli.
ROOMS: dict[str, set[str]] = {
    "files": set(),
    "faults": set(),
    "config": {"faults"},
    "model": set(),
    "vehicle": set(),
    "sim": {"vehicle"},
    "owner": {"vehicle", "files"},
    "serve": {"model", "owner", "faults", "files"},
    "runtime": {"serve", "owner", "vehicle", "model", "config", "faults", "files"},
    "client": {"runtime", "model", "owner", "config", "files"},
    "api": {"client", "runtime", "serve", "model", "owner", "config", "files"},
    "cli": {"api", "client", "runtime", "serve", "model", "owner", "vehicle", "sim", "config", "faults",
            "files"},
}


def room_of(module: str) -> str | None:
    """``idlefleet.node.client.pipeline`` -> ``client``; None outside node/ (or for node itself)."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["idlefleet", "node"] and len(parts) > 2 else None


def node_imports(path: Path) -> set[str]:
    """Full names of the idlefleet.node modules a source file imports (``from idlefleet.node import x``
    counts as ``idlefleet.node.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "idlefleet.node":
                names.update(f"idlefleet.node.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return {n for n in names if room_of(n) is not None}


def room_violations(root: Path) -> list[str]:
    """Every import in ``root`` (a node/ tree) that crosses rooms against ``ROOMS``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts == ("__init__.py",):
            continue
        room = rel.parts[0].removesuffix(".py")
        allowed = ROOMS.get(room)
        if allowed is None:
            found.append(f"node/{rel}: room {room!r} is not in ROOMS (add it, with what it may import)")
            continue
        for name in sorted(node_imports(path)):
            other = room_of(name)
            if other != room and other not in allowed:
                found.append(f"node/{rel} ({room}) imports {name} ({other})")
    return found


def test_node_rooms_import_down_only() -> None:
    assert room_violations(ROOT / "node") == []


def test_room_checker_catches_a_planted_import(tmp_path: Path) -> None:
    # A copy of node/ with one forbidden import planted: the runtime reaching up into a face.
    import shutil

    tree = tmp_path / "node"
    shutil.copytree(ROOT / "node", tree, ignore=shutil.ignore_patterns("__pycache__", "dashboard"))
    assert room_violations(tree) == []
    planted = tree / "runtime" / "node.py"
    planted.write_text(planted.read_text() + "\nfrom idlefleet.node.cli import swarm  # planted\n")
    assert room_violations(tree) == ["node/runtime/node.py (runtime) imports idlefleet.node.cli (cli)"]
    (tree / "model" / "x.py").write_text("def f():\n    import idlefleet.node.runtime.node\n")
    assert "node/model/x.py (model) imports idlefleet.node.runtime.node (runtime)" in room_violations(tree)
    (tree / "extra.py").write_text("")
    assert any("room 'extra' is not in ROOMS" in v for v in room_violations(tree))


def test_node_top_level_stays_small() -> None:
    modules = sorted(p.name for p in (ROOT / "node").glob("*.py"))
    assert len(modules) <= 6, modules
    rooms = {p.name for p in (ROOT / "node").iterdir() if (p / "__init__.py").exists()}
    assert rooms | {m.removesuffix(".py") for m in modules} - {"__init__"} == set(ROOMS)


OLD_NAMES = {"node", "p2p", "protocols"}


@pytest.mark.parametrize("package", ["protocols", "p2p", "node", "idlefleet", "tests", "bench", "examples"])
def test_no_old_top_level_names(package: str) -> None:
    # Installed, the layers exist only as idlefleet.*; a bare `import node` works only in a checkout.
    assert violations(package, OLD_NAMES) == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import trio", {"trio"}),
        ("import libp2p.peer.id as x", {"libp2p"}),
        ("from libp2p.crypto import ed25519", {"libp2p"}),
        ("def f():\n    from anyio import sleep", {"anyio"}),
        ("import importlib\nimportlib.import_module('libp2p.host')", {"importlib", "libp2p"}),
        ("from . import wire", set()),
        ("from idlefleet.p2p.host import Host", {"idlefleet.p2p"}),
        ("import idlefleet.node.client.fleet as c", {"idlefleet.node"}),
        ("from idlefleet import open_node", {"idlefleet"}),
    ],
)
def test_detector(tmp_path: Path, source: str, found: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_modules(path) == found
