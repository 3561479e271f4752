"""Block hosting (node/serve/hosting.py) against a stand-in node: what is announced while blocks load,
and drain/stop reaching sessions on a replaced stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import idlefleet.node.serve.hosting as hosting_module
from idlefleet.node.model.stage import load_stage
from idlefleet.node.owner.control import OwnerControl
from idlefleet.node.runtime.node import hosting_readiness
from idlefleet.node.serve.hosting import BlockHosting, HostingConfig
from idlefleet.protocols.policy import Consent, Preferences, VehicleReading
from idlefleet.protocols.serving import Serving, serving_decision


class StandInHost:
    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        pass

    async def dht_provide(self, key: str, *, timeout: float) -> None:
        pass


class StandInDiscovery:
    def __init__(self) -> None:
        self.announced = 0

    def blocks_changed(self) -> None:
        self.announced += 1


class StandInNode:
    """What BlockHosting uses of ``node.node.Node``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.peer_id = "12D3KooWStandIn"
        self.key = Ed25519PrivateKey.generate()  # the stage server signs its step results with it
        self.nursery = nursery
        self.host = StandInHost()
        self.discovery = StandInDiscovery()
        self.events: list[str] = []
        self.lifecycle = "running"
        self.hosting: BlockHosting | None = None
        self.owner = OwnerControl(Preferences(), None, event=lambda e, **f: None)
        self.owner.grant(time.time(), None, by="test")
        self.owner.evaluate(time.time(), VehicleReading(0.8, True, 40.0, True, None, time.time()))
        assert self.owner.consent() == Consent(self.owner.consent().granted_at)

    def event(self, event: str, **fields: Any) -> None:
        self.events.append(event)

    def request_publish(self) -> None:
        pass

    def fleet(self) -> list[Any]:
        return []

    def serving(self) -> Serving:
        return serving_decision(self.lifecycle, self.owner.decision, hosting_readiness(self.hosting))


@pytest.fixture
def shared_model_file(model_file: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load stages from the session's open model file (opening the GGUF again costs seconds)."""
    monkeypatch.setattr(hosting_module, "_load", lambda path, start, end: load_stage(model_file, start, end))
    return model_file


async def test_rebalancing_keeps_announcing_the_old_range_until_the_new_one_is_loaded(
        model_path: Path, shared_model_file: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = StandInNode(nursery)
        hosting = BlockHosting(node, HostingConfig(model=str(model_path)))
        hosting.info = shared_model_file.info()
        await hosting._switch_to((0, 1))
        assert hosting.blocks == (0, 1) and hosting.server is not None
        old = hosting.server
        async with hosting._limiter:  # the compute thread is busy: the new range cannot load yet
            nursery.start_soon(hosting._switch_to, (1, 2))
            await trio.sleep(0.5)
            # Clients routed here now must find what the record says: still block 0.
            assert hosting.blocks == (0, 1)
            assert hosting.server is old
        with trio.fail_after(60):
            while hosting.server is old:
                await trio.sleep(0.05)
        assert hosting.blocks == (1, 2)
        nursery.cancel_scope.cancel()


async def test_drain_and_stop_reach_sessions_on_a_replaced_stage(
        model_path: Path, shared_model_file: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = StandInNode(nursery)
        hosting = node.hosting = BlockHosting(node, HostingConfig(model=str(model_path)))
        hosting.info = shared_model_file.info()
        await hosting._switch_to((0, 1))
        old = hosting.server
        assert old is not None
        old._reserved[1] = 1  # a session still open on the old stage
        old._idle = trio.Event()
        await hosting._switch_to((1, 2))
        assert hosting.servers == [hosting.server, old]
        assert not old.draining and not hosting.server.draining
        node.lifecycle = "draining"  # what Node.drain does before it waits on hosting.drain
        with trio.move_on_after(0.2):
            await hosting.drain(10.0)
        assert old.draining and hosting.server is not None and hosting.server.draining
        del old._reserved[1]
        old._idle.set()
        with trio.fail_after(5):
            await hosting.drain(10.0)
        await trio.sleep(0.05)  # let the retiring task see the server idle
        assert hosting.servers == [hosting.server]  # the old server is released once idle
        nursery.cancel_scope.cancel()


def test_hosting_does_not_import_the_node() -> None:
    """One direction only: the node builds on hosting (no import cycle, no shared loose fields)."""
    import ast

    tree = ast.parse(Path(hosting_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "idlefleet.node.runtime.node" not in imported
