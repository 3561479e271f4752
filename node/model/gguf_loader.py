"""Open a llama-architecture GGUF file with ggml's ``gguf`` package and read what a stage needs.

The file is memory-mapped by :class:`gguf.GGUFReader`; :meth:`ModelFile.tensor` dequantizes one
tensor at a time to float32 (``gguf.quants.dequantize``), so a stage touches and holds only its
own tensors. Every problem with the file (missing, not GGUF, truncated, corrupt, unsupported
architecture or tensor type, missing tensor, wrong shape) raises :class:`ModelError` naming it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from idlefleet.protocols.errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = frozenset(
    {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
    | {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
)
MODEL_ID_PREFIX = "gguf-sha256:"
BLOCK_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a llama-architecture model, read from GGUF metadata."""

    architecture: str
    n_blocks: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool  # no output.weight: the LM head is token_embd


@dataclass(frozen=True)
class ModelInfo:
    """What peers need to agree on a model and to place blocks: identity and sizes.

    ``block_bytes[i]`` and ``head_bytes`` are the float32 bytes a stage holds in memory for
    block ``i`` and for the embedding + final norm + LM head.
    """

    model_id: str
    name: str
    config: ModelConfig
    block_bytes: tuple[int, ...]
    head_bytes: int
    file_size: int

    @property
    def n_blocks(self) -> int:
        return self.config.n_blocks


class _CheckedReader(gguf.GGUFReader):
    """``GGUFReader`` that names a truncated tensor or an unknown tensor type before reading it,
    and parses metadata several times faster (see ``_get``)."""

    _flat: np.ndarray | None = None

    def _get(self, offset: int, dtype: Any, count: int = 1,
             override_order: Literal["I", "S", "<"] | None = None) -> np.ndarray:
        """``GGUFReader._get`` over a plain-ndarray view of the same memory map: slicing the
        ``np.memmap`` itself runs ``memmap.__array_finalize__`` for every view (~250k views for a
        49k-entry vocabulary and its merges): about 3x slower. Same bytes, no copy."""
        if self._flat is None:
            self._flat = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        count = int(count)
        arr: np.ndarray = self._flat[offset:offset + dt.itemsize * count].view(dt)[:count]
        out: np.ndarray = arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                                          else override_order))
        return out

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        _check_tensor_extents(len(self.data), start_offs, fields)
        super()._build_tensors(start_offs, fields)


