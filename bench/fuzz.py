"""Fuzz every protocol a node speaks with mutated valid frames, against a real in-process node.

```
python -m bench.fuzz                         # 10^5 frames per protocol (long: see bench/README.md)
python -m bench.fuzz --frames 2000           # a shorter run
python -m bench.fuzz --protocols gossip,dht --seconds 120
```

One process holds a real node (``open_node``, with a StageServer on blocks [0, 2) of the default
model) and an attacker host with a fresh key and one real libp2p connection to it. For each
protocol (heartbeat, status, stage, relay (chained steps between stage servers), gossip RPC on
/meshsub/1.1.0, Kademlia on /ipfs/kad/1.0.0, identify push, ping)
the attacker takes valid frames (seeds), applies 1-4 random byte mutations (bit flips, random
bytes, inserts, deletions, duplicated or cut ranges, huge length prefixes, splices of two seeds),
writes each result on a new stream, closes its side and reads whatever comes back within a short
deadline. Every ``--probe-every`` frames a third host asks the node for its status: a node that
does not answer 3 probes in a row (5 s each) is a *hang*; an exception leaving the node is a
*crash*. RSS of this process is read from /proc before and after each protocol. Deterministic
for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PROTOCOLS = ("heartbeat", "status", "stage", "relay", "gossip", "dht", "identify", "ping")
HEARTBEAT = "/idlefleet/heartbeat/1.0.0"
STATUS = "/idlefleet/status/1.0.0"
STAGE = "/idlefleet/stage/1.0.0"
RELAY = "/idlefleet/relay/1.1.0"
MESHSUB = "/meshsub/1.1.0"
KAD = "/ipfs/kad/1.0.0"  # p2p.host.DHT_PROTOCOL: py-libp2p 0.8.1 ignores the DHT prefix
PROTOCOL_IDS = {"heartbeat": HEARTBEAT, "status": STATUS, "stage": STAGE, "relay": RELAY, "gossip": MESHSUB,
                "dht": KAD,
                "identify": "/ipfs/id/push/1.0.0", "ping": "/ipfs/ping/1.0.0"}
PROBE_ATTEMPTS = 3  # a node that answers none of them within PROBE_TIMEOUT_S each is hung
PROBE_TIMEOUT_S = 5.0
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xDE, 0xDF, 0xFF)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- mutation -----------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes, seeds: Sequence[bytes]) -> bytes:
    """1-4 random byte-level mutations of ``data`` (``seeds`` are spliced from)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(out)
        if op == 0 and n:  # flip one bit
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            out[rng.randrange(n)] = rng.choice(INTERESTING)
        elif op == 2:  # insert random bytes
            i = rng.randrange(n + 1)
            out[i:i] = rng.randbytes(rng.choice((1, 2, 4, 8, 64)))
        elif op == 3 and n > 1:  # delete a range
            i = rng.randrange(n)
            del out[i : i + rng.randint(1, max(1, n // 4))]
        elif op == 4 and n > 1:  # duplicate a range
            i = rng.randrange(n)
            out[i:i] = out[i : i + rng.randint(1, 32)]
        elif op == 5 and n:  # cut the end
            del out[rng.randrange(n) :]
        elif op == 6 and n >= 4:  # a huge or odd 32-bit value somewhere (length prefixes)
            i = rng.randrange(n - 3)
            out[i : i + 4] = struct.pack(">I", rng.choice((0, 1, 255, 256, 257, 1 << 24, 0xFFFFFFFF)))
        elif op == 7 and seeds:  # splice with another seed
            other = rng.choice(seeds)
            out = out[: rng.randrange(n + 1)] + bytearray(other[rng.randrange(len(other) + 1) :])
        elif op == 8 and n:  # random bytes over a range
            i = rng.randrange(n)
            k = rng.randint(1, 16)
            out[i : i + k] = rng.randbytes(k)
    return bytes(out)


# --- seeds: valid frames of every protocol ------------------------------------------------------


def framed_seeds(kind: str) -> list[bytes]:
    from idlefleet.protocols import wire

    if kind == "heartbeat":
        return [wire.frame(wire.encode_envelope("heartbeat", {"nonce": n})) for n in (0, 7, 2**64 - 1)]
    if kind == "status":
        return [wire.frame(wire.encode_envelope("status_request", {}))]
    raise ValueError(kind)


def stage_seeds(model_id: str, start: int, end: int, hidden_size: int) -> list[bytes]:
    import numpy as np

    from idlefleet.protocols import session as S
    from idlefleet.protocols import wire
    from idlefleet.protocols.tensors import encode_hidden

    def f(kind: str, body: dict[str, Any]) -> bytes:
        return wire.frame(wire.encode_envelope(kind, body))

    x = np.random.default_rng(0).standard_normal((1, hidden_size)).astype(np.float32)
    opened = f("session_open", S.OpenRequest(model_id, start, end, 16).to_body())
    seeds = []
    for dtype in ("float32", "float16", "int8"):
        step = f("step", S.Step(0, encode_hidden(x, dtype)).to_body())
        seeds.append(opened + step + f("session_close", {}))
    seeds.append(f("session_open", S.OpenRequest(model_id, start, end, 16, "int8").to_body()))
    # A chained step whose next hop is nobody: the server says chain_failed, the session goes on.
    nobody = S.ChainHop("12D3KooWNobodyNobodyNobodyNobodyNobodyNobodyNobody", 1, bytes(16))
    seeds.append(opened + f("step", S.Step(0, encode_hidden(x), (nobody,), 1).to_body()))
    return seeds


def relay_seeds(hidden_size: int) -> list[bytes]:
    """Relayed steps for sessions the node does not hold (a stranger cannot know a relay token)."""
    import numpy as np

    from idlefleet.protocols import session as S
    from idlefleet.protocols import wire
    from idlefleet.protocols.tensors import encode_hidden

    x = encode_hidden(np.random.default_rng(0).standard_normal((1, hidden_size)).astype(np.float32))
    entry = S.TrailEntry(x, bytes(64), False, 1.0)
    hop = S.ChainHop("12D3KooWNobodyNobodyNobodyNobodyNobodyNobodyNobody", 1, bytes(16))
    bodies = [S.RelayStep(sid, bytes(16), 0, seq, chain, (entry,) * n).to_body()
              for sid, seq, chain, n in ((0, 1, (), 1), (2**40, 7, (hop,), 2))]
    return ([wire.frame(wire.encode_envelope("relay_step", body)) for body in bodies]
            + [wire.frame(wire.encode_envelope("relay_steps", {"steps": bodies}))])


def gossip_seeds(key: Ed25519PrivateKey, topic: str, record: bytes) -> list[bytes]:
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX
    from libp2p.utils.varint import encode_uvarint

    from idlefleet.p2p.identity import libp2p_key_pair
    from idlefleet.protocols import wire

    pair = libp2p_key_pair(key)
    from libp2p.peer.id import ID

    me = ID.from_pubkey(pair.public_key).to_bytes()

    def prefixed(rpc: Any) -> bytes:
        body = rpc.SerializeToString()
        return bytes(encode_uvarint(len(body))) + body

    signed = rpc_pb2.Message(data=wire.encode_envelope("capacity", {"record": record}), topicIDs=[topic],
                             from_id=me, seqno=(1).to_bytes(8, "big"))
    signed.signature = pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + signed.SerializeToString())
    signed.key = pair.public_key.serialize()
    seeds = [
        prefixed(rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=topic)])),
        prefixed(rpc_pb2.RPC(publish=[signed])),
        prefixed(rpc_pb2.RPC(control=rpc_pb2.ControlMessage(
            ihave=[rpc_pb2.ControlIHave(topicID=topic, messageIDs=[me + b"\0" * 8])],
            iwant=[rpc_pb2.ControlIWant(messageIDs=[me + b"\1" * 8])],
            graft=[rpc_pb2.ControlGraft(topicID=topic)],
            prune=[rpc_pb2.ControlPrune(topicID=topic)]))),
    ]
    return seeds


