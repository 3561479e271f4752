"""Pipeline benchmark: decode speed across a swarm of node processes against one local process.

Same prompt, greedy, ``--tokens`` new tokens (default 64) in every measurement:

(a) local: the whole model in this process (``load_stage(mf, 0, n)``), no network; standalone
    before any node process starts, and again paired with (b)'s runs. Decode time per
    token is (last token time - first token time) / (tokens - 1): it excludes the prefill, which is
    reported separately, together with end-to-end tokens/s. Also the blocks' own time per token
    (hence per block), used below to estimate what a stage server computes per step.
(b) 3-node swarm (``node.swarm.Swarm``: 3 ``idlefleet node`` processes, 10 blocks each) with this
    process as the client (a client-only node: no consent, serves nothing). Swarm/local decode
    tokens/s (goal >= 0.8), added latency per hop = (swarm - local ms/token) / hops, and bytes on the
    wire per decode token (the pipeline's framed messages both ways: msgpack envelopes, excluding
    Noise and Yamux overhead). Local and swarm runs alternate, and ratios are medians over these
    pairs, so both sides of a ratio see the same machine load. The client chains decode steps
    (client -> A -> B -> C -> client, ``ClientConfig.chain``). One extra, instrumented generation,
    hop by hop (chaining off: the client must see each hop), splits each hop's step into
    client-side tensor codec, ``send`` and ``receive`` (server compute estimated from the paired
    local runs' per-block time), and a probe times one-token steps
    through a one-block session on each hop: the per-hop cost with almost no compute in it.
(c) 6-node swarm (every block hosted twice): single-stream rate, then 4 concurrent generations as
    4 trio tasks in this process sharing one client node and one ``FleetClient``; aggregate decode
    tokens/s over the single-stream rate on the same swarm, paired in time (goal >= 1.5x).

Every swarm generation must be token-identical to the local one (reported if not). CPU time of the
client and of the node processes per decode token, and how busy the whole machine was, are given for
each swarm measurement: the machine may be shared with other work, so only ratios measured in the
same run mean anything. Times are medians over ``--repeats``; one final JSON line (``--json``: only
that). Every wait is bounded, only 127.0.0.1 is used, and the swarm (only processes this script
started, by PID) is stopped in ``finally``.

    python -m bench.pipeline               # full run, ~3-6 minutes on 2 cores
    python -m bench.pipeline --quick       # 1 repeat, 16 tokens (~2 minutes)
    python -m bench.pipeline --json --keep /tmp/pipeline-logs
"""

from __future__ import annotations

import os

BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _var in BLAS_VARS:
    os.environ.setdefault(_var, "1")  # before numpy loads BLAS: one thread, as each node runs

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Iterator, Sequence  # noqa: E402
from contextlib import aclosing  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import idlefleet.node.client.hop as client_mod  # noqa: E402 - where a hop encodes and decodes
from bench.common import CLK_TCK, cpu_ticks, machine_ticks, work_root  # noqa: E402
from idlefleet.node.cli.run import setup_logging  # noqa: E402
from idlefleet.node.cli.swarm import Swarm, tail  # noqa: E402
from idlefleet.node.client.config import ClientConfig, ClientModel, GenerationFailed  # noqa: E402
from idlefleet.node.client.fleet import FleetClient  # noqa: E402
from idlefleet.node.client.pipeline import Pipeline  # noqa: E402
from idlefleet.node.config import NodeConfig  # noqa: E402
from idlefleet.node.model.generate import generate  # noqa: E402
from idlefleet.node.model.gguf_loader import open_model  # noqa: E402
from idlefleet.node.model.locate import find_default_model  # noqa: E402
from idlefleet.node.model.sampling import SamplingParams  # noqa: E402
from idlefleet.node.model.stage import Stage, load_stage  # noqa: E402
from idlefleet.node.runtime.node import open_node  # noqa: E402
from idlefleet.protocols import session as S  # noqa: E402
from idlefleet.protocols.placement import coverage  # noqa: E402
from idlefleet.protocols.tensors import encode_hidden  # noqa: E402

PROMPT = "Once upon a time,"  # 64 greedy tokens from SmolLM2-135M without hitting EOS
CONCURRENCY = 4
GOAL_RATIO, GOAL_CONCURRENT = 0.8, 1.5


