"""Stages: a contiguous block range ``[start, end)``, optionally with the embedding and LM head.

A stage server holds one :class:`Stage` and one :class:`KVCache` per session; the client holds a
:class:`Head` (embedding, final norm, LM head). The whole model is ``load_stage(mf, 0, n,
with_head=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from idlefleet.node.model import blocks as B
from idlefleet.node.model.gguf_loader import BLOCK_TENSORS, ModelConfig, ModelFile, model_id
from idlefleet.node.model.kvcache import KVCache
from idlefleet.protocols.errors import ModelError, ModelInputError


class Head:
    """Embedding lookup, final RMSNorm and LM head (tied to the embedding when the file says so)."""

    def __init__(
        self, cfg: ModelConfig, embedding: np.ndarray, norm: np.ndarray, lm_head: np.ndarray
    ) -> None:
        self.config = cfg
        self.embedding = embedding  # [V, H]
        self.norm = norm  # [H]
        self.lm_head = lm_head  # [V, H]; the same array as embedding when tied

    @property
    def nbytes(self) -> int:
        extra = 0 if self.lm_head is self.embedding else self.lm_head.nbytes
        return self.embedding.nbytes + self.norm.nbytes + extra

    def embed(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids ``[T]`` -> hidden states ``[T, H]``; raises ValueError on an unknown id."""
        idx = np.asarray(ids, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"expected a non-empty 1-d list of token ids, got shape {idx.shape}")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"token id outside [0, {self.config.vocab_size})")
        return self.embedding[idx]  # [T, H] (fancy indexing copies)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Hidden states ``[T, H]`` from the last block -> logits ``[T, V]``."""
        h = B.rms_norm(hidden, self.norm, self.config.rms_eps)  # [T, H]
        out: np.ndarray = B.matmul(h, self.lm_head)  # [T, V]
        return out


