"""Generation as plain functions: prefill the prompt in one pass, decode one token at a time, sample, stop.

Sampling follows transformers' logits processors in their order (repetition penalty, temperature,
top-k, top-p, min-p). A `Session` keeps the KV cache between calls, so a chat only prefills what is new.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from trillm.chat import find_stop, safe_prefix_len
from trillm.errors import TrillmError
from trillm.tokenizer import StreamDecoder


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
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise TrillmError(f"invalid sampling value: {name} {rule}, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                previous: torch.Tensor) -> int:
    """Pick the next token id from logits (vocab,) given the ids seen so far."""
    if sampling.repetition_penalty != 1.0 and previous.numel():
        seen = logits[previous]
        logits = logits.clone()
        logits[previous] = torch.where(seen < 0, seen * sampling.repetition_penalty, seen / sampling.repetition_penalty)
    if sampling.greedy:
        return int(logits.argmax())
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
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Session:
    """A KV cache and the token ids it holds, carried across calls (a chat's history)."""

    cache: object = None
    tokens: list[int] = field(default_factory=list)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@contextmanager
def torch_threads(n: int):
    """Run torch ops on n threads inside the block.

    A decode step is ~150 tiny torch ops around the native matmuls (which have their own threads);
    waking a second torch thread for each costs more than the op, so decoding runs torch on one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def generate_ids(network, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, stop_ids: set[int],
                 max_context: int, session: Session | None = None) -> Iterator[int]:
    """Yield generated token ids; stops at a stop id (not yielded), max_new_tokens or a full context."""
    if not prompt_ids:
        raise TrillmError("the prompt is empty")
    if len(prompt_ids) >= max_context:
        raise TrillmError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the context of {max_context} tokens "
            "(shorten it, or raise --ctx-size up to the model's limit)"
        )
    session = session if session is not None else Session()
    if session.cache is None:
        session.cache = network.new_cache(1, max_context)
    # Reuse cached positions that match the prompt; at least the last prompt token is run again for its logits.
    start = min(common_prefix_length(session.tokens, prompt_ids), len(prompt_ids) - 1)
    session.tokens = list(prompt_ids[:start])
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    history = torch.tensor(prompt_ids, dtype=torch.long)

    pending = prompt_ids[start:]
    for _ in range(max_new_tokens):
        position = len(session.tokens)
        if position + len(pending) > max_context:
            return  # the context is full
        with torch_threads(torch.get_num_threads() if len(pending) > 1 else 1):
            logits = network(torch.tensor([pending]), session.cache, position, last_only=True)[0, -1]
        session.tokens.extend(pending)
        token = sample_next(logits, sampling, generator, history)
        if token in stop_ids:
            return
        yield token
        history = torch.cat((history, torch.tensor([token])))
        pending = [token]


def stream_text(tokenizer, token_ids: Iterator[int], stop_strings: list[str] = ()) -> Iterator[str]:
    """Turn generated ids into printable text pieces: whole UTF-8 characters only, stop strings cut off.

    Text that could be the start of a stop string is held back until it is clearly not one.
    """
    decoder = StreamDecoder(tokenizer)
    held = ""
    for token in token_ids:
        held += decoder.push(token)
        stop_at = find_stop(held, stop_strings)
        if stop_at is not None:
            if stop_at:
                yield held[:stop_at]
            token_ids.close()
            return
        ready = safe_prefix_len(held, stop_strings)
        if ready:
            yield held[:ready]
            held = held[ready:]
    held += decoder.flush()
    stop_at = find_stop(held, stop_strings)
    if stop_at is not None:
        held = held[:stop_at]
    if held:
        yield held
