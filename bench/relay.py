"""Relay messaging cost: chained steps forwarded between two hosts, one frame each or several per frame.

A stage server that computed a batch of ``--batch`` sessions' chained steps forwards them to the
next hop's server at once (``node.relay.RelayLinks``). To a ``/idlefleet/relay/1.1.0`` peer they go
as one ``relay_steps`` frame; to a 1.0.0 peer as one ``relay_step`` frame each, which is also what
every relayed step cost before 1.1.0. Here one ``RelayLinks`` sends batches of decode-sized steps
(one 576-wide float32 row, a 2-entry trail, as the third hop of a chain receives them) to two real
hosts on 127.0.0.1 (TCP + Noise + Yamux), one speaking each version, whose handlers read and
parse every step as ``serve_relay`` does (no compute). Both ends run on this process's one event
loop, so the process CPU time per step is what relaying costs both the sender and the receiver.
The two versions alternate in rounds (same machine load); medians and their ratio are printed.

    python -m bench.relay                 # batches of 4, 8 rounds of 300 batches per version
    python -m bench.relay --batch 1       # a lone step: the same frame either way
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from contextlib import AsyncExitStack  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idlefleet.node.serve.relay import RelayLinks  # noqa: E402
from idlefleet.p2p.errors import NetworkError  # noqa: E402
from idlefleet.p2p.framing import FramedStream  # noqa: E402
from idlefleet.p2p.host import HostConfig, open_host  # noqa: E402
from idlefleet.protocols import session as S  # noqa: E402
from idlefleet.protocols.tensors import encode_hidden  # noqa: E402

VERSIONS = {"1.1.0": S.RELAY_PROTOCOL, "1.0.0": S.RELAY_PROTOCOL_1_0}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    got = {"n": 0, "want": 0}
    arrived = trio.Event()  # every step of the round reached its receiver

    async def receive(fs: FramedStream) -> None:
        try:
            while True:
                env = await fs.receive(timeout=60)
                for body in S.relay_bodies(env.kind, env.body):
                    S.RelayStep.from_body(body)
                    got["n"] += 1
                if got["n"] >= got["want"]:
                    arrived.set()
        except NetworkError:
            return

    async with AsyncExitStack() as stack:
        sender = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
        peers: dict[str, str] = {}
        addrs: dict[str, list[str]] = {}
        for version, protocol in VERSIONS.items():
            host = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
            host.set_stream_handler(protocol, receive)  # speaks this version only
            peers[version] = host.peer_id
            addrs[host.peer_id] = host.multiaddrs()
        links = RelayLinks(sender, lambda peer: addrs[peer])
        row = encode_hidden(np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32))
        entry = S.TrailEntry(row, bytes(64), False, 1.0)
        hop = S.ChainHop(peers["1.1.0"], 1, bytes(16))
        body = S.RelayStep(1, bytes(16), 0, 1, (hop,), (entry, entry)).to_body()
        per_step: dict[str, list[float]] = {v: [] for v in VERSIONS}
        frames: dict[str, int] = dict.fromkeys(VERSIONS, 0)
        for rnd in range(args.rounds + 1):  # round 0 warms up (streams opened), not counted
            order = list(VERSIONS) if rnd % 2 else list(reversed(VERSIONS))
            for version in order:
                got["want"], frames0 = got["n"] + args.batches * args.batch, links.frames
                arrived = trio.Event()
                c0 = time.process_time()
                for _ in range(args.batches):
                    async with trio.open_nursery() as nursery:  # one batch's steps, ready together
                        for _ in range(args.batch):
                            nursery.start_soon(links.send, peers[version], body)
                with trio.fail_after(60):
                    await arrived.wait()
                if rnd:
                    per_step[version].append(1e3 * (time.process_time() - c0) / (args.batches * args.batch))
                    frames[version] += links.frames - frames0
    med = {v: statistics.median(xs) for v, xs in per_step.items()}
    steps = args.rounds * args.batches * args.batch
    return {"batch": args.batch, "rounds": args.rounds, "batches": args.batches,
            "cpu_ms_per_step": {v: round(m, 4) for v, m in med.items()},
            "frames_per_step": {v: round(frames[v] / steps, 3) for v in VERSIONS},
            "ratio_1_1_over_1_0": round(med["1.1.0"] / med["1.0.0"], 3)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="steps ready together (a computed batch)")
    p.add_argument("--batches", type=int, default=300, help="batches per round and version")
    p.add_argument("--rounds", type=int, default=8, help="rounds per version, alternating")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= S.RELAY_BATCH_MAX or args.batches < 1 or args.rounds < 1:
        p.error(f"--batch must be 1..{S.RELAY_BATCH_MAX}; --batches and --rounds at least 1")
    r = trio.run(run, args)
    if not args.json:
        for version in VERSIONS:
            print(f"relay {version}: {r['cpu_ms_per_step'][version]:.3f} ms CPU per relayed step "
                  f"(sender + receiver), {r['frames_per_step'][version]:.2f} frames per step")
        print(f"ratio 1.1.0 / 1.0.0 (batches of {args.batch}): {r['ratio_1_1_over_1_0']:.3f}")
    print(json.dumps({"bench": "relay", **r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
