"""The distribution installs one namespace, ``idlefleet``: nothing named node, p2p or protocols.

Both ways an app gets idlefleet are checked from outside the checkout (so the checkout's own
folders are not on ``sys.path``): the editable install ``make`` does, and a plain wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib, sys
import idlefleet
from idlefleet import ClientConfig, FleetClient, NodeConfig, open_node, __version__
import idlefleet.protocols.wire
assert open_node.__module__ == "idlefleet.node.runtime.node", open_node.__module__
missing = []
for name in ("node", "p2p", "protocols"):
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(name)
print(__version__, idlefleet.__file__, ",".join(missing))
"""


def run_probe(cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_lazy_top_level_keeps_protocols_sans_io(tmp_path: Path) -> None:
    # `import idlefleet.protocols` must not drag trio or libp2p in through the package's __init__.
    code = ("import sys, idlefleet.protocols.records; "
            "print(sorted(m for m in ('trio', 'libp2p') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_installed_names_outside_the_checkout(tmp_path: Path) -> None:
    version, _, missing = run_probe(tmp_path)
    assert version != "0+unknown"
    assert missing == "node,p2p,protocols"


@pytest.mark.slow
def test_plain_wheel_installs_one_namespace(tmp_path: Path) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("idlefleet", "protocols", "p2p", "node"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                            str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("idlefleet-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        dashboard = {name for name in zf.namelist() if name.startswith("idlefleet/node/api/dashboard/")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"idlefleet"}
    assert {Path(n).name for n in dashboard} == {"index.html", "dashboard.js", "dashboard.css"}

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # The wheel's copy comes first on sys.path, ahead of the editable install of this checkout.
    env = {**os.environ, "PYTHONPATH": str(target)}
    _, location, missing = run_probe(tmp_path, env)
    assert Path(location).is_relative_to(target)
    assert missing == "node,p2p,protocols"