def _check_tensor_extents(file_size: int, start_offs: int, fields: list[Any]) -> None:
    for field in fields:
        try:  # the parts layout is gguf's; if it ever changes, fall back to gguf's own checks
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            raw = int(raw_dtype[0])
            n_elems = int(np.prod(dims.astype(np.int64)))
            begin = int(start_offs + int(offset[0]))
        except (ValueError, TypeError, IndexError):
            return
        try:
            qtype = QT(raw)
        except ValueError:
            raise ModelError(f"tensor {name!r} has unknown ggml type id {raw}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        end = begin + n_elems * type_size // block
        if end > file_size:
            raise ModelError(
                f"file is truncated: tensor {name!r} ends at byte {end} but the file has {file_size} bytes"
            )


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor of the file: ggml type, numpy-order shape and its bytes in the memory map."""

    name: str
    qtype: QT
    shape: tuple[int, ...]  # numpy order, e.g. [out, in]
    n_elements: int
    data: np.ndarray  # view of the memory-mapped file, as GGUFReader lays it out


class ModelFile:
    """An open GGUF model: config, tokenizer metadata and per-tensor float32 access.

    Use :func:`open_model` to create one. Metadata is decoded once into plain Python values and
    the reader itself is dropped: its per-element numpy views take ~150 MB for a 49k vocabulary.
    Tensor data stays on disk (memory-mapped) until :meth:`tensor` asks for it.
    """

    def __init__(self, path: Path, reader: gguf.GGUFReader | None, *,
                 parsed: tuple[dict[str, Any], dict[str, TensorInfo]] | None = None) -> None:
        """From a ``reader``, or from what another ``ModelFile`` of the same file ``parsed``."""
        self.path = path
        if parsed is not None:
            self.metadata, tensors = parsed
            self._tensors = dict(tensors)
        else:
            assert reader is not None
            self.metadata = _decode_metadata(path, reader)
            self._tensors = {
                t.name: TensorInfo(
                    t.name,
                    t.tensor_type,
                    tuple(int(d) for d in reversed(t.shape.tolist())),
                    int(t.n_elements),
                    t.data,
                )
                for t in reader.tensors
            }
        self.config = _read_config(self)
        _check_tensors(self)
        self.parsed = (self.metadata, dict(self._tensors))

    # -- metadata -------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (str, number, bool or list), or ``default``."""
        return self.metadata.get(key, default)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_nbytes_f32(self, name: str) -> int:
        """Bytes the tensor takes once dequantized to float32."""
        return self._tensors[name].n_elements * 4

    # -- tensors --------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        """Dequantize one tensor to a fresh float32 array in numpy order (``[out, in]``).

        Raises :class:`ModelError` if it is missing or its data cannot be decoded.
        """
        t = self._tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: missing tensor {name!r}")
        try:
            w = dequantize(t.data, t.qtype)
        except Exception as e:  # gguf raises assorted errors on bad blocks
            raise ModelError(f"{self.path}: cannot dequantize {name!r} ({e})") from e
        if w.shape != t.shape:
            raise ModelError(f"{self.path}: tensor {name!r} decoded to {w.shape}, want {t.shape}")
        # F32 comes back as a view of the memory map: copy so the stage owns its weights.
        return np.array(w, dtype=np.float32, copy=True) if t.qtype == QT.F32 else w

    def info(self) -> ModelInfo:
        """Identity (content hash) and per-block float32 sizes for placement."""
        cfg = self.config
        blocks = tuple(
            sum(self.tensor_nbytes_f32(f"blk.{i}.{n}.weight") for n in BLOCK_TENSORS)
            for i in range(cfg.n_blocks)
        )
        head = sum(self.tensor_nbytes_f32(n) for n in head_tensor_names(self))
        return ModelInfo(
            model_id=model_id(self.path),
            name=str(self.field("general.name", self.path.stem)),
            config=cfg,
            block_bytes=blocks,
            head_bytes=head,
            file_size=self.path.stat().st_size,
        )

    def close(self) -> None:
        """Drop the memory map; arrays already returned by :meth:`tensor` stay valid."""
        self._tensors = {}

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | os.PathLike[str]) -> ModelFile:
    """Open and validate a GGUF model file; raises :class:`ModelError` saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}")
    size = p.stat().st_size
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "empty" if size == 0 else f"starts with {magic!r}, expected b'GGUF'"
        raise ModelError(f"{p} is not a GGUF file ({what})")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    parsed = _PARSED.get(key)
    if parsed is not None:
        return ModelFile(p, None, parsed=parsed)
    try:
        reader = _CheckedReader(p)
    except ModelError as e:
        raise ModelError(f"{p}: {e}") from None
    except Exception as e:  # the reader trips over corrupt bytes in many different ways
        raise ModelError(f"{p}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from e
    mf = ModelFile(p, reader)
    _PARSED.clear()  # one file's worth (a few MB of metadata): the model this process serves
    _PARSED[key] = mf.parsed
    return mf


# The last file parsed, per (path, size, mtime): a node opens its model for placement, then again to
# load blocks, and a test process opens it for every in-process node; parsing takes seconds.
_PARSED: dict[tuple[str, int, int], tuple[dict[str, Any], dict[str, TensorInfo]]] = {}


def head_tensor_names(mf: ModelFile) -> list[str]:
    """Tensors a stage holding the embedding and LM head needs."""
    names = ["token_embd.weight", "output_norm.weight"]
    if not mf.config.tied_embeddings:
        names.append("output.weight")
    return names


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def model_id(path: str | os.PathLike[str]) -> str:
    """``gguf-sha256:<hex>`` over the file's bytes; cached per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        with p.open("rb") as f:
            _HASH_CACHE[key] = MODEL_ID_PREFIX + hashlib.file_digest(f, "sha256").hexdigest()
    return _HASH_CACHE[key]


# -- validation ---------------------------------------------------------------------------


def _decode_metadata(path: Path, reader: gguf.GGUFReader) -> dict[str, Any]:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: metadata {key!r} is corrupt ({e})") from e
    return out


def _read_config(mf: ModelFile) -> ModelConfig:
    arch = mf.field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{mf.path}: unsupported architecture {arch!r} (supported: {SUPPORTED_ARCHITECTURES})"
        )

    def num(key: str, default: Any = None, kind: type = int) -> Any:
        v = mf.field(f"{arch}.{key}", default)
        if v is None:
            raise ModelError(f"{mf.path}: missing metadata {arch}.{key}")
        if isinstance(v, list | str | bool) or kind(v) <= 0:
            raise ModelError(f"{mf.path}: metadata {arch}.{key} = {v!r} is not a positive number")
        return kind(v)

    if mf.field(f"{arch}.expert_count", 0):
        raise ModelError(f"{mf.path}: mixture-of-experts models are not supported")
    scaling = mf.field(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or mf.has_tensor("rope_freqs.weight"):
        raise ModelError(f"{mf.path}: RoPE scaling ({scaling}) is not supported")
    hidden, heads = num("embedding_length"), num("attention.head_count")
    head_dim = num("attention.key_length", hidden // heads)
    if mf.field(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ModelError(f"{mf.path}: partial RoPE (rope.dimension_count != head dim) unsupported")
    kv_heads = num("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ModelError(f"{mf.path}: {heads} heads not a multiple of {kv_heads} KV heads")
    if head_dim % 2:
        raise ModelError(f"{mf.path}: head dim {head_dim} must be even for RoPE")
    if not mf.has_tensor("token_embd.weight"):
        raise ModelError(f"{mf.path}: missing tensor 'token_embd.weight'")
    vocab = mf._tensors["token_embd.weight"].shape[0]  # [vocab, hidden]
    return ModelConfig(
        architecture=arch,
        n_blocks=num("block_count"),
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=num("feed_forward_length"),
        vocab_size=vocab,
        context_length=num("context_length", 2048),
        rope_base=num("rope.freq_base", 10000.0, float),
        rms_eps=num("attention.layer_norm_rms_epsilon", 1e-5, float),
        tied_embeddings=not mf.has_tensor("output.weight"),
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its numpy shape ``[out, in]``."""
    h, f = cfg.hidden_size, cfg.ffn_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.vocab_size, h),
        "output_norm.weight": (h,),
    }
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    per_block: dict[str, tuple[int, ...]] = {
        "attn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h),
        "attn_output": (h, q), "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h),
        "ffn_down": (h, f),
    }  # fmt: skip
    for i in range(cfg.n_blocks):
        for n, s in per_block.items():
            shapes[f"blk.{i}.{n}.weight"] = s
    return shapes


def _check_tensors(mf: ModelFile) -> None:
    for name, shape in expected_shapes(mf.config).items():
        t = mf._tensors.get(name)
        if t is None:
            raise ModelError(f"{mf.path}: missing tensor {name!r}")
        if t.shape != shape:
            raise ModelError(f"{mf.path}: tensor {name!r} has shape {t.shape}, expected {shape}")
        if t.qtype not in SUPPORTED_TYPES:
            raise ModelError(
                f"{mf.path}: tensor {name!r} has unsupported type {t.qtype.name} "
                f"(supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})"
            )


def block_tensor_names(index: int) -> Sequence[str]:
    return [f"blk.{index}.{n}.weight" for n in BLOCK_TENSORS]
