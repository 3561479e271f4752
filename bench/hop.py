"""Per-hop messaging cost: one-token steps through a one-block stage server, both ends in this process.

A real ``StageServer`` (block 0 of SmolLM2, with a key: it signs every step result as a node does)
on a real libp2p host (TCP + Noise + Yamux on 127.0.0.1) and a client host; the client sends
decode-sized steps (1 x 576 float32), waits for each reply and checks it and its signature, as
``Pipeline._step`` does. Both ends run on this process's one event loop, so a round trip's time is
the CPU both ends spend on it plus the block's compute (measured alone first): the rest is the
messaging overhead a hop adds to every token.

Three settings alternate in rounds of ``--steps`` steps (so all see the same machine load), and the
medians and their ratios are printed:

- ``per-read``: py-libp2p 0.8.1's own yamux rule, a WINDOW_UPDATE frame back after every read;
- ``batched``: ``p2p.framing``'s rule (the default), credit back once half the window is read;
- in both, the server computes a lone one-row step on its event loop (``ServerConfig.inline_rows``,
  the default);
- ``thread``: as ``batched``, but the server computes every step in its worker thread
  (``inline_rows=0``): two thread hand-offs per step.

It also times, per step, the client's tensor codec and reply checks (encode, decode, range, the
server's signature over the step commitment) apart from the round trip, and runs cProfile over one
extra batched round with ``--profile`` (top functions by own time). The machine may be shared:
only the paired ratios mean much.

    python -m bench.hop                  # 20 rounds x 25 steps per setting, ~10-40 s
    python -m bench.hop --rounds 40 --profile
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads BLAS: one thread, as each node runs

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from libp2p.stream_muxer.yamux.yamux import YamuxStream  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import idlefleet.p2p.framing  # noqa: E402, F401  (installs the batched rule)
from idlefleet.node.model.gguf_loader import open_model  # noqa: E402
from idlefleet.node.model.locate import find_default_model  # noqa: E402
from idlefleet.node.model.stage import load_stage  # noqa: E402
from idlefleet.node.serve.server import ServerConfig, StageServer  # noqa: E402
from idlefleet.p2p.host import HostConfig, open_host  # noqa: E402
from idlefleet.protocols import session as S  # noqa: E402
from idlefleet.protocols.tensors import TensorLimits, decode_hidden, encode_hidden  # noqa: E402
from idlefleet.protocols.verification import StepCommitment, row_digests, rows_root  # noqa: E402

BATCHED = YamuxStream._auto_tune_and_send_window_update
PER_READ = getattr(BATCHED, "__wrapped__", None)
SETTINGS = ("per-read", "batched", "thread")


def use(setting: str, server: StageServer) -> None:
    YamuxStream._auto_tune_and_send_window_update = (  # type: ignore[method-assign]
        PER_READ if setting == "per-read" and PER_READ is not None else BATCHED)
    # Reached into by name: the bench flips the server's compute path between rounds.
    server._batcher.inline_rows = 0 if setting == "thread" else server.config.inline_rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with open_model(find_default_model()) as mf:
        stage = load_stage(mf, 0, 1)
    server = StageServer(stage, ServerConfig(), key=Ed25519PrivateKey.generate())
    limits = TensorLimits(hidden_size=stage.config.hidden_size)
    x = np.random.default_rng(0).standard_normal((1, stage.config.hidden_size)).astype(np.float32)
    n_steps = len(SETTINGS) * args.rounds * args.steps + args.steps + 10
    cache = stage.new_cache(capacity=n_steps)
    alone = []
    for position in range(n_steps):  # what the server computes per step, at the same positions
        t0 = time.perf_counter()
        stage.forward(x, cache, position)
        alone.append(time.perf_counter() - t0)
    compute_ms = statistics.median(alone) * 1e3
    rtt: dict[str, list[float]] = {s: [] for s in SETTINGS}
    codec: list[float] = []
    top = ""
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as client,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await client.connect(host.multiaddrs()[0])
        fs = await client.open_stream(peer, S.STAGE_PROTOCOL)
        req = S.OpenRequest(stage.model_id, stage.start, stage.end, n_steps)
        await fs.send("session_open", req.to_body(), timeout=10)
        session = (await fs.receive_reply(timeout=10)).body["session"]
        assert server.peer_id is not None  # the server has a key
        position = 0

        async def step() -> tuple[float, float]:
            nonlocal position
            t = time.perf_counter()
            sent = encode_hidden(x)
            body = S.Step(position, sent).to_body()
            c = time.perf_counter() - t
            await fs.send("step", body, timeout=10)
            reply = await fs.receive_reply(timeout=10)
            t2 = time.perf_counter()
            result = S.StepResult.from_body(reply.body)
            out = decode_hidden(result.hidden, limits)
            _ = float(np.abs(out).max())  # the client's range check
            assert result.sig is not None
            StepCommitment(server.peer_id, client.peer_id, stage.model_id, stage.start,  # _check_sig
                           stage.end, session, position, 1, rows_root(row_digests(sent)),
                           rows_root(row_digests(result.hidden))).verify(result.sig)
            done = time.perf_counter()
            position += 1
            return done - t, c + done - t2

        with trio.fail_after(600):
            for _ in range(10):  # warm-up
                await step()
            for i in range(args.rounds):
                for setting in SETTINGS if i % 2 else reversed(SETTINGS):
                    use(setting, server)
                    for _ in range(args.steps):
                        total, c = await step()
                        rtt[setting].append(total * 1e3)
                        codec.append(c * 1e3)
            if args.profile:
                use("batched", server)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.steps):
                    await step()
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
                top = buf.getvalue()
        use("batched", server)
        await fs.aclose()
    med = {s: statistics.median(v) for s, v in rtt.items()}
    return {"block_compute_ms": round(compute_ms, 3),
            "rtt_ms": {s: round(v, 3) for s, v in med.items()},
            "overhead_ms": {s: round(v - compute_ms, 3) for s, v in med.items()},
            "client_codec_ms": round(statistics.median(codec), 3),
            "batched_over_per_read_rtt": round(med["batched"] / med["per-read"], 3),
            "batched_over_per_read_overhead": round((med["batched"] - compute_ms)
                                                    / (med["per-read"] - compute_ms), 3),
            "inline_over_thread_rtt": round(med["batched"] / med["thread"], 3),
            "inline_over_thread_overhead": round((med["batched"] - compute_ms)
                                                 / (med["thread"] - compute_ms), 3),
            "steps_per_setting": args.rounds * args.steps, "profile": top,
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20, help="rounds per setting (default 20)")
    p.add_argument("--steps", type=int, default=25, help="steps per round (default 25)")
    p.add_argument("--profile", action="store_true", help="cProfile one extra batched round")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    r = trio.run(run, args)
    if not args.json:
        print(f"one block computes in {r['block_compute_ms']} ms; {r['steps_per_setting']} steps per "
              f"setting, medians; load average {r['loadavg']}")
        for s in SETTINGS:
            print(f"  {s:>8}: round trip {r['rtt_ms'][s]:.3f} ms, overhead (round trip - compute) "
                  f"{r['overhead_ms'][s]:.3f} ms")
        print(f"  client tensor codec and reply checks (signature included) per step: "
              f"{r['client_codec_ms']:.3f} ms (inside the round trip)")
        print(f"  batched/per-read (yamux credit rule): round trip {r['batched_over_per_read_rtt']:.3f}x, "
              f"overhead {r['batched_over_per_read_overhead']:.3f}x")
        print(f"  batched/thread (server computes a one-row step on its event loop vs in its thread): "
              f"round trip {r['inline_over_thread_rtt']:.3f}x, "
              f"overhead {r['inline_over_thread_overhead']:.3f}x")
        if r["profile"]:
            print(r["profile"])
    print(json.dumps({"bench": "hop", **{k: v for k, v in r.items() if k != "profile"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