def dht_seeds(key: Ed25519PrivateKey, record: bytes, node_peer: str) -> list[bytes]:
    from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
    from libp2p.peer.id import ID
    from libp2p.utils.varint import encode_uvarint

    from idlefleet.p2p.identity import peer_id_of
    from idlefleet.protocols.dhtkeys import block_provider_multihash

    me = peer_id_of(key)
    me_bytes = ID.from_base58(me).to_bytes()
    rec_key = f"/idlefleet/{me}".encode()
    addr = bytes.fromhex("047f000001060fa1")  # /ip4/127.0.0.1/tcp/4001

    def prefixed(m: Any) -> bytes:
        body = m.SerializeToString()
        return bytes(encode_uvarint(len(body))) + body

    block_key = block_provider_multihash("gguf-sha256:" + "0" * 64, 0)
    return [
        prefixed(Message(type=Message.FIND_NODE, key=ID.from_base58(node_peer).to_bytes())),
        prefixed(Message(type=Message.GET_VALUE, key=rec_key)),
        prefixed(Message(type=Message.PUT_VALUE, key=rec_key, record=Record(key=rec_key, value=record))),
        prefixed(Message(type=Message.GET_PROVIDERS, key=block_key)),
        prefixed(Message(type=Message.ADD_PROVIDER, key=block_key,
                         providerPeers=[Message.Peer(id=me_bytes, addrs=[addr])])),
        prefixed(Message(type=Message.PING)),
    ]


