"""The node's event log: one JSON object per line (the owner's audit trail, ``owner report``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO


class EventLog:
    """Appends events to ``path`` (line-buffered, so a crash loses at most the line being written);
    without a path it records nothing. Closed by ``close`` (the node's ``finally``)."""

    def __init__(self, path: Path | None) -> None:
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"t": now, "event": event, **fields}``; nothing once closed."""
        if self._file is not None:
            self._file.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
