"""idlefleet: AI inference on idle edge devices (parked cars, phones, laptops) over libp2p.

The embedding API, importable from the top of the package::

    from idlefleet import open_node, NodeConfig, FleetClient

The three layers live in subpackages: :mod:`idlefleet.protocols` (sans-IO wire formats, signed
records, pure algorithms), :mod:`idlefleet.p2p` (the only code that touches libp2p) and
:mod:`idlefleet.node` (the application). The names below are imported on first use, so
``import idlefleet.protocols`` stays free of trio and libp2p.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("idlefleet")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "open_node": "idlefleet.node.runtime.node",
    "Node": "idlefleet.node.runtime.node",
    "NodeConfig": "idlefleet.node.config",
    "load_config": "idlefleet.node.config",
    "FleetClient": "idlefleet.node.client.fleet",
    "ClientConfig": "idlefleet.node.client.config",
    "FleetResult": "idlefleet.node.client.config",
    "GenerationFailed": "idlefleet.node.client.config",
    "IdlefleetError": "idlefleet.protocols.errors",
}

__all__ = [
    "ClientConfig",
    "FleetClient",
    "FleetResult",
    "GenerationFailed",
    "IdlefleetError",
    "Node",
    "NodeConfig",
    "__version__",
    "load_config",
    "open_node",
]

if TYPE_CHECKING:
    from idlefleet.node.client.config import ClientConfig, FleetResult, GenerationFailed
    from idlefleet.node.client.fleet import FleetClient
    from idlefleet.node.config import NodeConfig, load_config
    from idlefleet.node.runtime.node import Node, open_node
    from idlefleet.protocols.errors import IdlefleetError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'idlefleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
