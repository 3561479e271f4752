"""The whole model in one process: what ``idlefleet generate --local``, the API's local backend and a
local batch job run."""

from __future__ import annotations

from idlefleet.node.model.gguf_loader import open_model
from idlefleet.node.model.locate import find_default_model
from idlefleet.node.model.stage import Head, Stage, load_head, load_stage
from idlefleet.node.model.tokenizer import Tokenizer


def load_local(model: str | None) -> tuple[Tokenizer, Head, Stage]:
    """Tokenizer, client head and a stage of every block from ``model`` (default: SmolLM2)."""
    with open_model(model or find_default_model()) as mf:
        tokenizer = Tokenizer.from_model(mf)
        head = load_head(mf)  # the client's part
        stage = load_stage(mf, 0, mf.config.n_blocks)  # every block, in this process
    return tokenizer, head, stage
