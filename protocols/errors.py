"""Error types shared by every layer.

Like h11, errors say whose fault it was: a ``RemoteProtocolError`` means a peer sent something we
refuse (log it, count it, drop it, keep serving); a ``LocalProtocolError`` means our own code or the
local user asked for something invalid. Messages validate themselves on construction with the local
error; the ``from_body`` / decode path that reads a peer's bytes turns it into the remote one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class IdlefleetError(Exception):
    """Base class of every error idlefleet raises on purpose."""


class ProtocolError(IdlefleetError):
    """Something on the wire is invalid."""


class RemoteProtocolError(ProtocolError):
    """A peer sent invalid data: reject it with this reason; never crash on it."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something invalid."""


class RecordInvalid(LocalProtocolError):
    """A capacity record we are building has a bad field; ``reason`` is ``malformed``,
    ``out_of_range`` or ``signer_mismatch`` (as ``RecordRejected`` would say of a peer's)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class RecordRejected(RemoteProtocolError):
    """Remote only: a peer's capacity record bytes failed validation (``records.validate_record``);
    ``reason`` is one of ``records.REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TensorError(ProtocolError):
    """A tensor has a bad dtype, shape or byte length, or exceeds a limit. Raised as one of its
    two flavours, which say whose tensor it is; catch this base only where either side will do."""


class RemoteTensorError(TensorError, RemoteProtocolError):
    """A peer's tensor is bad (decoding it): caught wherever ``RemoteProtocolError`` is."""


class LocalTensorError(TensorError, LocalProtocolError):
    """A tensor we are about to send is bad (encoding our own)."""


class ModelInputError(IdlefleetError):
    """Our own code gave the model engine an input it cannot run: a hidden state of the wrong
    shape or dtype, a position that skips ahead of the KV cache, more positions than its context.
    Never a peer's fault as raised: a server checks a peer's step before it reaches the engine,
    and answers a refusal that still comes from one as that peer's bad request."""


class ModelError(IdlefleetError):
    """A model file is missing, truncated, corrupt or unsupported; the message names what."""


class ConfigError(IdlefleetError):
    """The user's configuration (file, flags or key file) is invalid; the message says how to fix it."""


@contextmanager
def peer_input() -> Iterator[None]:
    """Wrap the building of a message from a peer's fields: a ``LocalProtocolError`` its
    constructor raises becomes the peer's fault with the same message (``RemoteTensorError`` for
    a tensor, ``RecordRejected`` with the same reason for a record, else ``RemoteProtocolError``).
    Anything else passes through unchanged."""
    try:
        yield
    except RecordInvalid as e:
        raise RecordRejected(e.reason, e.detail) from e
    except LocalTensorError as e:
        raise RemoteTensorError(str(e)) from e
    except LocalProtocolError as e:
        raise RemoteProtocolError(str(e)) from e