def identify_seeds(key: Ed25519PrivateKey) -> list[bytes]:
    from libp2p.identity.identify.pb.identify_pb2 import Identify
    from libp2p.utils.varint import encode_uvarint

    from idlefleet.p2p.identity import libp2p_key_pair

    msg = Identify(protocol_version="ipfs/0.1.0", agent_version="fuzz",
                   public_key=libp2p_key_pair(key).public_key.serialize(),
                   listen_addrs=[bytes.fromhex("047f000001060fa1")],
                   observed_addr=bytes.fromhex("047f000001060fa2"),
                   protocols=["/meshsub/1.1.0", "/idlefleet/status/1.0.0"])
    body = msg.SerializeToString()
    return [bytes(encode_uvarint(len(body))) + body]


def ping_seeds() -> list[bytes]:
    return [bytes(32), bytes(range(32)), bytes(64)]


# --- the campaign -------------------------------------------------------------------------------


@dataclass
class ProtocolResult:
    protocol: str
    frames: int = 0
    seconds: float = 0.0
    crashes: int = 0
    hangs: int = 0
    slow_replies: int = 0  # no EOF from the node within the read deadline (not a hang)
    open_failures: int = 0  # streams the node refused (per-peer stream cap) or a lost connection
    probe_max_s: float = 0.0  # slowest status answer (the machine's load shows here)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    handler_crashes_caught: int = 0  # exceptions the node's crash boundary caught
    errors: list[str] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


async def _send_one(attacker: Any, peer: str, protocol: str, payload: bytes, read_s: float) -> bool:
    """Write ``payload`` on a new stream, close our side, read until EOF. False if EOF is late."""
    from idlefleet.p2p.errors import NetworkError

    try:
        fs = await attacker.open_stream(peer, protocol, timeout=5)
    except NetworkError:
        raise
    stream = fs._stream
    try:
        with trio.move_on_after(5):
            await stream.write(payload)
            await stream.close()
        with trio.move_on_after(read_s) as scope:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
        return not scope.cancelled_caught
    except Exception:
        return True  # reset by the node: an answer too
    finally:
        await fs.reset()


