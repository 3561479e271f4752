"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to generate; ``temperature == 0`` means greedy. Raises ValueError when out of range."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Picks token ids from logits; seeded, so a fixed seed repeats the same choices."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """``logits [V]`` -> token id."""
        p = self.params
        if p.temperature == 0.0:
            return int(np.argmax(logits))  # first maximum, like torch.argmax
        z = logits.astype(np.float64) / p.temperature  # [V]
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")  # [V] most likely first
            sorted_p = probs[order]
            # keep a token while the mass before it is < top_p (the top token always stays)
            keep = order[(np.cumsum(sorted_p) - sorted_p) < p.top_p]
            kept = probs[keep] / probs[keep].sum()
            return int(keep[self.rng.choice(keep.size, p=kept)])
        return int(self.rng.choice(probs.size, p=probs))
