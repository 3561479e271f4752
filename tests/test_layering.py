"""Imports point down only: idlefleet.node -> .p2p -> .protocols. Only p2p/ may import libp2p.

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
        ("import idlefleet.node.client as c", {"idlefleet.node"}),
        ("from idlefleet import open_node", {"idlefleet"}),
    ],
)
def test_detector(tmp_path: Path, source: str, found: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_modules(path) == found