async def fuzz_protocol(node: Any, attacker: Any, prober: Any, protocol: str, seeds: list[bytes], *,
                        frames: int, seconds: float, seed: int, probe_every: int = 200,
                        concurrency: int = 4, read_s: float = 1.0,
                        progress: Callable[[ProtocolResult], None] | None = None) -> ProtocolResult:
    """Send up to ``frames`` mutated seeds (or for ``seconds``) on ``protocol`` to ``node``."""
    from idlefleet.p2p.errors import NetworkError

    proto_id = PROTOCOL_IDS[protocol]
    read_s = 0.05 if protocol == "gossip" else read_s  # pubsub never answers on an inbound stream
    res = ProtocolResult(protocol, rss_before_mb=rss_mb())
    crashes_before = node.host.stats.handler_crashes
    rng = random.Random(f"{seed}:{protocol}")
    node_addr = node.multiaddrs[0]
    peer = node.peer_id
    started = time.monotonic()
    deadline = started + seconds

    async def probe() -> None:
        # A loaded machine can miss one 5 s deadline; a hung node misses every one.
        for attempt in range(PROBE_ATTEMPTS):
            t0 = time.monotonic()
            try:
                env = await prober.request(peer, STATUS, "status_request", {}, timeout=PROBE_TIMEOUT_S)
                if env.kind == "status_response":
                    res.probe_max_s = max(res.probe_max_s, time.monotonic() - t0)
                    return
                raise RuntimeError(f"status probe got {env.kind}")
            except Exception as e:
                res.errors.append(f"probe {attempt + 1} after {res.frames} frames: {e!r}")
        res.hangs += 1

    sent = 0
    while sent < frames and time.monotonic() < deadline and res.hangs == 0:
        batch = [mutate(rng, rng.choice(seeds), seeds) if rng.random() > 0.05 else rng.choice(seeds)
                 for _ in range(min(concurrency, frames - sent))]
        results: list[bool] = []

        async def one(payload: bytes, results: list[bool] = results) -> None:
            try:
                results.append(await _send_one(attacker, peer, proto_id, payload, read_s))
            except NetworkError:
                res.open_failures += 1
                with trio.move_on_after(5):
                    try:
                        await attacker.connect(node_addr)
                    except NetworkError as e:
                        res.errors.append(f"reconnect: {e}")

        async with trio.open_nursery() as nursery:
            for payload in batch:
                nursery.start_soon(one, payload)
        if protocol != "gossip":
            res.slow_replies += results.count(False)
        sent += len(batch)
        res.frames = sent
        if sent % probe_every < len(batch):
            await probe()
            if progress is not None:
                res.seconds = time.monotonic() - started
                progress(res)
    await probe()
    res.seconds = time.monotonic() - started
    res.rss_after_mb = rss_mb()
    res.handler_crashes_caught = node.host.stats.handler_crashes - crashes_before
    res.errors = res.errors[:10]
    return res


async def heartbeat_ack(peer_id: str, env: Any) -> tuple[str, dict[str, Any]]:
    return "heartbeat_ack", {"nonce": env.body["nonce"]}


async def _relay_nowhere(peer: str, body: dict[str, Any]) -> None:
    """The fuzzed node's chained steps go nowhere: every forward fails, as to a dead next hop."""
    from idlefleet.p2p.errors import NetworkError

    raise NetworkError(f"no relay to {peer[-8:]} in a fuzz run")


