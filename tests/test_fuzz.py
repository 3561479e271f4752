"""Fuzzing (issue 8): decoders under hypothesis, and mutated frames against a live in-process node.

The long runs are ``python -m bench.fuzz`` (bench/README.md); this is the quick pass: every
decoder a peer's bytes reach raises only RemoteProtocolError, and a few hundred mutated frames per
protocol neither crash nor hang a real node.
"""

from __future__ import annotations

import contextlib
import random
import struct
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import PROTOCOLS, campaign, framed_seeds, mutate
from idlefleet.node.model.stage import Stage
from idlefleet.node.runtime.node import STATUS_PROTOCOL
from idlefleet.p2p.host import HostConfig, open_host
from idlefleet.protocols import session as S
from idlefleet.protocols import wire
from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.notices import decode_notice
from idlefleet.protocols.records import validate_record
from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden
from tests.test_stage_server import two_blocks  # noqa: F401

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-shaped values, as a peer can send them after the envelope decodes.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(),
                    st.text(max_size=20), st.binary(max_size=64))
values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=10), kids, max_size=5)), max_leaves=20)
bodies = st.dictionaries(st.sampled_from(["model_id", "start", "end", "max_length", "dtype", "position",
                                          "hidden", "x", "chain", "seq", "fence", "session", "relay",
                                          "trail", "ahead"]), values, max_size=8)
tensors = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["float32", "float16", "int8"]), values),
    "shape": st.one_of(st.lists(st.integers(-2, 40), max_size=3), values),
    "data": st.one_of(st.binary(max_size=512), values),
    "scales": st.one_of(st.binary(max_size=64), values),
})


def only_remote_errors(fn: Any, *args: Any) -> None:
    with contextlib.suppress(RemoteProtocolError):
        fn(*args)


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_remote_protocol_error(data: bytes) -> None:
    only_remote_errors(wire.decode_envelope, data)
    only_remote_errors(validate_record, data, 1_700_000_000.0)
    only_remote_errors(decode_notice, data, 1_700_000_000.0)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(1, 300))
def test_frame_decoder_never_buffers_past_its_limit(chunks: list[bytes], limit: int) -> None:
    dec = wire.FrameDecoder(max_frame=limit)
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while (payload := dec.next_frame()) is not None:
                assert len(payload) <= limit
            assert dec.buffered <= 4 + limit + len(chunk)
        dec.at_eof()
    except RemoteProtocolError:
        pass


@FUZZ
@given(bodies)
def test_session_messages_from_any_body_raise_only_remote_errors(body: dict[str, Any]) -> None:
    only_remote_errors(S.OpenRequest.from_body, body)
    only_remote_errors(S.Step.from_body, body)
    only_remote_errors(S.StepResult.from_body, body)
    only_remote_errors(S.RelayStep.from_body, body)
    only_remote_errors(S.ChainResult.from_body, body)


@FUZZ
@given(tensors, st.sampled_from([1e-3, 1.0, 3e38, float("inf"), float("nan")]))
def test_any_tensor_map_decodes_to_finite_values_or_raises(obj: dict[str, Any], scale: float) -> None:
    if obj.get("dtype") == "int8" and isinstance(obj.get("shape"), list) and obj["shape"]:
        rows = obj["shape"][0]
        if isinstance(rows, int) and 0 < rows < 40:
            obj["scales"] = struct.pack(f"<{rows}f", *[scale] * rows)
    try:
        out = decode_hidden(EncodedTensor.from_dict(obj), TensorLimits())
    except RemoteProtocolError:
        return
    assert out.dtype.name == "float32" and bool((abs(out) < float("inf")).all())


def test_mutation_is_deterministic_and_changes_frames() -> None:
    seeds = framed_seeds("heartbeat")
    a = [mutate(random.Random(1), s, seeds) for s in seeds]
    assert a == [mutate(random.Random(1), s, seeds) for s in seeds]
    assert any(m != s for m, s in zip(a, seeds, strict=True))


async def test_mutated_frames_on_every_protocol_neither_crash_nor_hang_a_node(
        tmp_path: Path, two_blocks: Stage) -> None:  # noqa: F811
    results = await campaign(tmp_path, PROTOCOLS, frames=60, seconds=15, seed=8, stage=two_blocks,
                             probe_every=30)
    assert [r.protocol for r in results] == list(PROTOCOLS), results
    for r in results:
        assert (r.crashes, r.hangs) == (0, 0), (r.protocol, r.errors)
        assert r.frames >= 30, r  # at least half the quota within the time limit, even on a busy machine
        assert r.rss_after_mb - r.rss_before_mb < 64, r
    gossip = next(r for r in results if r.protocol == "gossip")
    assert gossip.handler_crashes_caught > 0  # truncated RPCs raise inside py-libp2p: caught


async def test_transport_garbage_does_not_hurt_the_node() -> None:
    from libp2p.peer.id import ID

    async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as node:
        node.set_request_handler(STATUS_PROTOCOL, "status_request",
                                 lambda peer, env: _status_reply())
        addr = node.multiaddrs()[0]
        port = int(addr.split("/tcp/")[1].split("/")[0])
        for garbage in (b"\x13/multistream/1.0.0\n" + b"\xff" * 100, b"GET / HTTP/1.1\r\n\r\n",
                        random.Random(1).randbytes(4096)):  # before or instead of the Noise handshake
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            await sock.send_all(garbage)
            with trio.move_on_after(0.5):
                await sock.receive_some(100)
            await sock.aclose()
        for garbage in (b"\x00\x00\x00\x00" + b"\xff" * 8,  # yamux frames inside Noise: bad version,
                        b"\x00\x01\x00\x01\x00\x00\x00\x01\xff\xff\xff\xff",  # huge window update,
                        b"\x00\x00\x00\x02\x00\x00\x00\x03\x7f\xff\xff\xff" + b"x" * 100,  # lying length
                        random.Random(2).randbytes(64)):
            async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as attacker:
                peer = await attacker.connect(addr)
                conns = attacker._host.get_network().connections[ID.from_base58(peer)]
                secured = (conns[0] if isinstance(conns, list) else conns).muxed_conn.secured_conn
                await secured.write(garbage)
                await trio.sleep(0.3)
        async with open_host(Ed25519PrivateKey.generate(), HostConfig()) as client:
            peer = await client.connect(addr)
            env = await client.request(peer, STATUS_PROTOCOL, "status_request", {}, timeout=5)
            assert env.kind == "status_response"


async def _status_reply() -> tuple[str, dict[str, Any]]:
    return "status_response", {"records": []}


def test_campaign_seeds_are_valid_frames() -> None:
    for kind in ("heartbeat", "status"):
        for frame in framed_seeds(kind):
            dec = wire.FrameDecoder()
            dec.feed(frame)
            payload = dec.next_frame()
            assert payload is not None and wire.decode_envelope(payload).kind.startswith(kind[:6])
