"""Stage server fairness under a long prefill (issue 8, finding 4).

One StageServer (10 SmolLM2 blocks) on a real libp2p host; a "big" client peer sends one long
prefill step while an "honest" client peer decodes one token per step on its own session. It
measures, for the same work in the same run:

- baseline: the prefill computed in one piece (``prefill_chunk_tokens`` = the whole step and an
  unbounded working memory), as before chunking;
- chunked: the server's defaults (128 positions, 32 MiB working memory per chunk).

and prints the honest client's worst decode-step latency while the prefill runs, the prefill's own
time, and the peak memory numpy allocated (tracemalloc) during the prefill, with chunked/baseline
ratios. Run: ``python -m bench.server_fairness [--tokens 2048] [--json]``. Bounded: every step has a
deadline; nothing outside this process is started.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from typing import Any

import numpy as np
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.model.gguf_loader import open_model
from idlefleet.node.model.locate import find_default_model
from idlefleet.node.model.stage import Stage, load_stage
from idlefleet.node.serve.server import ServerConfig, StageServer
from idlefleet.p2p.framing import FramedStream
from idlefleet.p2p.host import Host, HostConfig, open_host
from idlefleet.protocols import session as S
from idlefleet.protocols.tensors import encode_hidden

STEP_DEADLINE_S = 120.0


async def _open(client: Host, peer: str, stage: Stage, max_length: int) -> FramedStream:
    fs = await client.open_stream(peer, S.STAGE_PROTOCOL)
    req = S.OpenRequest(stage.model_id, stage.start, stage.end, max_length)
    await fs.send("session_open", req.to_body(), timeout=10)
    reply = await fs.receive_reply(timeout=10)
    assert reply.kind == "session_opened"
    return fs


async def _step(fs: FramedStream, x: np.ndarray, position: int) -> None:
    await fs.send("step", S.Step(position, encode_hidden(x)).to_body(), timeout=STEP_DEADLINE_S)
    await fs.receive_reply(timeout=STEP_DEADLINE_S)


async def run_case(stage: Stage, config: ServerConfig, tokens: int) -> dict[str, float]:
    server = StageServer(stage, config)
    rng = np.random.default_rng(0)
    big_x = rng.standard_normal((tokens, stage.config.hidden_size)).astype(np.float32)
    one = rng.standard_normal((1, stage.config.hidden_size)).astype(np.float32)
    async with (
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as host,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as big,
        open_host(Ed25519PrivateKey.generate(), HostConfig()) as honest,
    ):
        host.set_stream_handler(S.STAGE_PROTOCOL, server.handle)
        peer = await big.connect(host.multiaddrs()[0])
        await honest.connect(host.multiaddrs()[0])
        a = await _open(big, peer, stage, tokens + 1)
        b = await _open(honest, peer, stage, 512)
        await _step(b, one, 0)
        prefill_done = trio.Event()
        worst = 0.0
        out: dict[str, float] = {}

        async def prefill() -> None:
            t0 = time.perf_counter()
            tracemalloc.start()
            await _step(a, big_x, 0)
            out["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            out["prefill_s"] = time.perf_counter() - t0
            prefill_done.set()

        async def decode() -> None:
            nonlocal worst
            position = 1
            while not prefill_done.is_set() and position < 500:
                t0 = time.perf_counter()
                await _step(b, one, position)
                worst = max(worst, time.perf_counter() - t0)
                position += 1
            out["decode_steps"] = position - 1

        with trio.fail_after(4 * STEP_DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prefill)
                await trio.sleep(0.05)  # the prefill is computing when the decode steps come
                nursery.start_soon(decode)
        out["worst_decode_s"] = worst
        return out


async def main_async(tokens: int) -> dict[str, Any]:
    with open_model(find_default_model()) as mf:
        stage = load_stage(mf, 0, 10)
    baseline = ServerConfig(prefill_chunk_tokens=tokens, workspace_bytes=1 << 40)
    chunked = ServerConfig()
    base = await run_case(stage, baseline, tokens)
    new = await run_case(stage, chunked, tokens)
    return {"tokens": tokens, "baseline": base, "chunked": new,
            "worst_decode_ratio": new["worst_decode_s"] / base["worst_decode_s"],
            "prefill_ratio": new["prefill_s"] / base["prefill_s"],
            "peak_memory_ratio": new["peak_mb"] / base["peak_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = trio.run(main_async, args.tokens)
    if args.json:
        print(json.dumps(r))
        return
    for name in ("baseline", "chunked"):
        c = r[name]
        print(f"{name:>8}: prefill of {r['tokens']} tokens {c['prefill_s']:.2f} s, peak numpy memory "
              f"{c['peak_mb']:.0f} MiB; honest decode steps during it: {c['decode_steps']:.0f}, "
              f"worst {c['worst_decode_s']:.2f} s")
    print(f"chunked/baseline: worst honest decode step {r['worst_decode_ratio']:.2f}x, prefill time "
          f"{r['prefill_ratio']:.2f}x, peak memory {r['peak_memory_ratio']:.2f}x")


if __name__ == "__main__":
    main()