async def campaign(work: Path, protocols: Sequence[str], *, frames: int, seconds: float, seed: int,
                   stage: Any = None, probe_every: int = 200, concurrency: int = 4,
                   progress: Callable[[ProtocolResult], None] | None = None) -> list[ProtocolResult]:
    """Start a node (+ StageServer if ``stage``), an attacker and a prober; fuzz each protocol.

    A crash of the node (an exception leaving it) ends the run: it is recorded on the protocol
    being fuzzed and the remaining protocols are not run.
    """
    from idlefleet.node.config import NodeConfig
    from idlefleet.node.runtime.node import capacity_topic, open_node
    from idlefleet.node.serve.relay import serve_relay
    from idlefleet.node.serve.server import StageServer
    from idlefleet.p2p.host import HostConfig, open_host
    from idlefleet.p2p.liveness import HEARTBEAT_PROTOCOL

    results: list[ProtocolResult] = []
    current: list[ProtocolResult] = []
    try:
        async with AsyncExitStack() as stack:
            node = await stack.enter_async_context(open_node(NodeConfig(
                key_file=work / "node.key", vehicle="sim:parked:seed=1", consent=True, serve=False,
                event_log=work / "events.jsonl")))
            if stage is not None:
                server = StageServer(stage, key=Ed25519PrivateKey.generate(), relay=_relay_nowhere)
                node.host.set_stream_handler(STAGE, server.handle)

                async def relay_handler(fs: Any, server: StageServer = server) -> None:
                    await serve_relay(fs, lambda sid: server if server.holds(sid) else None,
                                      lambda why: None)

                node.host.set_stream_handler(RELAY, relay_handler)
            key = Ed25519PrivateKey.generate()
            attacker = await stack.enter_async_context(open_host(key, HostConfig()))
            prober = await stack.enter_async_context(open_host(Ed25519PrivateKey.generate(), HostConfig()))
            for h in (attacker, prober):  # answer the node's heartbeats: stay connected
                h.set_request_handler(HEARTBEAT_PROTOCOL, "heartbeat", heartbeat_ack)
                await h.connect(node.multiaddrs[0])
            own = node.view.get(node.peer_id)
            record = own.raw if own is not None else b""
            for protocol in protocols:
                if protocol == "stage":
                    if stage is None:
                        continue
                    seeds = stage_seeds(stage.model_id, stage.start, stage.end, stage.config.hidden_size)
                elif protocol == "relay":
                    if stage is None:
                        continue
                    seeds = relay_seeds(stage.config.hidden_size)
                elif protocol == "gossip":
                    seeds = gossip_seeds(key, capacity_topic(node.config.region), record)
                elif protocol == "dht":
                    seeds = dht_seeds(key, record, node.peer_id)
                elif protocol == "identify":
                    seeds = identify_seeds(key)
                elif protocol == "ping":
                    seeds = ping_seeds()
                else:
                    seeds = framed_seeds(protocol)
                current[:] = [ProtocolResult(protocol)]
                res = await fuzz_protocol(node, attacker, prober, protocol, seeds, frames=frames,
                                          seconds=seconds, seed=seed, probe_every=probe_every,
                                          concurrency=concurrency, progress=progress)
                results.append(res)
                current.clear()
                if res.hangs:
                    break
    except Exception as e:  # the node died: that is the finding
        crashed = current[0] if current else ProtocolResult("startup")
        crashed.crashes += 1
        crashed.errors.append("".join(traceback.format_exception(e))[-2000:])
        results.append(crashed)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--frames", type=int, default=100_000, help="per protocol")
    p.add_argument("--seconds", type=float, default=3600.0, help="per protocol, at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--probe-every", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    protocols = [x for x in args.protocols.split(",") if x]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        p.error(f"unknown protocols {sorted(unknown)}; choose from {','.join(PROTOCOLS)}")

    stage = None
    if "stage" in protocols or "relay" in protocols:
        from idlefleet.node.model.gguf_loader import open_model
        from idlefleet.node.model.locate import find_default_model
        from idlefleet.node.model.stage import load_stage

        stage = load_stage(open_model(find_default_model()), 0, 2)

    def progress(r: ProtocolResult) -> None:
        if not args.json:
            print(f"  {r.protocol}: {r.frames} frames, {r.frames_per_s:.0f}/s, rss {rss_mb():.0f} MB",
                  file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="idlefleet-fuzz-") as tmp:
        results = trio.run(lambda: campaign(Path(tmp), protocols, frames=args.frames, seconds=args.seconds,
                                            seed=args.seed, stage=stage, probe_every=args.probe_every,
                                            concurrency=args.concurrency, progress=progress))
    rows = [asdict(r) | {"frames_per_s": round(r.frames_per_s, 1)} for r in results]
    if not args.json:
        print(f"{'protocol':10} {'frames':>8} {'frames/s':>9} {'crashes':>7} {'hangs':>5} "
              f"{'slow':>5} {'caught':>6} {'probe s':>6} {'refused':>6} "
              f"{'rss MB before -> after':>24}")
        for r in results:
            print(f"{r.protocol:10} {r.frames:8d} {r.frames_per_s:9.0f} {r.crashes:7d} {r.hangs:5d} "
                  f"{r.slow_replies:5d} {r.handler_crashes_caught:6d} {r.probe_max_s:6.1f} "
                  f"{r.open_failures:6d} "
                  f"{r.rss_before_mb:11.0f} -> {r.rss_after_mb:.0f}")
            for e in r.errors[:3]:
                print(f"    {e[:300]}")
    print(json.dumps({"seed": args.seed, "results": rows}))
    return 1 if any(r.crashes or r.hangs for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
