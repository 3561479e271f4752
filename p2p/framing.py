"""Length-prefixed msgpack envelopes over libp2p streams, every read and write under a deadline.

A SIGKILLed peer looks like a clean EOF to a reader: the 4-byte length prefix makes a truncated
frame detectable (``RemoteProtocolError``), while EOF between frames is ``StreamClosed``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamClosed as Libp2pStreamClosed
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset

from idlefleet.protocols.errors import RemoteProtocolError
from idlefleet.protocols.wire import (
    MAX_FRAME,
    Envelope,
    FrameDecoder,
    decode_envelope,
    encode_envelope,
    frame,
)

from .errors import DeadlineExceeded, NetworkError, RemoteError, StreamClosed

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16


def _batch_yamux_window_updates() -> None:
    """Return yamux receive credit once half the window has been read, not after every read.

    py-libp2p 0.8.1 sends a WINDOW_UPDATE frame after every read that frees any credit (its
    "partial slack" rule), so each small message (a 2.3 kB decode step) costs a second frame the
    other way: encrypted, written, woken for and decrypted by the peer. go-yamux (and the yamux
    spec's intent) sends one only once at least half the window is free. Here reads below that
    threshold just add to the stream's pending credit; at the threshold py-libp2p's own update
    logic runs (including its window auto-tuning). The sender always keeps at least half a window
    to write into, so no stream stalls; peers see fewer, larger updates (still valid yamux).
    """
    try:
        from libp2p.stream_muxer.yamux.yamux import YamuxStream
    except ImportError:  # another muxer layout: leave it alone
        return
    update = getattr(YamuxStream, "_auto_tune_and_send_window_update", None)
    if update is None or not hasattr(YamuxStream, "_grow_threshold") or getattr(update, "batched", False):
        return  # not the py-libp2p 0.8.1 we know

    async def batched(self: Any, *, bytes_read: int = 0) -> None:
        self._pending_recv_release += bytes_read
        if self._pending_recv_release < self._grow_threshold():
            return
        await update(self, bytes_read=0)  # pending credit, under the library's own rules

    batched.batched = True  # type: ignore[attr-defined]
    batched.__wrapped__ = update  # type: ignore[attr-defined]  # the library's rule (bench/hop.py)
    YamuxStream._auto_tune_and_send_window_update = batched  # type: ignore[method-assign]


_batch_yamux_window_updates()


class FramedStream:
    """One libp2p stream carrying framed envelopes. Not safe for concurrent ``receive`` calls."""

    def __init__(self, stream: INetStream, *, max_frame: int = MAX_FRAME) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._send_lock = trio.Lock()
        self.peer_id: str = stream.muxed_conn.peer_id.to_base58()
        self.protocol: str | None = stream.get_protocol()  # as negotiated (multistream-select)
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, kind: str, body: dict[str, Any], *, timeout: float) -> None:
        """Encode and send one envelope. Raises DeadlineExceeded or NetworkError."""
        data = frame(encode_envelope(kind, body))
        try:  # uncontended (the usual case): no schedule point of its own; the write has several
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            with trio.fail_after(timeout):
                await self._stream.write(data)
        except trio.TooSlowError:
            raise DeadlineExceeded(f"send {kind} to {self.peer_id[-8:]} took over {timeout}s") from None
        except Exception as e:  # py-libp2p raises assorted stream/muxer/OS errors on a dead link
            raise NetworkError(f"send {kind} to {self.peer_id[-8:]} failed: {e!r}") from None
        finally:
            self._send_lock.release()
        self.bytes_sent += len(data)

    async def receive(self, *, timeout: float) -> Envelope:
        """Receive one envelope.

        Raises RemoteProtocolError (garbage, oversized or truncated frame), StreamClosed (clean EOF
        between frames), DeadlineExceeded, or NetworkError (reset).
        """
        with trio.move_on_after(timeout):
            while True:
                payload = self._decoder.next_frame()
                if payload is not None:
                    return decode_envelope(payload)
                try:
                    chunk = await self._stream.read(READ_CHUNK)
                except StreamEOF:
                    chunk = b""
                except (StreamReset, StreamError, Libp2pStreamClosed) as e:
                    raise NetworkError(f"stream from {self.peer_id[-8:]} reset: {e!r}") from None
                if not chunk:
                    self._decoder.at_eof()  # raises RemoteProtocolError on a partial frame
                    raise StreamClosed(f"{self.peer_id[-8:]} closed the stream")
                self.bytes_received += len(chunk)
                self._decoder.feed(chunk)
        raise DeadlineExceeded(f"no frame from {self.peer_id[-8:]} within {timeout}s")

    async def receive_reply(self, *, timeout: float) -> Envelope:
        """Like ``receive``, but an ``error`` envelope raises RemoteError."""
        env = await self.receive(timeout=timeout)
        if env.kind == "error":
            raise RemoteError(str(env.body.get("code", "error")), str(env.body.get("message", "")))
        return env

    async def send_error(self, code: str, message: str, *, timeout: float = 2.0) -> None:
        """Best effort: tell the peer why we refuse its input."""
        try:
            await self.send("error", {"code": code, "message": message[:500]}, timeout=timeout)
        except NetworkError as e:
            log.debug("could not send error to %s: %s", self.peer_id[-8:], e)

    async def aclose(self) -> None:
        """Close our side; never blocks for long (a frozen peer must not hang us)."""
        with trio.move_on_after(1.0):
            try:
                await self._stream.close()
            except Exception as e:  # closing a dead stream may raise anything; we only log it
                log.debug("closing stream to %s: %r", self.peer_id[-8:], e)

    async def reset(self) -> None:
        with trio.move_on_after(1.0):
            try:
                await self._stream.reset()
            except Exception as e:
                log.debug("resetting stream to %s: %r", self.peer_id[-8:], e)


async def serve_requests(fs: FramedStream, protocol: str, kind: str,
                         handler: Callable[[str, Envelope], Awaitable[tuple[str, dict[str, Any]]]], *,
                         request_timeout_s: float, idle_s: float, on_served: Callable[[], None]) -> None:
    """Answer ``kind`` requests on ``fs`` until the peer closes it or stays silent: the first for
    ``request_timeout_s``, later ones (a client reusing the stream) for ``idle_s``. A request of
    another kind raises RemoteProtocolError (the caller's crash boundary answers it)."""
    wait = request_timeout_s
    while True:
        try:
            env = await fs.receive(timeout=wait)
        except (StreamClosed, DeadlineExceeded):
            return
        if env.kind != kind:
            raise RemoteProtocolError(f"{protocol} expects {kind!r}, got {env.kind!r}")
        reply_kind, body = await handler(fs.peer_id, env)
        on_served()
        await fs.send(reply_kind, body, timeout=request_timeout_s)
        wait = idle_s
