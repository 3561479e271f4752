"""Shared fixtures. Model fixtures load SmolLM2 once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_path() -> Path:
    from idlefleet.node.model.locate import find_default_model

    return find_default_model()


@pytest.fixture(scope="session")
def model_file(model_path: Path) -> Any:
    from idlefleet.node.model.gguf_loader import open_model

    return open_model(model_path)


@pytest.fixture(scope="session")
def tokenizer(model_file: Any) -> Any:
    from idlefleet.node.model.tokenizer import Tokenizer

    return Tokenizer.from_model(model_file)


@pytest.fixture(scope="session")
def head(model_file: Any) -> Any:
    from idlefleet.node.model.stage import load_head

    return load_head(model_file)


@pytest.fixture(scope="session")
def whole_model(model_file: Any) -> Any:
    """Every block of SmolLM2 as one stage (no head; use the ``head`` fixture)."""
    from idlefleet.node.model.stage import load_stage

    return load_stage(model_file, 0, model_file.config.n_blocks)


@pytest.fixture(scope="session")
def hf_reference() -> dict[str, Any]:
    """Hugging Face transformers' tokens and greedy continuations for the same GGUF."""
    data: dict[str, Any] = json.loads((DATA / "hf_reference.json").read_text())
    return data


@pytest.fixture(scope="session")
def client_model(model_path: Path) -> Any:
    """What a fleet client holds: tokenizer, embedding and LM head."""
    from idlefleet.node.client.config import ClientModel

    return ClientModel.load(model_path)


@pytest.fixture(scope="session")
def local_greedy(model_file: Any, client_model: Any) -> Any:
    """``local_greedy(prompt, n)``: greedy new ids from the whole model in this process (cached)."""
    import functools

    from idlefleet.node.model.generate import generate, local_middle
    from idlefleet.node.model.sampling import SamplingParams
    from idlefleet.node.model.stage import load_stage

    stage = load_stage(model_file, 0, model_file.config.n_blocks)

    @functools.cache
    def run(prompt: str, max_new_tokens: int) -> tuple[int, ...]:
        ids = client_model.tokenizer.encode(prompt)
        result = generate(client_model.head, local_middle(stage, stage.new_cache()), ids,
                          SamplingParams(max_new_tokens=max_new_tokens), client_model.tokenizer.stop_ids)
        return tuple(result.new_ids)

    return run
