"""The numpy llama forward pass on SmolLM2: HF agreement, KV cache, stages, wire formats."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from idlefleet.node.model.blocks import BlockWeights
from idlefleet.node.model.generate import Generation, generate, local_middle
from idlefleet.node.model.gguf_loader import BLOCK_TENSORS, ModelFile
from idlefleet.node.model.sampling import Sampler, SamplingParams
from idlefleet.node.model.stage import Head, Stage, load_stage
from idlefleet.node.model.tokenizer import Tokenizer
from idlefleet.protocols.errors import ModelError, ModelInputError
from idlefleet.protocols.tensors import EncodedTensor, TensorLimits, decode_hidden, encode_hidden

PROMPT = "The capital of France is"


def _greedy(head: Head, middle: Any, ids: list[int], n: int, stop: frozenset[int]) -> list[int]:
    return generate(head, middle, ids, SamplingParams(max_new_tokens=n), stop).new_ids


def _split(whole: Stage, bounds: list[tuple[int, int]]) -> list[Stage]:
    """Stages sharing the whole model's weights (loading is tested separately)."""
    return [Stage(whole.model_id, whole.config, a, whole.blocks[a:b]) for a, b in bounds]


def _pipeline(stages: list[Stage], dtype: str) -> Any:
    """A middle passing hidden states between stages as wire bytes, as remote stages would."""
    caches = [s.new_cache() for s in stages]
    limits = TensorLimits(max_tokens=512, hidden_size=stages[0].config.hidden_size)

    def middle(hidden: np.ndarray, position: int) -> np.ndarray:
        for stage, cache in zip(stages, caches, strict=True):
            wire = msgpack.packb(encode_hidden(hidden, dtype).to_dict())
            received = decode_hidden(EncodedTensor.from_dict(msgpack.unpackb(wire)), limits)
            hidden = stage.forward(received, cache, position)
        return hidden

    return middle


def test_greedy_matches_hugging_face(
    head: Head, whole_model: Stage, tokenizer: Tokenizer, hf_reference: dict[str, Any]
) -> None:
    eos = frozenset({hf_reference["eos_token_id"]})
    for case in hf_reference["greedy"]:
        assert tokenizer.encode(case["prompt"]) == case["prompt_ids"]
        n = hf_reference["greedy_settings"]["max_new_tokens"]
        middle = local_middle(whole_model, whole_model.new_cache())
        assert _greedy(head, middle, case["prompt_ids"], n, eos) == case["new_ids"], case["prompt"]


def test_first_step_logits_close_to_hugging_face(
    head: Head, whole_model: Stage, hf_reference: dict[str, Any]
) -> None:
    for case in hf_reference["greedy"]:
        h = whole_model.forward(head.embed(case["prompt_ids"]), whole_model.new_cache())
        logits = head.logits(h[-1:])[0]
        for token, value in case["top_logits_first_step"]:
            assert logits[token] == pytest.approx(value, abs=2e-3)
        assert float(logits.astype(np.float64).sum()) == pytest.approx(
            case["logits_first_step_sum"], rel=1e-4
        )


def test_chunked_prefill_equals_full_forward(
    head: Head, whole_model: Stage, hf_reference: dict[str, Any]
) -> None:
    ids = hf_reference["greedy"][-1]["prompt_ids"]  # the longest prompt (121 tokens)
    x = head.embed(ids)
    full = whole_model.forward(x, whole_model.new_cache())
    cache = whole_model.new_cache(capacity=4)  # also exercises growth by doubling
    parts, start = [], 0
    for size in (50, 1, 37, len(ids) - 88):
        parts.append(whole_model.forward(x[start : start + size], cache))
        start += size
    assert cache.length == len(ids)
    assert cache.capacity == 128  # 4 doubled five times
    chunked = np.concatenate(parts)
    scale = float(np.abs(full).max())
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(head.logits(chunked), head.logits(full), rtol=1e-4, atol=1e-4)


def test_three_stages_over_fp32_wire_are_bit_identical(head: Head, whole_model: Stage) -> None:
    stages = _split(whole_model, [(0, 10), (10, 20), (20, 30)])
    piped = _pipeline(stages, "float32")
    cache = whole_model.new_cache()
    x = head.embed([504, 3575, 282, 4649, 314])
    for _ in range(4):  # prefill, then single-token steps
        position = cache.length
        a = head.logits(whole_model.forward(x, cache)[-1:])
        b = head.logits(piped(x, position)[-1:])
        assert np.array_equal(a, b)
        x = head.embed([int(np.argmax(a))])


