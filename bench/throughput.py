"""Throughput benchmark: batched concurrent sessions, locally and across a 6-node swarm.

(a) local engine: ``n`` = 1, 2, 4, 8 sessions in this process, each prefilled with its own prompt,
    then ``--tokens`` greedy decode rounds, each round one ``Stage.forward_batch`` over every
    session plus one LM head product (``generate_many``'s inner loop). Aggregate decode tokens/s
    per ``n``, and its ratio to ``n = 1`` measured in the same repeat (the sizes alternate inside
    each repeat, so both sides of a ratio see the same machine load); goal: 8 sessions >= 5x.
    Memory per extra session: the KV cache it allocates for this run's length, and the worst case
    a stage server reserves for it (``max_length`` positions).
(b) 6-node swarm (``idlefleet node`` processes, every block hosted twice), this process as a
    client-only node: one stream, then 8 concurrent streams (8 trio tasks sharing one
    ``FleetClient``: their LM head rows are batched, stage servers batch their steps), paired in
    each repeat; aggregate decode tokens/s over the single stream; goal >= 4x. Every swarm
    generation is checked token-identical to local greedy. Each repeat also decodes the first
    prompt with all 30 blocks in this process just before the single stream: swarm/local single
    stream, paired (goal >= 0.9; ``bench.pipeline`` measures it on a 3-node swarm, with a per-hop
    profile). Per measurement: CPU per token (client, nodes), the machine's busy %, each node's
    mean batch and the streams it carried, the nodes' stage compute calls (weight passes) and
    positions computed per generated token, and the stage sessions the client opened per
    generation: with verification on, the last two show what re-computation adds (``--no-verify``
    for the baseline). The client chains decode steps (server to server, ``--no-chain``: hop by
    hop, for comparison), and its concurrent generations decode in step per route (waves,
    ``--no-waves``: one lockstep for all).

The machine may be shared: only ratios measured in the same run mean anything. Medians over
``--repeats``; one final JSON line. Every wait is bounded, only 127.0.0.1 is used, and the swarm
(processes this script started, by PID) is stopped in ``finally``.

    python -m bench.throughput               # ~2 minutes on a quiet 2-core machine
    python -m bench.throughput --quick       # 1 repeat, 16 tokens
    python -m bench.throughput --skip swarm  # local engine only
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads BLAS: one thread, as each node runs

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from contextlib import aclosing  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import trio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import work_root  # noqa: E402
from bench.pipeline import CpuWindow, Run, make_swarm, med, start_swarm, with_client  # noqa: E402
from idlefleet.node.cli.run import setup_logging  # noqa: E402
from idlefleet.node.client.config import ClientConfig, ClientModel, GenerationFailed  # noqa: E402
from idlefleet.node.client.fleet import FleetClient  # noqa: E402
from idlefleet.node.model.gguf_loader import open_model  # noqa: E402
from idlefleet.node.model.locate import find_default_model  # noqa: E402
from idlefleet.node.model.stage import Head, Stage, load_stage  # noqa: E402
from idlefleet.protocols.verification import TRUST_FILE_VERSION  # noqa: E402

PROMPTS = ["Once upon a time,", "The capital of France is", "In a city of parked cars,",
           "The best way to learn", "Electric cars have", "My favourite recipe is",
           "The weather today", "Scientists have found"]
SIZES = (1, 2, 4, 8)
STREAMS = 8
GOAL_LOCAL_8, GOAL_SWARM_8 = 5.0, 4.0


def local_decode(stage: Stage, head: Head, prompts: list[list[int]], tokens: int) -> tuple[float, int]:
    """Prefill every prompt (one batch), then ``tokens`` greedy rounds over all of them; returns
    (aggregate decode tokens/s, KV bytes allocated per session)."""
    n = len(prompts)
    caches = [stage.new_cache(capacity=len(p) + tokens) for p in prompts]
    outs = stage.forward_batch([(head.embed(p), c, 0) for p, c in zip(prompts, caches, strict=True)])
    last = np.argmax(head.logits(np.concatenate([o[-1:] for o in outs])), axis=-1)  # [n]
    t0 = time.perf_counter()
    for _ in range(tokens):
        steps = [(head.embed([int(t)]), c, None) for t, c in zip(last, caches, strict=True)]
        outs = stage.forward_batch(steps)  # n x [1, H]
        last = np.argmax(head.logits(np.concatenate(outs)), axis=-1)  # [n]
    return n * tokens / (time.perf_counter() - t0), caches[0].nbytes


def phase_local(args: argparse.Namespace, stage: Stage, head: Head, prompt_ids: list[list[int]],
                log: Any) -> dict[str, Any]:
    rates: dict[int, list[float]] = {n: [] for n in SIZES}
    ratios: dict[int, list[float]] = {n: [] for n in SIZES}
    kv_bytes = 0
    local_decode(stage, head, prompt_ids[:2], 2)  # warm-up
    for i in range(args.repeats):
        row = {}
        for n in SIZES:
            rate, kv_bytes = local_decode(stage, head, prompt_ids[:n], args.tokens)
            row[n] = rate
            rates[n].append(rate)
        for n in SIZES:
            ratios[n].append(row[n] / row[1])
        log(f"  #{i + 1}: " + ", ".join(f"{n}: {row[n]:.1f} tok/s (x{row[n] / row[1]:.2f})" for n in SIZES))
    cfg = stage.config
    per_pos = len(stage.blocks) * 2 * cfg.n_kv_heads * cfg.head_dim * 4
    return {"tokens_per_s": {n: round(med(rates[n]), 2) for n in SIZES},
            "over_one_session": {n: round(med(ratios[n]), 3) for n in SIZES},
            "kv_bytes_per_session": kv_bytes,
            "kv_bytes_per_position": per_pos,
            "server_reservation_per_session_2048_positions": 2048 * per_pos}


def phase_swarm(args: argparse.Namespace, model: ClientModel, want: dict[str, list[int]],
                root: Path, log: Any, stage: Stage, prompt_ids: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    swarm = make_swarm(6, root / "swarm6")
    mismatches: list[str] = []
    single: list[float] = []
    agg: list[float] = []
    ratio: list[float] = []
    local_single: list[float] = []
    over_local: list[float] = []
    cpu: dict[int, list[CpuWindow]] = {1: [], STREAMS: []}
    tokens: dict[int, list[int]] = {1: [], STREAMS: []}
    batch_sizes: dict[int, list[list[float]]] = {1: [], STREAMS: []}
    streams_per_node: dict[int, list[list[int]]] = {1: [], STREAMS: []}
    passes: dict[int, list[float]] = {1: [], STREAMS: []}  # compute calls (weight passes) per token
    rows: dict[int, list[float]] = {1: [], STREAMS: []}  # positions the nodes computed per token
    sessions: dict[int, list[float]] = {1: [], STREAMS: []}  # sessions the client opened per generation
    histogram: dict[int, list[dict[int, int]]] = {1: [], STREAMS: []}  # steps per batch -> batches
    routes: dict[int, list[int]] = {1: [], STREAMS: []}  # distinct routes the streams took
    gather: dict[int, list[float]] = {1: [], STREAMS: []}  # batch leaders' wait per step served, ms

    def batch_sizes_now() -> dict[int, int]:
        """Steps per compute call -> calls, summed over the nodes (status files)."""
        total: dict[int, int] = {}
        for node in swarm.nodes:
            for k, v in ((node.status() or {}).get("serving") or {}).get("batch_sizes", {}).items():
                total[int(k)] = total.get(int(k), 0) + int(v)
        return total

    def serving() -> list[tuple[int, int, int, float]]:
        """(steps, batches, positions, seconds waited for batch-mates) served so far by each
        node, from its status file (rewritten ~1/s)."""
        out = []
        for node in swarm.nodes:
            st = (node.status() or {}).get("serving") or {}
            out.append((int(st.get("steps", 0)), int(st.get("batches", 0)), int(st.get("tokens", 0)),
                        float(st.get("gather_s", 0.0))))
        return out

    def check(what: str, prompt: str, r: Run) -> None:
        if r.new_ids != want[prompt]:
            mismatches.append(what)

    async def streams(client: FleetClient, n: int) -> float:
        runs: list[Run | None] = [None] * n

        async def one(k: int) -> None:
            runs[k] = await swarm_run_prompt(client, PROMPTS[k % len(PROMPTS)], args.tokens, args.gen_timeout)

        await trio.sleep(1.5)  # status files catch up with the previous run
        before, opened = serving(), sum(client.statistics().sessions_opened.values())
        hist_before = batch_sizes_now()
        with CpuWindow([node.proc.pid for node in swarm.nodes]) as window:
            async with trio.open_nursery() as nursery:
                for k in range(n):
                    nursery.start_soon(one, k)
        await trio.sleep(1.5)
        after = serving()
        hist = {k: v - hist_before.get(k, 0) for k, v in sorted(batch_sizes_now().items())}
        histogram[n].append({k: v for k, v in hist.items() if v})
        cpu[n].append(window)
        batch_sizes[n].append([round((s1 - s0) / (b1 - b0), 2) if b1 > b0 else 0.0
                               for (s0, b0, *_), (s1, b1, *_) in zip(before, after, strict=True)])
        done = [x for x in runs if x is not None]
        tokens[n].append(sum(x.n for x in done))
        index = {(node.status() or {}).get("peer_id"): i for i, node in enumerate(swarm.nodes)}
        per_node = [0] * len(swarm.nodes)
        for x in done:
            for hop in x.route or []:
                if hop["peer_id"] in index:
                    per_node[index[hop["peer_id"]]] += 1
        streams_per_node[n].append(per_node)
        routes[n].append(len({tuple(hop["peer_id"] for hop in x.route or []) for x in done}))
        calls = sum(b1 - b0 for (_, b0, *_), (_, b1, *_) in zip(before, after, strict=True))
        passes[n].append(calls / max(1, tokens[n][-1]))
        computed = sum(p1 - p0 for (_, _, p0, _), (_, _, p1, _) in zip(before, after, strict=True))
        steps = sum(s1 - s0 for (s0, *_), (s1, *_) in zip(before, after, strict=True))
        waited = sum(w1 - w0 for (*_, w0), (*_, w1) in zip(before, after, strict=True))
        gather[n].append(1e3 * waited / max(1, steps))
        rows[n].append(computed / max(1, tokens[n][-1]))
        sessions[n].append((sum(client.statistics().sessions_opened.values()) - opened) / n)
        for k, x in enumerate(done):
            check(f"stream {k} of {n}", PROMPTS[k % len(PROMPTS)], x)
        first, last = min(x.token_times[0] for x in done), max(x.token_times[-1] for x in done)
        return sum(x.n - 1 for x in done) / (last - first)

    async def body(client: FleetClient) -> None:
        if args.trusted:  # as after a night's work with these peers: sessions checked at the floor
            book = client.trust
            streak = math.ceil(book.new_windows / book.min_rate ** 2)
            peers = [str((node.status() or {}).get("peer_id")) for node in swarm.nodes]
            book.load({"version": TRUST_FILE_VERSION, "peers": [[p, streak, streak, 0] for p in peers]})
            log(f"  trust book: {len(peers)} nodes at {streak} valid windows each "
                f"(check rate {book.rate(peers[0]):.2f})")
        for i in range(args.repeats):
            # paired with the swarm's single stream: the same prompt's decode, all 30 blocks here
            local, _ = await trio.to_thread.run_sync(local_decode, stage, model.head, [prompt_ids],
                                                     args.tokens)
            one = await streams(client, 1)
            many = await streams(client, STREAMS)
            local_single.append(local)
            over_local.append(one / local)
            single.append(one)
            agg.append(many)
            ratio.append(many / one)
            log(f"  #{i + 1}: local {local:.1f} tok/s, 1 stream {one:.1f} tok/s decode "
                f"(swarm/local x{one / local:.2f}); {STREAMS} streams {many:.1f} aggregate "
                f"(x{many / one:.2f})")
            for n in (1, STREAMS):
                w, t = cpu[n][-1], tokens[n][-1]
                log(f"      {n} stream(s): CPU per token client {1e3 * w.client_s / t:.1f} ms, nodes "
                    f"{1e3 * w.nodes_s / t:.1f} ms {[round(1e3 * x / t, 1) for x in w.per_node_s]}; "
                    f"machine busy {w.busy_pct:.0f}%; mean batch per node {batch_sizes[n][-1]}, "
                    f"streams per node {streams_per_node[n][-1]}; "
                    f"weight passes per token {passes[n][-1]:.2f}; positions computed per token "
                    f"{rows[n][-1]:.2f}; sessions per generation {sessions[n][-1]:.1f}; "
                    f"distinct routes {routes[n][-1]}; batches by size {histogram[n][-1]}; "
                    f"batch wait per step {gather[n][-1]:.2f} ms")

    try:
        out["start_s"] = round(start_swarm(swarm, model.n_blocks, 2, args.start_timeout, log), 1)
        trio.run(with_client, swarm, model, root / "swarm6", args.start_timeout, args.settle, body,
                 ClientConfig(verify=not args.no_verify, chain=not args.no_chain,
                              waves=not args.no_waves))
        out.update({"local_single_decode_tokens_per_s": round(med(local_single), 2),
                    "single_over_local": round(med(over_local), 3),
                    "single_decode_tokens_per_s": round(med(single), 2),
                    f"x{STREAMS}_aggregate_decode_tokens_per_s": round(med(agg), 2),
                    f"x{STREAMS}_over_single": round(med(ratio), 3),
                    "ratios": [round(r, 3) for r in ratio],
                    "cpu_ms_per_token": {n: {
                        "client": round(med([1e3 * w.client_s / t for w, t in zip(cpu[n], tokens[n],
                                                                                   strict=True)]), 2),
                        "nodes": round(med([1e3 * w.nodes_s / t for w, t in zip(cpu[n], tokens[n],
                                                                                 strict=True)]), 2),
                        "machine_busy_pct": round(med([w.busy_pct for w in cpu[n]]), 1)}
                        for n in (1, STREAMS)},
                    "mean_batch_per_node": {n: batch_sizes[n] for n in (1, STREAMS)},
                    "streams_per_node": {n: streams_per_node[n] for n in (1, STREAMS)},
                    "distinct_routes": {n: routes[n] for n in (1, STREAMS)},
                    "batches_by_size": {n: histogram[n] for n in (1, STREAMS)},
                    # Time batch leaders waited for other sessions' steps, per step served (ms).
                    "batch_wait_ms_per_step": {n: round(med(gather[n]), 2) for n in (1, STREAMS)},
                    # Stage compute calls summed over the nodes per generated token: each reads
                    # its stage's weights once (what batching and verification change).
                    "weight_passes_per_token": {n: round(med(passes[n]), 3) for n in (1, STREAMS)},
                    # Positions the nodes computed per generated token (verification re-computes)
                    # and stage sessions the client opened per generation (verifier ones too).
                    "positions_computed_per_token": {n: round(med(rows[n]), 3) for n in (1, STREAMS)},
                    "sessions_per_generation": {n: round(med(sessions[n]), 2) for n in (1, STREAMS)},
                    "identical_to_local": not mismatches, "mismatches": mismatches})
    except (RuntimeError, trio.TooSlowError, GenerationFailed) as e:
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"  6-node swarm failed: {out['error']}")
    finally:
        out["exit_codes"] = sorted(set(swarm.stop().values()), key=str)
    return out


async def swarm_run_prompt(client: FleetClient, prompt: str, tokens: int, timeout: float) -> Run:
    """One generation of ``prompt`` across the fleet, timing each token as the client gets it."""
    generation = client.stream(prompt, max_new_tokens=tokens)
    times: list[float] = []
    t0 = time.perf_counter()
    with trio.fail_after(timeout):
        async with aclosing(generation.run()) as stream:
            async for token, _piece in stream:
                if token >= 0:  # (-1 is a final flush of held-back text)
                    times.append(time.perf_counter())
    assert generation.result is not None  # set when run() completes
    return Run(generation.result.new_ids, t0, times, route=generation.result.route)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per session (default 32)")
    p.add_argument("--quick", action="store_true", help="1 repeat, 16 tokens")
    p.add_argument("--start-timeout", type=float, default=180.0, help="swarm start + coverage, seconds")
    p.add_argument("--gen-timeout", type=float, default=300.0, help="per generation, seconds")
    p.add_argument("--settle", type=float, default=3.0, help="pause after the warm-up, seconds")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: local, swarm")
    p.add_argument("--no-chain", action="store_true",
                   help="decode hop by hop (the client between every hop) instead of chained steps")
    p.add_argument("--no-waves", action="store_true",
                   help="one head lockstep for all concurrent generations, not one per route")
    p.add_argument("--no-verify", action="store_true",
                   help="swarm client without verified work (no re-computation of hops' windows)")
    p.add_argument("--trusted", action="store_true",
                   help="the swarm client starts trusting every node as after a night's work with "
                        "them (valid windows enough to check each session at verify_min_rate); "
                        "default: a new client, every node's sessions checked until trusted")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep node keys and logs under DIR")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.tokens = args.tokens or (16 if args.quick else 32)
    if args.repeats < 1 or args.tokens < 2:
        p.error("--repeats must be >= 1 and --tokens >= 2")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the swarm's finally (stop by PID)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    setup_logging("WARNING")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model = ClientModel.load()
    with open_model(find_default_model()) as mf:
        stage = load_stage(mf, 0, mf.config.n_blocks)
    prompt_ids = [model.tokenizer.encode(p) for p in PROMPTS]
    local: dict[str, Any] = {}
    swarm: dict[str, Any] = {}
    interrupted = False
    with contextlib.ExitStack() as stack:
        root = work_root(stack, args.keep)
        try:
            if "local" not in skip:
                log(f"[{time.monotonic() - t_start:5.1f}s] (a) local engine, sessions {SIZES}, "
                    f"{args.tokens} decode tokens x {args.repeats}")
                local = phase_local(args, stage, model.head, prompt_ids, log)
            if "swarm" not in skip:
                from idlefleet.node.model.generate import BatchItem, generate_many
                from idlefleet.node.model.sampling import SamplingParams

                items = [BatchItem(p, ids, SamplingParams(max_new_tokens=args.tokens))
                         for p, ids in zip(PROMPTS, prompt_ids, strict=True)]
                want = {str(k): r.new_ids for k, r in generate_many(
                    model.head, stage, items, model.tokenizer.stop_ids, concurrency=8)}
                log(f"[{time.monotonic() - t_start:5.1f}s] (b) 6-node swarm, 1 vs {STREAMS} streams")
                swarm = phase_swarm(args, model, want, root, log, stage, prompt_ids[0])
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: reporting what was measured")
    goal = {"local_x8_over_x1": local.get("over_one_session", {}).get(8),
            "local_goal": GOAL_LOCAL_8,
            "swarm_x8_over_x1": swarm.get(f"x{STREAMS}_over_single"), "swarm_goal": GOAL_SWARM_8,
            "swarm_over_local_single": swarm.get("single_over_local"), "swarm_over_local_goal": 0.9}
    elapsed = time.monotonic() - t_start
    if not args.json:
        for k, v in goal.items():
            log(f"  {k}: {v}")
        log(f"total {elapsed:.0f}s, load average at end {os.getloadavg()[0]:.1f}")
    print(json.dumps({"bench": "throughput", "interrupted": interrupted,
                      "config": {"tokens": args.tokens, "repeats": args.repeats, "sizes": SIZES,
                                 "streams": STREAMS, "verify": not args.no_verify, "trusted": args.trusted,
                                 "chain": not args.no_chain, "waves": not args.no_waves},
                      "local": local, "swarm6": swarm, "goal": goal,
                      "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                      "elapsed_s": round(elapsed, 1)}))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
