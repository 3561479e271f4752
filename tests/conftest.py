"""Shared fixtures. Model fixtures load SmolLM2 once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_path() -> Path:
    from node.model.locate import find_default_model

    return find_default_model()


@pytest.fixture(scope="session")
def model_file(model_path: Path) -> Any:
    from node.model.gguf_loader import open_model

    return open_model(model_path)


@pytest.fixture(scope="session")
def tokenizer(model_file: Any) -> Any:
    from node.model.tokenizer import Tokenizer

    return Tokenizer.from_model(model_file)


@pytest.fixture(scope="session")
def head(model_file: Any) -> Any:
    from node.model.stage import load_head

    return load_head(model_file)


@pytest.fixture(scope="session")
def whole_model(model_file: Any) -> Any:
    """Every block of SmolLM2 as one stage (no head; use the ``head`` fixture)."""
    from node.model.stage import load_stage

    return load_stage(model_file, 0, model_file.config.n_blocks)


@pytest.fixture(scope="session")
def hf_reference() -> dict[str, Any]:
    """Hugging Face transformers' tokens and greedy continuations for the same GGUF."""
    data: dict[str, Any] = json.loads((DATA / "hf_reference.json").read_text())
    return data