# -- one generation's timeline ---------------------------------------------------------------------
@dataclass
class Run:
    """Timestamps of one generation (perf_counter seconds) and what it produced."""

    new_ids: list[int]
    t_start: float
    token_times: list[float]
    bytes_first: int = 0  # pipeline bytes (both ways) when the first token arrived ...
    bytes_last: int = 0  # ... and when the last one did: the difference is the decode phase
    route: list[dict[str, Any]] = field(default_factory=list)
    failovers: int = 0
    blocks_decode_s: float | None = None  # local only: median blocks time per decode token

    @property
    def n(self) -> int:
        return len(self.token_times)

    @property
    def prefill_s(self) -> float:
        return self.token_times[0] - self.t_start

    @property
    def decode_s_per_token(self) -> float:
        return (self.token_times[-1] - self.token_times[0]) / max(1, self.n - 1)

    @property
    def e2e_tokens_per_s(self) -> float:
        return self.n / (self.token_times[-1] - self.t_start)

    @property
    def bytes_per_decode_token(self) -> float:
        return (self.bytes_last - self.bytes_first) / max(1, self.n - 1)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    out = {
        "runs": len(runs),
        "decode_ms_per_token": round(1e3 * med([r.decode_s_per_token for r in runs]), 3),
        "decode_tokens_per_s": round(med([1 / r.decode_s_per_token for r in runs]), 2),
        "prefill_ms": round(1e3 * med([r.prefill_s for r in runs]), 1),
        "e2e_tokens_per_s": round(med([r.e2e_tokens_per_s for r in runs]), 2),
        "decode_ms_per_token_each": [round(1e3 * r.decode_s_per_token, 2) for r in runs],
    }
    if runs and runs[0].route:
        out["bytes_per_decode_token"] = round(med([r.bytes_per_decode_token for r in runs]))
        out["hops"] = len(runs[0].route)
        out["failovers"] = sum(r.failovers for r in runs)
    blocks = [r.blocks_decode_s for r in runs if r.blocks_decode_s is not None]
    if blocks:
        out["blocks_ms_per_token"] = round(1e3 * med(blocks), 3)
    return out


# -- CPU accounting ----------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    ticks = cpu_ticks(pid)
    return 0.0 if ticks is None else ticks / CLK_TCK


class CpuWindow:
    """CPU seconds of this process and of the node processes, and machine busy %, over a window."""

    def __init__(self, node_pids: Sequence[int]) -> None:
        self.pids = list(node_pids)
        self.client_s = self.nodes_s = self.busy_pct = 0.0
        self.per_node_s: list[float] = []

    def __enter__(self) -> CpuWindow:
        self._c0 = time.process_time()
        self._n0 = [proc_cpu_s(p) for p in self.pids]
        self._m0 = machine_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client_s = time.process_time() - self._c0
        self.per_node_s = [proc_cpu_s(p) - c0 for p, c0 in zip(self.pids, self._n0, strict=True)]
        self.nodes_s = sum(self.per_node_s)
        busy, total = machine_ticks()
        self.busy_pct = 100.0 * (busy - self._m0[0]) / max(1, total - self._m0[1])


def cpu_summary(windows: Sequence[CpuWindow], tokens: int) -> dict[str, Any]:
    """Medians over windows of ``tokens`` decode tokens each; per node in node order."""
    per_node = [med([w.per_node_s[i] for w in windows]) for i in range(len(windows[0].per_node_s))]
    return {"client_cpu_ms_per_token": round(1e3 * med([w.client_s for w in windows]) / tokens, 2),
            "node_cpu_ms_per_token_each": [round(1e3 * x / tokens, 2) for x in per_node],
            "nodes_cpu_ms_per_token": round(1e3 * med([w.nodes_s for w in windows]) / tokens, 2),
            "machine_busy_pct": round(med([w.busy_pct for w in windows]), 1)}


# -- (a) local ---------------------------------------------------------------------------------------
def local_run(model: ClientModel, stage: Stage, prompt_ids: list[int], tokens: int) -> Run:
    """One greedy generation with every block in this process."""
    cache = stage.new_cache()
    blocks_s: list[float] = []

    def middle(hidden: np.ndarray, position: int) -> np.ndarray:
        t = time.perf_counter()
        out = stage.forward(hidden, cache, position)
        blocks_s.append(time.perf_counter() - t)
        return out

    times: list[float] = []
    t0 = time.perf_counter()
    result = generate(model.head, middle, prompt_ids, SamplingParams(max_new_tokens=tokens),
                      model.tokenizer.stop_ids, on_token=lambda _t: times.append(time.perf_counter()))
    return Run(result.new_ids, t0, times, blocks_decode_s=med(blocks_s[1:]) if len(blocks_s) > 1 else None)


