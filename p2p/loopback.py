"""A stream to ourselves: two connected :class:`FramedStream` ends inside one process.

libp2p cannot open a stream to its own peer id, yet a node that serves blocks and also generates
(its HTTP API) must be able to route through its own stage server. ``loopback_pair`` gives both
ends the same framing, limits, errors and byte counters as a network stream, so the server and the
client code paths stay exactly the ones used between peers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from .framing import FramedStream

# Frames in flight per direction: like a socket's buffer, so a best-effort error reply never
# waits for a reader that has already gone.
BUFFER_CHUNKS = 16


class _PipeEnd:
    """The part of libp2p's ``INetStream`` that ``FramedStream`` uses, over memory channels."""

    def __init__(self, peer_id: str, send: trio.MemorySendChannel[bytes],
                 receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer_id))
        self._send = send
        self._receive = receive
        self._pending = b""

    async def write(self, data: bytes) -> None:
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StreamReset("the other end of the loopback stream is gone") from None

    async def read(self, n: int = -1) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._receive.receive()
            except trio.EndOfChannel:
                raise StreamEOF("loopback stream closed") from None
            except trio.ClosedResourceError:
                raise StreamReset("loopback stream reset") from None
        size = len(self._pending) if n is None or n < 0 else n
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def get_protocol(self) -> None:  # no protocol negotiated: the caller knows what it opened
        return None

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def loopback_pair(peer_id: str) -> tuple[FramedStream, FramedStream]:
    """Two connected framed streams; each reports ``peer_id`` as the peer at the other end."""
    a_send, b_receive = trio.open_memory_channel[bytes](BUFFER_CHUNKS)
    b_send, a_receive = trio.open_memory_channel[bytes](BUFFER_CHUNKS)
    a: Any = _PipeEnd(peer_id, a_send, a_receive)
    b: Any = _PipeEnd(peer_id, b_send, b_receive)
    return FramedStream(cast(INetStream, a)), FramedStream(cast(INetStream, b))
