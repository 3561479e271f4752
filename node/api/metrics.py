"""What the API process shows operators: Prometheus metrics (``/metrics``) and the dashboard's data.

Nothing here keeps its own copy of the node's state: the collector and :func:`fleet_snapshot` read
the existing counters (``Node.statistics()``, the fleet view, the stage server's statistics, the
API's own statistics) each time they are asked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from idlefleet.node.serve.latency import LatencyHistogram

if TYPE_CHECKING:
    from idlefleet.node.api.server import ApiServer
    from idlefleet.node.serve.server import ServerStatistics

STATES = ("joining", "online", "draining", "offline")


class ServerTotals:
    """Stage server statistics summed over every server this node has had (hosting replaces its
    server when it moves to other blocks; counters must not go backwards)."""

    COUNTERS = ("steps", "tokens", "sessions_opened", "bytes_sent", "bytes_received")

    def __init__(self) -> None:
        self._seen: list[ServerStatistics] = []

    def update(self, stats: ServerStatistics | None) -> list[ServerStatistics]:
        if stats is not None and not any(s is stats for s in self._seen):
            self._seen.append(stats)
        return self._seen

    def total(self, name: str) -> float:
        return sum(getattr(s, name, 0) for s in self._seen)

    def refused(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._seen:
            for code, n in s.sessions_refused.items():
                out[code] = out.get(code, 0) + n
        return out

    def latency(self) -> LatencyHistogram:
        merged = LatencyHistogram()
        for s in self._seen:
            h: LatencyHistogram | None = getattr(s, "step_latency", None)
            if h is not None:
                merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
                merged.total_s += h.total_s
        return merged


class FleetCollector(Collector):
    """Reads the API's and the node's counters at every scrape."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.servers = ServerTotals()

    def collect(self) -> Iterator[Metric]:
        yield from self._api_metrics()
        node = self.api.backend.node
        if node is not None:
            yield from self._node_metrics()
        yield from self._server_metrics()

    def _api_metrics(self) -> Iterator[Metric]:
        stats = self.api.stats
        requests = CounterMetricFamily("idlefleet_api_requests", "HTTP API requests by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(stats.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        generations = CounterMetricFamily("idlefleet_api_generations", "Generations finished by outcome",
                                          labels=["outcome"])
        for outcome in ("completed", "cancelled", "failed"):
            generations.add_metric([outcome], stats.generations.get(outcome, 0))
        yield generations
        yield GaugeMetricFamily("idlefleet_api_generations_active", "Generations running now",
                                value=len(self.api.jobs))
        yield CounterMetricFamily("idlefleet_api_prompt_tokens", "Prompt tokens of API generations",
                                  value=stats.prompt_tokens)
        running = sum(len(j.new_ids) for j in self.api.jobs.values())
        yield CounterMetricFamily("idlefleet_api_completion_tokens", "Tokens generated for API requests",
                                  value=stats.completion_tokens + running)

    def _node_metrics(self) -> Iterator[Metric]:
        node = self.api.backend.node
        assert node is not None
        st = node.statistics()
        yield GaugeMetricFamily("idlefleet_peers_known", "Other peers alive in this node's fleet view",
                                value=max(0, st["alive"] - 1))
        yield GaugeMetricFamily("idlefleet_peers_connected", "Peers with an open libp2p connection",
                                value=st["connected"])
        yield CounterMetricFamily("idlefleet_gossip_published", "Records this node published",
                                  value=st["published"])
        yield CounterMetricFamily("idlefleet_gossip_accepted", "Gossip messages from peers accepted",
                                  value=getattr(node, "gossip_accepted", 0))
        rejected = CounterMetricFamily("idlefleet_gossip_rejected", "Gossip messages rejected, by reason",
                                       labels=["reason"])
        for reason, n in sorted(st["rejected"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("idlefleet_evictions", "Peers evicted as dead or frozen",
                                  value=st["evictions"])
        me = node.view.get(node.peer_id)
        reason = str(getattr(me.record, "reason", "") or "") if me is not None else ""
        state = GaugeMetricFamily("idlefleet_node_state", "1 for this node's current state (and policy "
                                  "reason, when its record carries one)", labels=["state", "reason"])
        for s in STATES:
            state.add_metric([s, reason if s == node.state else ""], 1 if s == node.state else 0)
        yield state
        blocks = node.blocks
        hosted = GaugeMetricFamily("idlefleet_hosted_blocks", "Blocks this node hosts (labels: the range)",
                                   labels=["model", "start", "end"])
        if blocks is not None:
            hosted.add_metric([node.model_id, str(blocks[0]), str(blocks[1])], blocks[1] - blocks[0])
        yield hosted
        yield GaugeMetricFamily("idlefleet_node_load", "Fraction of serving capacity in use", value=node.load)

    def _server_metrics(self) -> Iterator[Metric]:
        node = self.api.backend.node
        hosting = getattr(node, "hosting", None) if node is not None else None
        server = getattr(hosting, "server", None)
        self.servers.update(server.stats if server is not None else None)
        t = self.servers
        yield CounterMetricFamily("idlefleet_steps_served", "Pipeline steps this node's stage servers "
                                  "computed", value=t.total("steps"))
        yield CounterMetricFamily("idlefleet_tokens_served", "Token positions this node's stage servers "
                                  "computed", value=t.total("tokens"))
        yield CounterMetricFamily("idlefleet_sessions_opened", "Pipeline sessions opened on this node",
                                  value=t.total("sessions_opened"))
        refused = CounterMetricFamily("idlefleet_sessions_refused", "Sessions refused, by error code",
                                      labels=["code"])
        for code, n in sorted(t.refused().items()):
            refused.add_metric([code], n)
        yield refused
        yield GaugeMetricFamily("idlefleet_sessions_open", "Pipeline sessions open on this node",
                                value=server.active_sessions if server is not None else 0)
        h = t.latency()
        yield HistogramMetricFamily("idlefleet_step_latency_seconds", "Compute time of one pipeline step",
                                    buckets=h.cumulative(), sum_value=h.total_s)
        stage_bytes = CounterMetricFamily(
            "idlefleet_stage_bytes", "Pipeline bytes (framed hidden states): role server = sessions this "
            "node served (counted when a session ends), client = this process's generations",
            labels=["role", "direction"])
        stats = self.api.stats
        stage_bytes.add_metric(["client", "sent"], stats.bytes_sent)
        stage_bytes.add_metric(["client", "received"], stats.bytes_received)
        stage_bytes.add_metric(["server", "sent"], t.total("bytes_sent"))
        stage_bytes.add_metric(["server", "received"], t.total("bytes_received"))
        yield stage_bytes


def build_registry(api: ApiServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(api))
    return registry


# -- the dashboard's data ---------------------------------------------------------------------
def fleet_snapshot(api: ApiServer) -> dict[str, Any]:
    """Everything the dashboard shows, JSON-friendly: peers, block coverage, live generations."""
    from idlefleet.node.api.openai_compat import ApiError
    from idlefleet.node.api.server import tokens_per_s

    now, mono = time.time(), time.monotonic()
    backend = api.backend
    node = backend.node
    try:
        model = backend.model
    except ApiError:  # the client's part of the model is still loading
        model = None
    jobs = list(api.jobs.values())
    out: dict[str, Any] = {
        "time": now,
        "mode": "fleet" if node is not None else "local",
        "model": {"id": model.model_id, "n_blocks": model.n_blocks} if model is not None else None,
        "self": None, "peers": [], "coverage": [],
        "generations": [j.summary(mono) for j in jobs],
        "tokens_per_s": tokens_per_s(api.stats.recent, jobs, mono),
        "totals": {"completion_tokens": api.stats.completion_tokens,
                   "generations": sum(api.stats.generations.values())},
    }
    if node is None:
        if model is not None:
            out["coverage"] = [1] * model.n_blocks  # every block in this process
        return out
    rtt = node.liveness.rtt_s
    out["self"] = {"peer_id": node.peer_id, "state": node.state}
    peers: list[dict[str, Any]] = []
    ranges: list[tuple[int, int]] = []  # blocks of online hosts of our model
    for record in sorted(node.fleet(), key=lambda r: r.peer_id):
        r_rtt = rtt.get(record.peer_id)
        peers.append({
            "peer_id": record.peer_id, "self": record.peer_id == node.peer_id,
            "state": record.state, "reason": getattr(record, "reason", None),
            "battery_soc": record.battery_soc, "plugged_in": record.plugged_in,
            "region": record.region, "model_id": record.model_id,
            "blocks": list(record.blocks) if record.blocks else None, "load": record.load,
            "rtt_ms": None if r_rtt is None else round(r_rtt * 1000, 2),
        })
        ours = model is None or record.model_id == model.model_id
        if record.blocks and record.state == "online" and ours:
            ranges.append(record.blocks)
    out["peers"] = peers
    n_blocks = model.n_blocks if model is not None else max((end for _, end in ranges), default=0)
    coverage = [0] * n_blocks
    for start, end in ranges:
        for b in range(start, min(end, n_blocks)):
            coverage[b] += 1
    out["coverage"] = coverage
    return out