def test_fp16_wire_keeps_greedy_tokens(head: Head, whole_model: Stage, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    stages = _split(whole_model, [(0, 10), (10, 20), (20, 30)])
    want = _greedy(head, local_middle(whole_model, whole_model.new_cache()), ids, 16, frozenset())
    got = _greedy(head, _pipeline(stages, "float16"), ids, 16, frozenset())
    assert got == want


def test_block_matches_naive_llama_cpp_layout(model_file: ModelFile, head: Head, whole_model: Stage) -> None:
    """Our fused, un-permuted block equals a per-head loop rotating adjacent pairs (llama.cpp)."""
    cfg = model_file.config
    raw = {n: model_file.tensor(f"blk.3.{n}.weight").astype(np.float64) for n in BLOCK_TENSORS}
    x = head.embed([504, 3575, 282, 4649, 314, 7042])
    (block3,) = _split(whole_model, [(3, 4)])
    got = block3.forward(x, block3.new_cache())
    want = _naive_block(x.astype(np.float64), raw, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _naive_block(x: np.ndarray, w: dict[str, np.ndarray], cfg: Any) -> np.ndarray:
    t, d, nq, nkv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    def norm(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_eps) * g

    def rope(m: np.ndarray, heads: int) -> np.ndarray:  # pairs (2i, 2i+1), GGUF row order
        theta = np.arange(t)[:, None] * cfg.rope_base ** (-np.arange(0, d, 2) / d)  # [T, d/2]
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        p = m.reshape(t, heads, d // 2, 2)
        a, b = p[..., 0], p[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(t, heads, d)

    h = norm(x, w["attn_norm"])
    q, k = rope(h @ w["attn_q"].T, nq), rope(h @ w["attn_k"].T, nkv)
    v = (h @ w["attn_v"].T).reshape(t, nkv, d)
    out = np.zeros((t, nq, d))
    for i in range(nq):
        j = i // (nq // nkv)
        s = q[:, i] @ k[:, j].T / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, i] = (p / p.sum(-1, keepdims=True)) @ v[:, j]
    x = x + out.reshape(t, nq * d) @ w["attn_output"].T
    h = norm(x, w["ffn_norm"])
    g, u = h @ w["ffn_gate"].T, h @ w["ffn_up"].T
    return x + (g / (1 + np.exp(-g)) * u) @ w["ffn_down"].T


def test_partial_stage_holds_only_its_blocks(model_file: ModelFile, whole_model: Stage) -> None:
    stage = load_stage(model_file, 10, 12)
    info = model_file.info()
    assert (stage.start, stage.end, stage.head) == (10, 12, None)
    assert stage.nbytes == sum(info.block_bytes[10:12])
    for a, b in zip(stage.blocks, whole_model.blocks[10:12], strict=True):
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in vars(a))
    with pytest.raises(ModelError, match=r"block range \[20, 31\)"):
        load_stage(model_file, 20, 31)


def test_model_info(model_file: ModelFile, head: Head, hf_reference: dict[str, Any]) -> None:
    info = model_file.info()
    assert info.model_id == "gguf-sha256:" + hf_reference["gguf_sha256"]
    cfg, ref = info.config, hf_reference["config"]
    assert (cfg.n_blocks, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        ref["num_hidden_layers"], ref["hidden_size"], ref["num_attention_heads"],
        ref["num_key_value_heads"], ref["head_dim"],
    )  # fmt: skip
    assert (cfg.ffn_size, cfg.vocab_size, cfg.rope_base) == (1536, 49152, 100000.0)
    assert cfg.tied_embeddings
    assert head.lm_head is head.embedding
    assert info.block_bytes == (info.block_bytes[0],) * 30
    assert info.block_bytes[0] == 4 * (2 * 576 + 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert info.head_bytes == head.nbytes == 4 * (49152 * 576 + 576)


def test_retried_step_is_idempotent(head: Head, whole_model: Stage) -> None:
    cache = whole_model.new_cache()
    whole_model.forward(head.embed([504, 3575, 282]), cache)
    x = head.embed([4649])
    first = whole_model.forward(x, cache)
    again = whole_model.forward(x, cache, position=3)  # resent: the cache forgets and redoes it
    assert cache.length == 4
    assert np.array_equal(first, again)


def test_forward_rejects_bad_input(head: Head, whole_model: Stage) -> None:
    cache = whole_model.new_cache()
    x = head.embed([504, 3575])
    with pytest.raises(ModelInputError, match="float32"):
        whole_model.forward(x.astype(np.float64), cache)
    with pytest.raises(ModelInputError, match="shape"):
        whole_model.forward(x[:, :100], cache)
    with pytest.raises(ModelInputError, match="skips ahead"):
        whole_model.forward(x, cache, position=5)
    with pytest.raises(ModelInputError, match="layers"):
        whole_model.forward(x, _split(whole_model, [(0, 2)])[0].new_cache())
    cache.max_len = 3
    whole_model.forward(x, cache)
    with pytest.raises(ModelInputError, match="exceeds the context"):
        whole_model.forward(x, cache)
    assert cache.length == 2  # a refused step leaves the cache as it was
    with pytest.raises(ValueError, match="token id"):
        head.embed([49152])


def test_block_weights_are_fused_and_contiguous(whole_model: Stage) -> None:
    w: BlockWeights = whole_model.blocks[0]
    assert w.wqkv.shape == (576 + 2 * 192, 576)  # [out, in]
    assert w.w_gate_up.shape == (2 * 1536, 576)
    assert w.w_down.shape == (576, 1536)
    assert all(a.flags.c_contiguous and a.dtype == np.float32 for a in vars(w).values())


def test_sampling_is_seeded_and_top_p_narrows(head: Head, whole_model: Stage) -> None:
    logits = head.logits(whole_model.forward(head.embed([504, 3575]), whole_model.new_cache()))[-1]
    hot = SamplingParams(temperature=1.5, seed=7)
    draws = [Sampler(hot)(logits) for _ in range(2)]
    assert draws[0] == draws[1]
    many = Sampler(hot)
    assert len({many(logits) for _ in range(30)}) > 1
    tiny_p = Sampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=1))
    assert {tiny_p(logits) for _ in range(10)} == {int(np.argmax(logits))}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_generation_is_sans_io(head: Head, whole_model: Stage) -> None:
    gen = Generation(head, [504, 3575, 282, 4649, 314], SamplingParams(max_new_tokens=3))
    cache = whole_model.new_cache()
    positions = []
    while not gen.done:
        step = gen.next_input()
        positions.append((step.position, step.hidden.shape[0]))
        gen.feed(whole_model.forward(step.hidden, cache, step.position))
    assert positions == [(0, 5), (5, 1), (6, 1)]
    assert gen.new_ids == [7042, 30, 198]
    assert gen.stop_reason == "length"
    with pytest.raises(RuntimeError):
        gen.next_input()
