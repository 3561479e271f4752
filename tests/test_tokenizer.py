"""The tokenizer rebuilt from GGUF metadata, against Hugging Face's and by round trips."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from idlefleet.node.model.tokenizer import TextStream, Tokenizer, render_chatml
from idlefleet.protocols.errors import ModelError

ROUND_TRIPS = [
    "naïve café — 日本語 🚗⚡ Ünïcödé ∑ 𝔘",
    "a  b   c\n\n\tx    \r\n  ",
    "   ",
    "1234567890 3.14159 -0.5e-7 2026-11-27",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "<|im_start|><|im_start|>x<|im_end",  # a broken special token stays text
]


def test_ids_match_hugging_face(tokenizer: Tokenizer, hf_reference: dict[str, Any]) -> None:
    for case in hf_reference["tokenizer"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_in_text_encode_to_their_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert (ids[0], ids[-1]) == (1, 2)
    assert tokenizer.decode(ids, skip_special=True) == "user\nHi"
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert {0, 2} <= tokenizer.stop_ids  # <|endoftext|> and <|im_end|>


def test_digits_split_individually(tokenizer: Tokenizer) -> None:
    # SmolLM2 (tokenizer.ggml.pre = "smollm") splits every digit off, like llama.cpp does.
    ids = tokenizer.encode("x 2024")
    assert [tokenizer.decode([i]) for i in ids] == ["x", " ", "2", "0", "2", "4"]


def test_chat_template_matches_hugging_face(tokenizer: Tokenizer, hf_reference: dict[str, Any]) -> None:
    ex = hf_reference["chat_template_example"]
    text = tokenizer.apply_chat_template(ex["messages"])
    assert text == ex["text"]
    assert tokenizer.encode(text) == ex["ids"]


def test_chat_template_with_system_message(tokenizer: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_non_chatml_template_refused() -> None:
    with pytest.raises(ModelError, match="ChatML"):
        render_chatml("{{ messages }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ModelError, match="no chat template"):
        render_chatml(None, [])


def test_text_stream_holds_back_partial_utf8(tokenizer: Tokenizer) -> None:
    text = "ok 🚗⚡ 日本語!"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # the emoji spans several byte tokens


def test_text_stream_is_incremental_and_equals_one_decode(tokenizer: Tokenizer) -> None:
    # Pieces of a long mixed text (runs of spaces, multi-byte characters) add up to one decode
    # of all ids, and a push does not decode every id again.
    text = "The car 🚗 parks; Ünïcödé ✓ 日本語, then   spaces.\n" * 40
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    decoded: list[int] = []
    real = tokenizer.decode

    def counting(ids_: Iterable[int], *, skip_special: bool = False) -> str:
        ids_ = list(ids_)
        decoded.append(len(ids_))
        return real(ids_, skip_special=skip_special)

    tokenizer.decode = counting  # type: ignore[method-assign]
    try:
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
    finally:
        del tokenizer.decode
    assert "".join(pieces) == tokenizer.decode(ids, skip_special=True) == text
    assert len(ids) > 400 and max(decoded) < 20  # a few ids per decode, never all of them
