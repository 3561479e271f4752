"""The host's network settings (``HostConfig``), shared by the host and its parts.

Its own module so that the crash boundary, the DHT and the gossip wiring read one frozen config
without importing the host facade (which imports them).
"""

from __future__ import annotations

from dataclasses import dataclass

from idlefleet.protocols.wire import MAX_FRAME


@dataclass(frozen=True)
class HostConfig:
    """Network settings. Defaults are tuned for py-libp2p 0.8.1 as measured in DESIGN.md."""

    listen_host: str = "127.0.0.1"
    port: int = 0
    gossip_heartbeat_s: int = 1  # library default is 120 s: meshes would never form
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    gossip_max_msgs_per_topic_s: float = 1000.0  # library default 10/s silently drops messages
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    dht_timeout_s: float = 10.0
    reused_stream_idle_s: float = 60.0  # a server keeps a reused request stream this long
    max_frame: int = MAX_FRAME  # request/response protocols lower it to their request kind's limit
    # Limits at the door (issue 8). Streams: py-libp2p's resource manager only enforces a global
    # stream count (its per-peer scopes are never consulted by the 0.8.1 swarm), so the per-peer
    # cap on concurrent inbound streams is enforced by our crash boundary (boundary.Boundary).
    max_inbound_streams_per_peer: int = 64
    max_streams: int = 4096  # all streams, all peers (rcmgr; the library default is 10,000)
    max_connections: int = 512  # rcmgr, all peers
    # Gossip validation budget, spent before py-libp2p checks a message's signature: per
    # connected sender (the forwarder, authenticated by Noise) and per (sender, claimed origin).
    gossip_sender_rate: float = 200.0
    gossip_sender_burst: float = 1000.0
    gossip_origin_rate: float = 5.0
    gossip_origin_burst: float = 30.0
    # DHT store bounds: values only under registered namespaces (their validators bound the
    # size); provider keys only in the form of our block CIDs (sha2-256 multihashes).
    dht_max_values: int = 4096
    dht_max_provider_keys: int = 16384
    dht_max_key_bytes: int = 256
    rejection_log_interval_s: float = 10.0