class Stage:
    """Blocks ``[start, end)`` of one model, plus the :class:`Head` if ``head`` is given."""

    def __init__(
        self,
        model_id: str,
        cfg: ModelConfig,
        start: int,
        blocks: Sequence[B.BlockWeights],
        head: Head | None = None,
    ) -> None:
        self.model_id = model_id
        self.config = cfg
        self.start = start
        self.end = start + len(blocks)
        self.blocks = list(blocks)
        self.head = head
        self.rope = B.Rope(cfg.head_dim, cfg.rope_base)

    @property
    def nbytes(self) -> int:
        """Float32 bytes of weights held."""
        return sum(b.nbytes for b in self.blocks) + (self.head.nbytes if self.head else 0)

    def sub_stage(self, start: int, end: int) -> Stage:
        """Blocks ``[start, end)`` of this stage, sharing its weights (no copy); no head."""
        if not self.start <= start < end <= self.end:
            raise ModelError(f"[{start}, {end}) is not within this stage's [{self.start}, {self.end})")
        if (start, end) == (self.start, self.end) and self.head is None:
            return self
        return Stage(self.model_id, self.config, start, self.blocks[start - self.start:end - self.start])

    def new_cache(self, capacity: int = 64) -> KVCache:
        """An empty KV cache for one session on this stage."""
        c = self.config
        return KVCache(
            len(self.blocks), c.n_kv_heads, c.head_dim, max_len=c.context_length, capacity=capacity
        )

    def check(self, hidden: np.ndarray, cache: KVCache, position: int | None = None) -> int:
        """Check that ``hidden`` at ``position`` fits ``cache`` on this stage; return the start
        position. Raises :class:`ModelInputError` (shape, dtype, a gap in positions, context length,
        cache of another stage). Changes nothing."""
        c = self.config
        if not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32:
            raise ModelInputError("hidden state must be a float32 numpy array")
        if hidden.ndim != 2 or hidden.shape[1] != c.hidden_size or hidden.shape[0] < 1:
            raise ModelInputError(f"hidden state shape {hidden.shape} != [tokens, {c.hidden_size}]")
        if cache.n_layers != len(self.blocks):
            raise ModelInputError(f"cache has {cache.n_layers} layers, stage has {len(self.blocks)}")
        start = cache.length if position is None else position
        if start < 0:
            raise ModelInputError(f"negative position {start}")
        if start > cache.length:
            raise ModelInputError(f"position {start} skips ahead of the cache ({cache.length})")
        if start + hidden.shape[0] > cache.max_len:
            raise ModelInputError(f"sequence of {start + hidden.shape[0]} positions exceeds the "
                              f"context of {cache.max_len}")
        return start

    def forward(self, hidden: np.ndarray, cache: KVCache, position: int | None = None) -> np.ndarray:
        """Run ``hidden [T, H]`` (positions ``position..position+T-1``) through the blocks.

        ``position`` defaults to ``cache.length``; a smaller value first truncates the cache, so
        resending a step is idempotent. Raises :class:`ModelInputError` if the input does not fit
        (see :meth:`check`).
        """
        start = self.check(hidden, cache, position)
        cache.truncate(start)
        t = hidden.shape[0]
        cache.reserve(start + t)
        rope = self.rope.tables(start, t)
        mask = B.causal_mask(t, start)
        x = hidden
        for i, w in enumerate(self.blocks):
            x = B.block_forward(x, w, self.config, cache.k[i], cache.v[i], start, rope, mask)
        cache.length = start + t
        return x

    def forward_batch(self, steps: Sequence[tuple[np.ndarray, KVCache, int | None]]) -> list[np.ndarray]:
        """Run several sessions' steps ``(hidden [T_i, H], cache_i, position_i)`` together.

        The hidden states are stacked so each weight is read once for all of them; attention
        runs per session against its own cache. Returns each step's output ``[T_i, H]``, equal to
        :meth:`forward` on that step alone up to float32 rounding (docs/MODEL.md). Every step is
        checked before any cache changes; raises :class:`ModelInputError` if one does not fit or a
        cache appears twice. One step is exactly :meth:`forward`.
        """
        if len(steps) == 1:
            return [self.forward(*steps[0])]
        if len({id(cache) for _, cache, _ in steps}) != len(steps):
            raise ModelInputError("a KV cache appears twice in one batch")
        starts = [self.check(hidden, cache, position) for hidden, cache, position in steps]
        spans = []  # (cache, start, t, mask) per session
        for (hidden, cache, _), start in zip(steps, starts, strict=True):
            t = hidden.shape[0]
            cache.truncate(start)
            cache.reserve(start + t)  # may reallocate: take block views only after this
            spans.append((cache, start, t, B.causal_mask(t, start)))
        tables = [self.rope.tables(start, t) for _, start, t, _ in spans]
        rope = (np.concatenate([cos for cos, _ in tables]),  # [N, 1, 2, d/2]
                np.concatenate([sin for _, sin in tables]))  # [N, 1, 2, d/2]
        x = np.concatenate([hidden for hidden, _, _ in steps])  # [N, H]
        for i, w in enumerate(self.blocks):
            segments = [B.Segment(cache.k[i], cache.v[i], start, t, mask)
                        for cache, start, t, mask in spans]
            x = B.block_forward_batch(x, w, self.config, segments, rope)
        outs, row = [], 0
        for cache, start, t, _ in spans:
            cache.length = start + t
            outs.append(x[row : row + t])
            row += t
        return outs

def load_head(mf: ModelFile) -> Head:
    """Dequantize the embedding, final norm and LM head (tied unless ``output.weight`` exists)."""
    emb = mf.tensor("token_embd.weight")  # [V, H]
    lm = emb if mf.config.tied_embeddings else mf.tensor("output.weight")
    return Head(mf.config, emb, mf.tensor("output_norm.weight"), lm)


def load_stage(mf: ModelFile, start: int, end: int, *, with_head: bool = False) -> Stage:
    """Dequantize and prepare only blocks ``[start, end)`` (and the head if asked)."""
    n = mf.config.n_blocks
    if not 0 <= start <= end <= n:
        raise ModelError(f"block range [{start}, {end}) outside the model's [0, {n})")
    blocks = []
    for i in range(start, end):
        raw = {name: mf.tensor(f"blk.{i}.{name}.weight") for name in BLOCK_TENSORS}
        blocks.append(B.prepare_block(mf.config, raw))
        del raw  # free the unfused copies before the next block
    head = load_head(mf) if with_head else None
    return Stage(model_id(mf.path), mf.config, start, blocks, head)