# -- swarm -------------------------------------------------------------------------------------------
async def swarm_run(client: FleetClient, tokens: int, timeout: float) -> Run:
    """One generation across the fleet, timing each token as the client gets it."""
    generation = client.stream(PROMPT, max_new_tokens=tokens)
    times: list[float] = []
    b_first = b_last = 0
    t0 = time.perf_counter()
    with trio.fail_after(timeout):
        async with aclosing(generation.run()) as stream:
            async for token, _piece in stream:
                if token < 0:  # a final flush of held-back text, not a token
                    continue
                times.append(time.perf_counter())
                p = generation.pipeline
                assert p is not None
                b_last = p.statistics().bytes_sent + p.statistics().bytes_received
                if len(times) == 1:
                    b_first = b_last
    result = generation.result
    assert result is not None
    return Run(result.new_ids, t0, times, b_first, b_last, result.route, result.failovers)


def make_swarm(n: int, workdir: Path) -> Swarm:
    """``n`` nodes, all simulated parked cars (nobody drives off mid-run), logging warnings only."""
    return Swarm(n, workdir, ["--log-level", "WARNING"], vehicles=[f"sim:parked:seed={i}" for i in range(n)])


def start_swarm(swarm: Swarm, n_blocks: int, min_cover: int, timeout: float,
                log: Callable[[str], None]) -> float:
    """Start the nodes and wait, bounded, until every one is online with blocks and every block has
    ``min_cover`` hosts. Returns the seconds it took. The caller stops the swarm (also on error)."""
    t0 = time.monotonic()
    swarm.start(timeout=timeout)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        for node in swarm.nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited: {tail(node.log_file, 5)}")
        sts = [node.status() or {} for node in swarm.nodes]
        ranges = [tuple(s["blocks"]) for s in sts if s.get("state") == "online" and s.get("blocks")]
        if len(ranges) == swarm.n and min(coverage(n_blocks, ranges)) >= min_cover:
            took = time.monotonic() - t0
            log(f"  {swarm.n} nodes online in {took:.1f}s; blocks {sorted(ranges)}")
            return took
        time.sleep(0.25)
    raise RuntimeError(f"{swarm.n}-node swarm did not cover every block {min_cover}x within {timeout}s")


async def with_client(swarm: Swarm, model: ClientModel, workdir: Path, timeout: float, settle_s: float,
                      body: Callable[[FleetClient], Awaitable[None]],
                      config: ClientConfig | None = None) -> None:
    """Join the swarm as a client-only node, wait until it sees every node, warm up, run ``body``."""
    boot = (swarm.nodes[0].status() or {})["multiaddr"]
    cfg = NodeConfig(key_file=workdir / "client.key", bootstrap=(boot,), consent=False, serve=False,
                     vehicle="sim:parked")
    async with open_node(cfg, key=Ed25519PrivateKey.generate()) as me:
        client = FleetClient(me, model, config or ClientConfig())
        await me.wait_for(lambda fleet: sum(1 for r in fleet if r.blocks and r.state == "online")
                          >= swarm.n, timeout=timeout)
        await client.wait_ready(timeout=timeout)
        await swarm_run(client, 4, timeout)  # warm-up: connections, first streams; not timed
        await trio.sleep(settle_s)  # let the nodes' start-up work (DHT provides, gossip) finish
        await body(client)


async def one_block_step_ms(client: FleetClient, peer_id: str, block: int, steps: int) -> float:
    """Median round trip of a one-token step through a session of one block on ``peer_id``: the
    per-hop cost with (almost) no compute in it. Speaks the stage protocol directly."""
    timeout = 5.0
    await client.ensure_connected(peer_id)
    fs = await client.node.host.open_stream(peer_id, S.STAGE_PROTOCOL, timeout=timeout)
    times: list[float] = []
    try:
        req = S.OpenRequest(client.model.model_id, block, block + 1, steps)
        await fs.send("session_open", req.to_body(), timeout=timeout)
        await fs.receive_reply(timeout=timeout)
        x = client.model.head.embed([client.model.tokenizer.encode(PROMPT)[0]])
        for pos in range(steps):
            t = time.perf_counter()
            await fs.send("step", S.Step(pos, encode_hidden(x)).to_body(), timeout=timeout)
            await fs.receive_reply(timeout=timeout)
            times.append(time.perf_counter() - t)
        await fs.send("session_close", {}, timeout=timeout)
        await fs.receive(timeout=timeout)
    finally:
        await fs.aclose()
    return 1e3 * med(times[1:])


