"""What the first hop can learn (issue 8, finding 8): a nearest-row lookup in the public embedding
table inverts what it receives. With ``local_blocks = 0`` that is the token embeddings and the
lookup recovers the prompt; with K blocks run by the client it receives hidden states after K
blocks. The numbers are printed (``pytest -s``) and quoted in docs/ARCHITECTURE.md ("What each hop sees")."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from idlefleet.node.client.config import ClientModel
from idlefleet.node.model.stage import load_stage

PROMPTS = (
    "My bank PIN is 4921 and my password is hunter2.",
    "Once upon a time, in a city of parked electric cars, a young woman named Aria discovered",
    "Please summarise my medical record: type 2 diabetes, metformin 500mg twice daily.",
)


class NearestRow:
    """The attack: for each received row, the closest row of the public embedding table, by
    cosine and by L2 distance."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.unit = table / np.linalg.norm(table, axis=1, keepdims=True)
        self.sq = (table**2).sum(axis=1)[None, :]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        l2 = self.sq - 2 * x @ self.table.T  # |x - e|^2 minus the constant |x|^2
        return (xn @ self.unit.T).argmax(axis=1), l2.argmin(axis=1)


@pytest.fixture(scope="module")
def first_blocks(model_file: Any) -> Any:
    return load_stage(model_file, 0, 2)


def recovered(client_model: ClientModel, first_blocks: Any, attack: NearestRow,
              k: int) -> tuple[float, float]:
    """Fraction of prompt tokens recovered from what the first hop receives with K local blocks."""
    hits_cos = hits_l2 = total = 0
    for prompt in PROMPTS:
        ids = np.asarray(client_model.tokenizer.encode(prompt))
        x = client_model.head.embed(ids)  # what Pipeline.forward starts from
        if k:
            local = first_blocks.sub_stage(0, k)  # what ClientModel.local runs
            x = local.forward(x, local.new_cache(), 0)
        by_cos, by_l2 = attack(x)
        hits_cos += int((by_cos == ids).sum())
        hits_l2 += int((by_l2 == ids).sum())
        total += len(ids)
    return hits_cos / total, hits_l2 / total


def test_nearest_row_inversion_at_k_0_1_2(client_model: ClientModel, first_blocks: Any) -> None:
    attack = NearestRow(client_model.head.embedding)
    found = {k: recovered(client_model, first_blocks, attack, k) for k in (0, 1, 2)}
    for k, (cos, l2) in found.items():
        print(f"local_blocks={k}: nearest-row inversion recovers {cos:.0%} (cosine) / {l2:.0%} (L2) "
              f"of prompt tokens")
    assert min(found[0]) >= 0.95  # embeddings on the wire: the prompt is readable
    for k in (1, 2):
        assert max(found[k]) < min(found[0])
