"""The llama transformer block in numpy float32: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shapes: ``T`` new tokens, ``L`` cached + new tokens, ``H`` hidden size, ``nq``/``nkv`` query and
KV heads (``g = nq // nkv`` queries share one KV head), ``d`` head dim, ``F`` FFN size.

Weights are prepared once at load time (:func:`prepare_block`) so that one decode step costs few
numpy calls: matrices stay ``[out, in]`` (GGUF's own layout; :func:`matmul` applies them);
Q, K and V are one matrix, as are the FFN gate and up projections; Q/K rows are un-permuted
from llama.cpp's GGUF layout to the rotate-half layout; the attention scale ``1/sqrt(d)`` is
folded into the Q rows (exact when ``d`` is a power of two).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from idlefleet.node.model.gguf_loader import ModelConfig

F32 = np.float32


@dataclass(frozen=True, eq=False)
class BlockWeights:
    """One block's float32 weights, laid out for :func:`block_forward`."""

    attn_norm: np.ndarray  # [H]
    wqkv: np.ndarray  # [(nq + 2 nkv) d, H]
    wo: np.ndarray  # [H, nq d]
    ffn_norm: np.ndarray  # [H]
    w_gate_up: np.ndarray  # [2F, H]
    w_down: np.ndarray  # [H, F]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values())


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``[n_heads d, in]`` GGUF -> rotate-half layout."""
    out, inp = w.shape
    # GGUF rows per head are (d/2 pairs, 2) interleaved; rotate-half wants (2 halves, d/2).
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def prepare_block(cfg: ModelConfig, t: dict[str, np.ndarray]) -> BlockWeights:
    """Fuse and lay out raw GGUF block tensors (``attn_q`` etc., numpy ``[out, in]``)."""
    scale = F32(1.0 / np.sqrt(cfg.head_dim))
    wq = unpermute_qk(t["attn_q"], cfg.n_heads) * scale  # [nq d, H]
    wk = unpermute_qk(t["attn_k"], cfg.n_kv_heads)  # [nkv d, H]
    wqkv = np.concatenate([wq, wk, t["attn_v"]])  # [(nq + 2 nkv) d, H]
    w_gate_up = np.concatenate([t["ffn_gate"], t["ffn_up"]])  # [2F, H]
    return BlockWeights(
        attn_norm=np.ascontiguousarray(t["attn_norm"], dtype=F32),
        wqkv=np.ascontiguousarray(wqkv, dtype=F32),
        wo=np.ascontiguousarray(t["attn_output"], dtype=F32),
        ffn_norm=np.ascontiguousarray(t["ffn_norm"], dtype=F32),
        w_gate_up=np.ascontiguousarray(w_gate_up, dtype=F32),
        w_down=np.ascontiguousarray(t["ffn_down"], dtype=F32),
    )


#: Bounds of OpenBLAS's small-matrix SGEMM path (x86-64 AVX-512 kernels): it is taken when
#: ``M N K <= SMALL_MNK`` and ``M N <= SMALL_MN``, and it skips the packing of both operands.
SMALL_MNK, SMALL_MN = 1_000_000, 1200
#: Slice widths (weight rows per product: 16..64 stream weights from memory best, measured on
#: cold weights) and the most rows sent down the sliced path (beyond ~40 the packed product wins).
MIN_CHUNK, MAX_CHUNK, MAX_SMALL_ROWS = 16, 64, 32


def _small_chunk(rows: int, out: int, inp: int) -> int:
    """Widest slice ``c <= MAX_CHUNK`` of ``out`` (a divisor, a multiple of 16) whose
    ``[rows, inp] x [inp, c]`` product fits the small-matrix path; 0 when none does."""
    if not 2 <= rows <= MAX_SMALL_ROWS:
        return 0
    best = 0
    for c in range(MIN_CHUNK, min(out, MAX_CHUNK) + 1, MIN_CHUNK):
        if out % c == 0 and rows * c * inp <= SMALL_MNK and rows * c <= SMALL_MN:
            best = c
    return best


_CHUNKS: dict[tuple[int, int, int], int] = {}
SMALL_GEMM = os.environ.get("IDLEFLEET_SMALL_GEMM", "on") != "off"


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x [M, in] @ w.T`` for a weight ``w [out, in]`` (C-contiguous) -> ``[M, out]``.

    One row is a matrix-vector product, and many rows one general product. For a few rows
    (2..32, a batch of concurrent sessions' decode steps), a general product would spend most of
    its time packing the whole weight matrix for very little arithmetic: OpenBLAS's matrix-vector
    path streams the weights at memory speed, its general kernel for 2-8 rows is 2-3x slower
    than one row (``bench/gemm.py``). So the weight is cut, with no copy, into ``out / c`` slices
    of ``c`` rows small enough for OpenBLAS's unpacked small-matrix kernel, and one stacked
    ``matmul`` (a C loop, no Python per slice) multiplies every slice: 8 rows then cost about
    1.6-1.7x one row instead of 4x. Results equal the plain product up to float32 summation order.
    ``IDLEFLEET_SMALL_GEMM=off`` turns the sliced path off.
    """
    rows = x.shape[0]
    out, inp = w.shape
    key = (rows, out, inp)
    c = _CHUNKS.get(key)
    if c is None:
        c = _CHUNKS[key] = _small_chunk(rows, out, inp) if SMALL_GEMM else 0
    if c == 0:
        y: np.ndarray = x @ w.T  # [M, out]
        return y
    sliced: np.ndarray = np.matmul(w.reshape(out // c, c, inp), x.T)  # [out / c, c, M]
    return sliced.transpose(2, 0, 1).reshape(rows, out)  # [M, out]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * w`` over the last axis."""
    ms = np.einsum("th,th->t", x, x)[:, None] / F32(x.shape[-1])  # [T, 1]
    out: np.ndarray = x * (F32(1.0) / np.sqrt(ms + F32(eps))) * w  # [T, H]
    return out


class Rope:
    """Rotary position embedding tables for one head dim and base, grown on demand.

    Angles are float32 products ``position * inv_freq`` as in the reference implementation; their
    cosines and sines are taken in float64 and rounded, so a table entry never depends on how
    large the table is.
    """

    def __init__(self, head_dim: int, base: float) -> None:
        exponent = np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim)  # [d/2]
        self.inv_freq = F32(1.0) / (np.float64(base) ** exponent.astype(np.float64)).astype(F32)
        self._cos = self._sin = np.zeros((0, 1, 2, head_dim // 2), F32)

    def tables(self, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``cos``, signed ``sin`` for positions ``start..start+t-1``, ``[T, 1, 2, d/2]`` each."""
        if start + t > len(self._cos):
            self._grow(max(start + t, 2 * len(self._cos), 256))
        return self._cos[start : start + t], self._sin[start : start + t]

    def _grow(self, n: int) -> None:
        angles = np.arange(n, dtype=F32)[:, None] * self.inv_freq  # [n, d/2] float32
        cos = np.cos(angles.astype(np.float64)).astype(F32)
        sin = np.sin(angles.astype(np.float64)).astype(F32)
        self._cos = np.stack([cos, cos], axis=1)[:, None]  # [n, 1, 2, d/2]
        self._sin = np.stack([-sin, sin], axis=1)[:, None]  # [n, 1, 2, d/2]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on ``x [T, heads, d]``: ``x cos + rotate_half(x) sin``."""
    t, n, d = x.shape
    x4 = x.reshape(t, n, 2, d // 2)  # [T, heads, 2, d/2]: (first half, second half)
    # rotate_half(x) = (-x2, x1): a reversed view of the half axis, the sign lives in sin.
    out: np.ndarray = x4 * cos + x4[:, :, ::-1] * sin  # [T, heads, 2, d/2]
    return out.reshape(t, n, d)


def causal_mask(t: int, start: int) -> np.ndarray | None:
    """Additive mask ``[T, start + T]``: query i sees keys ``<= start + i``; None when T == 1."""
    if t == 1:
        return None
    keys = np.arange(start + t)
    queries = np.arange(start, start + t)[:, None]
    return np.where(keys <= queries, F32(0.0), F32(-np.inf))  # [T, L]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Grouped-query attention: q [T, nq, d] (pre-scaled), k and v [nkv, L, d] -> [T, nq d]."""
    t, nq, d = q.shape
    nkv = k.shape[0]
    g = nq // nkv
    if t == 1:  # decoding: BLAS is much faster with the long K as the left operand
        s = np.ascontiguousarray((k @ q.reshape(nkv, g, d).transpose(0, 2, 1)).transpose(0, 2, 1))
    else:
        qg = q.reshape(t, nkv, g, d).transpose(1, 2, 0, 3).reshape(nkv, g * t, d)  # [nkv, gT, d]
        s = qg @ k.transpose(0, 2, 1)  # [nkv, gT, L]
    if mask is not None:
        s = s.reshape(nkv, g, t, -1)  # [nkv, g, T, L]
        s += mask
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o: np.ndarray = s.reshape(nkv, g * t, -1) @ v  # [nkv, gT, d]
    return o.reshape(nkv, g, t, d).transpose(2, 0, 1, 3).reshape(t, nq * d)  # [T, nq d]


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` for ``gate_up [T, 2F]`` -> ``[T, F]``."""
    f = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :f], gate_up[:, f:]
    out: np.ndarray = gate / (F32(1.0) + np.exp(-gate)) * up  # [T, F]
    return out


def block_forward(
    x: np.ndarray,
    w: BlockWeights,
    cfg: ModelConfig,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    rope: tuple[np.ndarray, np.ndarray],
    mask: np.ndarray | None,
) -> np.ndarray:
    """One block on ``x [T, H]`` at positions ``start..start+T-1``; appends K/V to the caches.

    ``k_cache``/``v_cache`` are this block's ``[nkv, capacity, d]`` buffers, already holding
    ``start`` positions and with room for ``T`` more.
    """
    t = x.shape[0]
    nq, nkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = rms_norm(x, w.attn_norm, cfg.rms_eps)  # [T, H]
    qkv = matmul(h, w.wqkv)  # [T, (nq + 2 nkv) d]
    qk = apply_rope(qkv[:, : (nq + nkv) * d].reshape(t, nq + nkv, d), *rope)  # [T, nq+nkv, d]
    end = start + t
    k_cache[:, start:end] = qk[:, nq:].transpose(1, 0, 2)  # [nkv, T, d]
    v_cache[:, start:end] = qkv[:, (nq + nkv) * d :].reshape(t, nkv, d).transpose(1, 0, 2)
    a = attention(qk[:, :nq], k_cache[:, :end], v_cache[:, :end], mask)  # [T, nq d]
    x = x + matmul(a, w.wo)  # [T, H]
    h = rms_norm(x, w.ffn_norm, cfg.rms_eps)  # [T, H]
    out: np.ndarray = x + matmul(swiglu(matmul(h, w.w_gate_up)), w.w_down)  # [T, H]
    return out


@dataclass(frozen=True)
class Segment:
    """One session's rows in a batch: ``t`` tokens at ``start``, its block's K/V buffers and mask."""

    k_cache: np.ndarray  # [nkv, capacity, d]
    v_cache: np.ndarray  # [nkv, capacity, d]
    start: int
    t: int
    mask: np.ndarray | None  # [t, start + t] or None


#: Decode rows of sessions with fewer cached positions than this share one padded attention
#: (``_decode_attention``); longer ones run one by one (the copy would cost more than it saves).
MAX_PADDED_KEYS = 256


def _decode_attention(qk: np.ndarray, v: np.ndarray, segments: list[Segment], nq: int) -> np.ndarray:
    """Attention for ``N`` sessions' single decode rows at once: ``qk [N, nq + nkv, d]`` (roped Q
    then K), ``v [N, nkv, d]``. Appends each row's K/V to its session's cache, copies the caches
    into one zero-padded ``[N, nkv, L, d]`` pair (``L`` = the longest), masks the padding with
    -inf and runs softmax(Q K^T) V for all sessions in a few stacked products: per-session
    attention is ~15 small numpy calls per block, which at 8 sessions cost more than the copy.
    Equal to :func:`attention` per session up to float32 summation order (a padded key adds
    exp(-inf) = 0 to the softmax and 0 x 0 to the output)."""
    n, nkv, d = v.shape
    g = nq // nkv
    length = max(s.start for s in segments) + 1
    keys = np.zeros((n, nkv, length, d), dtype=F32)
    values = np.zeros((n, nkv, length, d), dtype=F32)
    pad = np.zeros((n, 1, 1, length), dtype=F32)
    for i, s in enumerate(segments):
        end = s.start + 1
        s.k_cache[:, s.start] = qk[i, nq:]  # [nkv, d]
        s.v_cache[:, s.start] = v[i]
        keys[i, :, :end] = s.k_cache[:, :end]
        values[i, :, :end] = s.v_cache[:, :end]
        pad[i, 0, 0, end:] = -np.inf
    q = qk[:, :nq].reshape(n, nkv, g, d)  # [N, nkv, g, d]
    scores = q @ keys.transpose(0, 1, 3, 2)  # [N, nkv, g, L]
    scores += pad
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out: np.ndarray = (scores @ values).reshape(n, nq * d)  # [N, nkv, g, d] -> [N, nq d]
    return out


def block_forward_batch(
    x: np.ndarray,
    w: BlockWeights,
    cfg: ModelConfig,
    segments: list[Segment],
    rope: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """One block on the stacked rows ``x [N, H]`` of several sessions (``N = sum of t``).

    Every weight is applied once to the whole stack (one matrix product per weight: a decode
    step reads each weight once for all sessions); only attention runs per session, against that
    session's own cache. ``rope`` holds each row's own position tables, stacked ``[N, 1, 2, d/2]``.
    """
    n = x.shape[0]
    nq, nkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = rms_norm(x, w.attn_norm, cfg.rms_eps)  # [N, H]
    qkv = matmul(h, w.wqkv)  # [N, (nq + 2 nkv) d]
    qk = apply_rope(qkv[:, : (nq + nkv) * d].reshape(n, nq + nkv, d), *rope)  # [N, nq+nkv, d]
    v = qkv[:, (nq + nkv) * d :].reshape(n, nkv, d)  # [N, nkv, d]
    if n > 1 and n == len(segments) and max(s.start for s in segments) < MAX_PADDED_KEYS:
        a = _decode_attention(qk, v, segments, nq)  # one decode row per session: all at once
    else:
        a = np.empty((n, nq * d), dtype=F32)  # [N, nq d]
        row = 0
        for s in segments:
            end, rows = s.start + s.t, slice(row, row + s.t)
            s.k_cache[:, s.start : end] = qk[rows, nq:].transpose(1, 0, 2)  # [nkv, t, d]
            s.v_cache[:, s.start : end] = v[rows].transpose(1, 0, 2)  # [nkv, t, d]
            a[rows] = attention(qk[rows, :nq], s.k_cache[:, :end], s.v_cache[:, :end], s.mask)
            row += s.t
    x = x + matmul(a, w.wo)  # [N, H]
    h = rms_norm(x, w.ffn_norm, cfg.rms_eps)  # [N, H]
    out: np.ndarray = x + matmul(swiglu(matmul(h, w.w_gate_up)), w.w_down)  # [N, H]
    return out
