"""DHT discovery used for real: a client finds hosts its region's gossip does not carry; saved
peers are entry points; several bootstrap addresses are tried in parallel."""

from __future__ import annotations

import json
from pathlib import Path

from idlefleet.node.runtime.discovery import load_peers_file, spread_order


async def test_a_damaged_peers_file_is_ignored(tmp_path: Path) -> None:
    bad = tmp_path / "peers.json"
    for content in ("{not json", json.dumps({"version": 99}), json.dumps({"version": 1, "peers": [7]}),
                    "x" * 300_000):
        bad.write_text(content)
        assert load_peers_file(bad) == []
    assert load_peers_file(tmp_path / "missing.json") == []


def test_provider_announcements_spread_over_the_range() -> None:
    order = spread_order(10, 30, 9)
    assert sorted(order) == list(range(10, 30))
    assert order[:9] == [10, 19, 28, 11, 20, 29, 12, 21, 13]  # the first burst spans the range
