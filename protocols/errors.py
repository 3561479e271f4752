"""Error types shared by every layer.

Like h11, errors say whose fault it was: a ``RemoteProtocolError`` means a peer sent something we
refuse (log it, count it, drop it, keep serving); a ``LocalProtocolError`` means our own code or the
local user asked for something invalid.
"""

from __future__ import annotations


class IdlefleetError(Exception):
    """Base class of every error idlefleet raises on purpose."""


class ProtocolError(IdlefleetError):
    """Something on the wire is invalid."""


class RemoteProtocolError(ProtocolError):
    """A peer sent invalid data: reject it with this reason; never crash on it."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something invalid."""


class RecordRejected(RemoteProtocolError):
    """A capacity record failed validation; ``reason`` is one of ``records.REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TensorError(RemoteProtocolError):
    """A tensor on the wire has a bad dtype, shape or byte length, or exceeds a limit."""


class ModelError(IdlefleetError):
    """A model file is missing, truncated, corrupt or unsupported; the message names what."""


class ConfigError(IdlefleetError):
    """The user's configuration (file, flags or key file) is invalid; the message says how to fix it."""