# -- profile of one generation's hops -----------------------------------------------------------------
class HopProfiler:
    """Times, per decode step and hop, the client's tensor codec, ``send`` and ``receive``.

    Patches ``Pipeline._step`` and the codec functions ``node.client`` uses, for one generation only
    (restored on exit); the measured repeats run unpatched.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._cur: dict[str, Any] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[HopProfiler]:
        # Patched by name: the bench reaches into the client for one profiled generation only.
        orig_step = Pipeline._step
        orig_enc, orig_dec = client_mod.__dict__["encode_hidden"], client_mod.__dict__["decode_hidden"]
        prof = self

        def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
            def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    if prof._cur is not None:
                        prof._cur[key] += time.perf_counter() - t
            return wrapper

        def timed_async(fn: Callable[..., Awaitable[Any]], key: str) -> Callable[..., Awaitable[Any]]:
            async def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await fn(*a, **k)
                finally:
                    if prof._cur is not None:
                        prof._cur[key] += time.perf_counter() - t
            return wrapper

        async def step(pipeline: Pipeline, hop: Any, x: np.ndarray, position: int) -> np.ndarray:
            stream = hop.stream
            if stream is not None and not getattr(stream, "_bench_timed", False):
                stream.send = timed_async(stream.send, "send")  # instance attributes shadow the class
                stream.receive = timed_async(stream.receive, "receive")
                stream._bench_timed = True
            prof._cur = {"blocks": hop.end - hop.start, "tokens": x.shape[0], "hop": (hop.start, hop.end),
                         "send": 0.0, "receive": 0.0, "codec": 0.0}
            t = time.perf_counter()
            try:
                return await orig_step(pipeline, hop, x, position)
            finally:
                prof._cur["total"] = time.perf_counter() - t
                prof.steps.append(prof._cur)
                prof._cur = None

        setattr(Pipeline, "_step", step)  # noqa: B010 - a method patch mypy would refuse
        setattr(client_mod, "encode_hidden", timed(orig_enc, "codec"))  # noqa: B010
        setattr(client_mod, "decode_hidden", timed(orig_dec, "codec"))  # noqa: B010
        try:
            yield self
        finally:
            setattr(Pipeline, "_step", orig_step)  # noqa: B010
            setattr(client_mod, "encode_hidden", orig_enc)  # noqa: B010
            setattr(client_mod, "decode_hidden", orig_dec)  # noqa: B010

    def summary(self, block_ms: float, wall_ms_per_token: float) -> dict[str, Any]:
        """Median per decode step and hop, in ms; server compute estimated as blocks x block_ms."""
        decode = [s for s in self.steps if s["tokens"] == 1]
        hops = sorted({s["hop"] for s in decode})
        per_hop = []
        for h in hops:
            ss = [s for s in decode if s["hop"] == h]
            total, recv = med([s["total"] for s in ss]) * 1e3, med([s["receive"] for s in ss]) * 1e3
            compute = (h[1] - h[0]) * block_ms
            per_hop.append({"blocks": list(h), "step_ms": round(total, 2),
                            "codec_ms": round(med([s["codec"] for s in ss]) * 1e3, 3),
                            "send_ms": round(med([s["send"] for s in ss]) * 1e3, 3),
                            "receive_ms": round(recv, 2),
                            "server_compute_est_ms": round(compute, 2),
                            "not_compute_ms": round(total - compute, 2)})
        steps_ms = sum(h["step_ms"] for h in per_hop)
        return {"per_hop": per_hop, "hops_ms_per_token": round(steps_ms, 2),
                "client_outside_hops_ms_per_token": round(wall_ms_per_token - steps_ms, 2)}


# -- phases ------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    args: argparse.Namespace
    model: ClientModel
    stage: Stage
    prompt_ids: list[int]
    reference: list[int]
    log: Callable[[str], None]
    mismatches: list[str] = field(default_factory=list)

    def check(self, what: str, run: Run) -> None:
        if run.new_ids != self.reference:
            diverge = next((i for i, (a, b) in enumerate(zip(run.new_ids, self.reference, strict=False))
                            if a != b), min(len(run.new_ids), len(self.reference)))
            self.mismatches.append(f"{what}: {len(run.new_ids)} tokens, first difference at {diverge}")


def phase_local(ctx: Ctx) -> list[Run]:
    runs = []
    for i in range(ctx.args.repeats):
        r = local_run(ctx.model, ctx.stage, ctx.prompt_ids, ctx.args.tokens)
        ctx.check(f"local #{i + 1}", r)
        runs.append(r)
        ctx.log(f"  local #{i + 1}: {1e3 * r.decode_s_per_token:.2f} ms/token decode, "
                f"prefill {1e3 * r.prefill_s:.1f} ms")
    return runs


def phase_swarm3(ctx: Ctx, root: Path) -> dict[str, Any]:
    args, out = ctx.args, dict[str, Any]()
    swarm = make_swarm(3, root / "swarm3")
    try:
        out["start_s"] = round(start_swarm(swarm, ctx.model.n_blocks, 1, args.start_timeout, ctx.log), 1)
        pids = [node.proc.pid for node in swarm.nodes]
        runs: list[Run] = []
        locals_: list[Run] = []
        plain: list[Run] = []  # hop by hop (chaining off), right after each chained run
        windows: list[CpuWindow] = []
        prof = HopProfiler()

        async def hop_by_hop(client: FleetClient) -> Run:
            chained = client.config
            client.config = dataclasses.replace(chained, chain=False)
            try:
                return await swarm_run(client, args.tokens, args.gen_timeout)
            finally:
                client.config = chained

        async def body(client: FleetClient) -> None:
            for i in range(args.repeats):  # local and swarm alternate: both see the same machine load
                lr = await trio.to_thread.run_sync(local_run, ctx.model, ctx.stage, ctx.prompt_ids,
                                                   args.tokens)
                ctx.check(f"local (paired) #{i + 1}", lr)
                locals_.append(lr)
                with CpuWindow(pids) as w:
                    r = await swarm_run(client, args.tokens, args.gen_timeout)
                windows.append(w)
                ctx.check(f"3-node swarm #{i + 1}", r)
                runs.append(r)
                pr = await hop_by_hop(client)
                ctx.check(f"3-node swarm, hop by hop #{i + 1}", pr)
                plain.append(pr)
                ctx.log(f"  #{i + 1}: 3-node {1e3 * r.decode_s_per_token:.2f} ms/token decode (hop by hop "
                        f"{1e3 * pr.decode_s_per_token:.2f}), local {1e3 * lr.decode_s_per_token:.2f}; "
                        f"{r.bytes_per_decode_token:.0f} B/token, route {[h['blocks'] for h in r.route]}")
            # The per-hop split needs the client between hops: the profiled generation goes hop by
            # hop (chaining off), which also shows what chaining saves against the runs above.
            with prof.installed():
                r = await hop_by_hop(client)
            ctx.check("3-node swarm (profiled)", r)
            block_ms = 1e3 * med([x.blocks_decode_s or 0.0 for x in locals_]) / ctx.model.n_blocks
            out["profile"] = prof.summary(block_ms, 1e3 * r.decode_s_per_token)
            out["profile"]["decode_ms_per_token"] = round(1e3 * r.decode_s_per_token, 2)
            out["profile"]["block_ms"] = round(block_ms, 3)
            out["profile"]["one_block_step_ms"] = [
                round(await one_block_step_ms(client, h["peer_id"], h["blocks"][0], args.probe_steps), 2)
                for h in r.route]
            out["heartbeat_rtt_ms"] = sorted(round(v * 1e3, 2) for v in client.node.liveness.rtt_s.values())

        trio.run(with_client, swarm, ctx.model, root / "swarm3", args.start_timeout, args.settle, body)
        out["swarm"] = {**summarize(runs), **cpu_summary(windows, args.tokens)}
        out["local_paired"] = summarize(locals_)
        out["hop_by_hop"] = summarize(plain)
        hops = len(runs[0].route)
        out["paired"] = {
            "swarm_over_local_decode": round(med([lr.decode_s_per_token / r.decode_s_per_token
                                                  for lr, r in zip(locals_, runs, strict=True)]), 3),
            "swarm_over_local_e2e": round(med([r.e2e_tokens_per_s / lr.e2e_tokens_per_s
                                               for lr, r in zip(locals_, runs, strict=True)]), 3),
            "added_ms_per_hop": round(med([1e3 * (r.decode_s_per_token - lr.decode_s_per_token) / hops
                                           for lr, r in zip(locals_, runs, strict=True)]), 2),
            # Chained over hop by hop, decode tokens/s, each pair run back to back.
            "chained_over_hop_by_hop": round(med([pr.decode_s_per_token / r.decode_s_per_token
                                                  for pr, r in zip(plain, runs, strict=True)]), 3),
            "hop_by_hop_over_local": round(med([lr.decode_s_per_token / pr.decode_s_per_token
                                                for lr, pr in zip(locals_, plain, strict=True)]), 3)}
    except (RuntimeError, trio.TooSlowError, GenerationFailed) as e:
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        ctx.log(f"  3-node swarm failed: {out['error']}")
    finally:
        out["exit_codes"] = sorted(set(swarm.stop().values()), key=str)
    return out


def phase_swarm6(ctx: Ctx, root: Path) -> dict[str, Any]:
    args, out = ctx.args, dict[str, Any]()
    swarm = make_swarm(6, root / "swarm6")
    try:
        out["start_s"] = round(start_swarm(swarm, ctx.model.n_blocks, 2, args.start_timeout, ctx.log), 1)
        pids = [node.proc.pid for node in swarm.nodes]
        single: list[Run] = []
        single_w: list[CpuWindow] = []
        conc: list[dict[str, Any]] = []
        conc_w: list[CpuWindow] = []

        async def body(client: FleetClient) -> None:
            for i in range(args.repeats):  # one stream, then 4 at once: both see the same machine load
                with CpuWindow(pids) as w:
                    r = await swarm_run(client, args.tokens, args.gen_timeout)
                single_w.append(w)
                ctx.check(f"6-node single #{i + 1}", r)
                single.append(r)
                runs: list[Run | None] = [None] * CONCURRENCY

                async def one(k: int, runs: list[Run | None] = runs) -> None:
                    runs[k] = await swarm_run(client, args.tokens, args.gen_timeout)

                with CpuWindow(pids) as w:
                    async with trio.open_nursery() as nursery:
                        for k in range(CONCURRENCY):
                            nursery.start_soon(one, k)
                conc_w.append(w)
                done = [x for x in runs if x is not None]
                for k, x in enumerate(done):
                    ctx.check(f"6-node concurrent #{i + 1}.{k + 1}", x)
                first, last = min(x.token_times[0] for x in done), max(x.token_times[-1] for x in done)
                start = min(x.t_start for x in done)
                agg_decode = sum(x.n - 1 for x in done) / (last - first)
                agg_e2e = sum(x.n for x in done) / (last - start)
                routes = {tuple(h["peer_id"] for h in x.route) for x in done}
                conc.append({"agg_decode": agg_decode, "agg_e2e": agg_e2e, "routes": len(routes),
                             "over_single_decode": agg_decode * r.decode_s_per_token,
                             "over_single_e2e": agg_e2e / r.e2e_tokens_per_s,
                             "per_stream_decode": [1 / x.decode_s_per_token for x in done]})
                ctx.log(f"  #{i + 1}: 6-node 1 stream {1 / r.decode_s_per_token:.1f} tokens/s decode; "
                        f"x{CONCURRENCY} aggregate {agg_decode:.1f} decode, {agg_e2e:.1f} end-to-end; "
                        f"{len(routes)} distinct route(s)")

        trio.run(with_client, swarm, ctx.model, root / "swarm6", args.start_timeout, args.settle, body)
        out["single"] = {**summarize(single), **cpu_summary(single_w, args.tokens)}
        out["concurrent"] = {
            "streams": CONCURRENCY, "clients": "4 trio tasks, one client node, one FleetClient",
            "agg_decode_tokens_per_s": round(med([c["agg_decode"] for c in conc]), 2),
            "agg_e2e_tokens_per_s": round(med([c["agg_e2e"] for c in conc]), 2),
            "per_stream_decode_tokens_per_s": [round(x, 2) for x in
                                               conc[len(conc) // 2]["per_stream_decode"]] if conc else [],
            "distinct_routes": [c["routes"] for c in conc],
            "paired_over_single_decode": round(med([c["over_single_decode"] for c in conc]), 3),
            "paired_over_single_e2e": round(med([c["over_single_e2e"] for c in conc]), 3),
            **cpu_summary(conc_w, CONCURRENCY * args.tokens)}
    except (RuntimeError, trio.TooSlowError, GenerationFailed) as e:
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        ctx.log(f"  6-node swarm failed: {out['error']}")
    finally:
        out["exit_codes"] = sorted(set(swarm.stop().values()), key=str)
    return out


# -- report ------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "blas_threads": {v: os.environ.get(v) for v in BLAS_VARS},
            "blas_threads_nodes": 1, "python": platform.python_version(), "numpy": np.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "the machine may be shared with other work: compare ratios, not absolute numbers"}


def goals(local: dict[str, Any], s3: dict[str, Any], s6: dict[str, Any]) -> dict[str, Any]:
    """Goal ratios from measurements paired in time (same machine load); standalone for context."""
    g: dict[str, Any] = {}
    if "swarm" in s3:
        sw, pr = s3["swarm"], s3["paired"]
        g["swarm_over_local_decode"] = pr["swarm_over_local_decode"]
        g["swarm_over_local_e2e"] = pr["swarm_over_local_e2e"]
        g["swarm_over_standalone_local_decode"] = round(
            sw["decode_tokens_per_s"] / local["decode_tokens_per_s"], 3)
        g["added_ms_per_hop"] = pr["added_ms_per_hop"]
        g["bytes_per_decode_token"] = sw.get("bytes_per_decode_token")
        g["ratio_goal"], g["ratio_met"] = GOAL_RATIO, g["swarm_over_local_decode"] >= GOAL_RATIO
    if "concurrent" in s6:
        c = s6["concurrent"]
        g["concurrent_over_single_decode"] = c["paired_over_single_decode"]
        g["concurrent_over_single_e2e"] = c["paired_over_single_e2e"]
        g["concurrency_goal"] = GOAL_CONCURRENT
        g["concurrency_met"] = g["concurrent_over_single_decode"] >= GOAL_CONCURRENT
    return g


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(env: dict[str, Any], args: argparse.Namespace, local: dict[str, Any], s3: dict[str, Any],
           s6: dict[str, Any], g: dict[str, Any], mismatches: list[str]) -> str:
    out = [f"environment: {env['usable_cores']} usable core(s) of {env['cores']}; BLAS threads: 1 per node "
           f"process, {env['blas_threads']['OPENBLAS_NUM_THREADS']} in this process "
           f"(OPENBLAS/OMP/MKL_NUM_THREADS); load avg at start {env['loadavg_at_start']}, end "
           f"{env['loadavg_at_end']} (the machine may be shared)",
           f"prompt {PROMPT!r}, {args.tokens} greedy tokens, medians of {args.repeats} run(s); decode = "
           f"(last - first token) / (tokens - 1); ratios are medians of runs paired in time", ""]

    def line(name: str, d: dict[str, Any], extra: str = "") -> str:
        return (f"{name:<24}{d['decode_ms_per_token']:7.2f} ms/token decode ({d['decode_tokens_per_s']:.1f} "
                f"tokens/s); prefill {d['prefill_ms']:.0f} ms; end-to-end {d['e2e_tokens_per_s']:.1f} "
                f"tokens/s{extra}")

    out.append(line("(a) local, standalone", local,
                    f"; blocks {local['blocks_ms_per_token']:.2f} ms/token "
                    f"({local['block_ms']:.3f} ms/block)"))
    if "swarm" in s3:
        sw, lp, p = s3["swarm"], s3["local_paired"], s3["profile"]
        out.append(line("(a) local, paired w/ (b)", lp, f"; blocks {lp['blocks_ms_per_token']:.2f} ms/token"))
        out.append(line("(b) 3-node swarm", sw, f" ({sw['hops']} hops; prefill includes opening sessions)"))
        out.append(f"    swarm/local decode {g['swarm_over_local_decode']:.2f}x (goal >= {GOAL_RATIO}: "
                   f"{_met(g['ratio_met'])}; vs standalone local "
                   f"{g['swarm_over_standalone_local_decode']:.2f}x); "
                   f"end-to-end {g['swarm_over_local_e2e']:.2f}x")
        pr = s3["paired"]
        out.append(f"    chained over hop by hop {pr['chained_over_hop_by_hop']:.2f}x decode (hop by hop: "
                   f"{s3['hop_by_hop']['decode_ms_per_token']:.2f} ms/token, swarm/local "
                   f"{pr['hop_by_hop_over_local']:.2f}x)")
        out.append(f"    added latency per hop {g['added_ms_per_hop']:.2f} ms; wire "
                   f"{sw['bytes_per_decode_token']} B per decode token (framed msgpack, both ways, all hops; "
                   f"plus Noise/Yamux framing)")
        out.append(f"    CPU per token: client {sw['client_cpu_ms_per_token']:.2f} ms, nodes (sum) "
                   f"{sw['nodes_cpu_ms_per_token']:.2f} ms; machine busy {sw['machine_busy_pct']:.0f}%")
        out.append(f"    profile, one generation hop by hop (chaining off) at {p['decode_ms_per_token']:.2f} "
                   f"ms/token (per decode step, medians, ms; server compute = {p['block_ms']:.3f} ms/block "
                   f"from the paired local runs):")
        for h, one in zip(p["per_hop"], p["one_block_step_ms"], strict=False):
            out.append(f"      hop {h['blocks']}: step {h['step_ms']:.2f} = send {h['send_ms']:.2f} "
                       f"+ receive {h['receive_ms']:.2f} + codec {h['codec_ms']:.2f}; compute ~"
                       f"{h['server_compute_est_ms']:.2f} -> not compute {h['not_compute_ms']:.2f}; "
                       f"a 1-block step: {one:.2f}")
        out.append(f"      client outside the hops (head, sampling, embed, loop): "
                   f"{p['client_outside_hops_ms_per_token']:.2f} ms/token; heartbeat RTT (new stream each) "
                   f"{s3['heartbeat_rtt_ms']} ms")
    elif "error" in s3:
        out.append(f"(b) 3-node swarm FAILED: {s3['error']}")
    if "concurrent" in s6:
        one, c = s6["single"], s6["concurrent"]
        out.append(line("(c) 6-node, 1 stream", one, f"; machine busy {one['machine_busy_pct']:.0f}%"))
        out.append(f"    x{c['streams']} ({c['clients']}): aggregate {c['agg_decode_tokens_per_s']:.1f} "
                   f"tokens/s decode, {c['agg_e2e_tokens_per_s']:.1f} end-to-end; per stream "
                   f"{c['per_stream_decode_tokens_per_s']}")
        out.append(f"    aggregate/single decode {g['concurrent_over_single_decode']:.2f}x (goal >= "
                   f"{GOAL_CONCURRENT}: {_met(g['concurrency_met'])}); end-to-end "
                   f"{g['concurrent_over_single_e2e']:.2f}x; distinct routes per run {c['distinct_routes']}")
        out.append(f"    CPU per token at x{c['streams']}: client {c['client_cpu_ms_per_token']:.2f} ms, "
                   f"nodes {c['nodes_cpu_ms_per_token']:.2f} ms (each {c['node_cpu_ms_per_token_each']}); "
                   f"machine busy {c['machine_busy_pct']:.0f}%")
    elif "error" in s6:
        out.append(f"(c) 6-node swarm FAILED: {s6['error']}")
    out.append("tokens: every swarm generation identical to local" if not mismatches
               else "TOKENS DIFFER: " + "; ".join(mismatches))
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per generation (default 64)")
    p.add_argument("--quick", action="store_true", help="1 repeat, 16 tokens")
    p.add_argument("--start-timeout", type=float, default=120.0, help="swarm start + coverage, seconds")
    p.add_argument("--gen-timeout", type=float, default=120.0, help="per generation, seconds")
    p.add_argument("--settle", type=float, default=3.0, help="pause after the warm-up, seconds")
    p.add_argument("--probe-steps", type=int, default=30, help="steps of the 1-block probe per hop")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: swarm3, swarm6")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep node keys and logs under DIR")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.tokens = args.tokens or (16 if args.quick else 64)
    if args.repeats < 1 or args.tokens < 2:
        p.error("--repeats must be >= 1 and --tokens >= 2")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every swarm's finally (stop by PID)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    setup_logging("WARNING")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    env = environment()
    t_start = time.monotonic()
    model = ClientModel.load()
    with open_model(find_default_model()) as mf:
        stage = load_stage(mf, 0, mf.config.n_blocks)
    prompt_ids = model.tokenizer.encode(PROMPT)
    log(f"[{time.monotonic() - t_start:5.1f}s] (a) local, {args.tokens} tokens x {args.repeats}")
    first = local_run(model, stage, prompt_ids, args.tokens)  # warm-up, and the reference tokens
    if len(first.new_ids) != args.tokens:
        print(f"the prompt stops after {len(first.new_ids)} tokens, not {args.tokens}: pick another",
              file=sys.stderr)
        return 2
    ctx = Ctx(args, model, stage, prompt_ids, first.new_ids, log)
    local_runs = phase_local(ctx)
    local = summarize(local_runs)
    block_ms = local["blocks_ms_per_token"] / model.n_blocks
    local["block_ms"] = round(block_ms, 4)
    s3: dict[str, Any] = {}
    s6: dict[str, Any] = {}
    interrupted = False
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    with contextlib.ExitStack() as stack:
        root = work_root(stack, args.keep)
        try:
            if "swarm3" not in skip:
                log(f"[{time.monotonic() - t_start:5.1f}s] (b) 3-node swarm")
                s3 = phase_swarm3(ctx, root)
            if "swarm6" not in skip:
                log(f"[{time.monotonic() - t_start:5.1f}s] (c) 6-node swarm, x{CONCURRENCY} concurrent")
                s6 = phase_swarm6(ctx, root)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: reporting what was measured")
    g = goals(local, s3, s6)
    env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    elapsed = time.monotonic() - t_start
    if not args.json:
        print(report(env, args, local, s3, s6, g, ctx.mismatches))
        print(f"total {elapsed:.0f}s" + (f"; logs kept in {args.keep}" if args.keep else ""))
    print(json.dumps({"bench": "pipeline", "environment": env, "interrupted": interrupted,
                      "config": {"prompt": PROMPT, "tokens": args.tokens, "repeats": args.repeats,
                                 "concurrency": CONCURRENCY},
                      "local": local, "swarm3": s3, "swarm6": s6, "goal": g,
                      "identical_to_local": not ctx.mismatches, "mismatches": ctx.mismatches,
                      "elapsed_s": round(elapsed, 1)}))
    return 130 if interrupted else (1 if ctx.mismatches else 0)


if __name__ == "__main__":
    sys.exit(main())
