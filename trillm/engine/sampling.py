"""How the next token is picked from the logits: transformers' logits processors in the order its
generate() applies them (repetition penalty, temperature, top-k, top-p, min-p), then a draw; temperature
0 is greedy. tests/test_engine.py holds these to transformers' processors."""

import math
from dataclasses import dataclass

import torch

from trillm.errors import TrillmError


@dataclass
class Sampling:
    """How the next token is picked; temperature 0 means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = [
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be finite and >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "must be finite and > 0 (1 = off)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise TrillmError(f"invalid sampling value: {name} {rule}, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling(temperature=0)


def penalize_repetition(logits: torch.Tensor, penalty: float, previous: torch.Tensor) -> torch.Tensor:
    """The logits of tokens seen before made less likely (Keskar et al., 2019, CTRL): divided by the penalty
    where positive, multiplied where negative."""
    if penalty == 1.0 or not previous.numel():
        return logits
    seen = logits[previous]
    logits = logits.clone()
    logits[previous] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def filtered_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution (vocab,) a sampled token is drawn from: logits / temperature, then only the top_k
    most likely, the smallest set holding top_p of the probability, and those at least min_p times the
    most likely one's probability."""
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        kth_best = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - sampling.top_p
        drop_sorted[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    if sampling.min_p > 0:
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(), 0)
    return probs / probs.sum()


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                previous: torch.Tensor) -> int:
    """Pick the next token id from logits (vocab,) given the ids seen so far."""
    logits = penalize_repetition(logits, sampling.repetition_penalty, previous)
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(filtered_probabilities(logits, sampling), 1, generator=generator))
