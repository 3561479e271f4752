"""The KV cache: an explicit object owned by whoever owns the session, not by the model."""

from __future__ import annotations

import numpy as np

from idlefleet.protocols.errors import ModelInputError


class KVCache:
    """Keys and values of ``n_layers`` blocks for one sequence.

    Buffers are ``[n_layers, nkv, capacity, d]`` float32, preallocated and grown by doubling
    (never concatenated per token) up to ``max_len`` positions. ``length`` is how many positions
    are filled; :meth:`truncate` forgets the tail (a retried step simply overwrites it).
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, *, max_len: int, capacity: int = 64
    ) -> None:
        self.max_len = max_len
        self.length = 0
        cap = max(1, min(capacity, max_len))
        self.k = np.zeros((n_layers, n_kv_heads, cap, head_dim), dtype=np.float32)
        self.v = np.zeros_like(self.k)

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions in total; raises :class:`ModelInputError` beyond max_len."""
        if n > self.max_len:
            raise ModelInputError(f"sequence of {n} positions exceeds the context of {self.max_len}")
        if n <= self.capacity:
            return
        cap = self.capacity
        while cap < n:
            cap *= 2
        cap = min(cap, self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros((*old.shape[:2], cap, *old.shape[3:]), dtype=np.float32)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on (0 <= n <= length)."""
        if not 0 <= n <= self.length:
            raise ModelInputError(f"cannot truncate a cache of {self.length} positions to {n}")
        self.length = n
