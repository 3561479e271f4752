"""Errors of the networking layer. Every network operation has a deadline; these say which failed."""

from __future__ import annotations

from idlefleet.protocols.errors import IdlefleetError


class NetworkError(IdlefleetError):
    """A network operation failed (peer unreachable, stream reset, connection closed)."""


class PeerUnreachable(NetworkError):
    """We could not connect to, or open a stream with, the peer."""


class DeadlineExceeded(NetworkError):
    """A network operation did not finish before its deadline (a frozen or overloaded peer)."""


class StreamClosed(NetworkError):
    """The peer closed the stream cleanly between frames (no partial frame was pending)."""


class RemoteError(NetworkError):
    """The peer answered a request with an ``error`` envelope: ``code`` and ``message`` say why."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"peer replied {code}: {message}")
