"""The engine: sampling equals transformers' logits processors, generation stops where it should and runs
each token through the network once, and stop strings are never printed."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trillm.engine import Sampling, Session, generate_ids, sample_next
from trillm.engine.sampling import filtered_probabilities, penalize_repetition
from trillm.engine.stopping import find_stop, safe_prefix_len


# ---- Sampling ------------------------------------------------------------------------------------------

def transformers_processors(sampling: Sampling) -> LogitsProcessorList:
    """The processors transformers' generate() builds for these settings, in its order
    (generation/utils.py: _get_logits_processor)."""
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.greedy:
        return processors
    processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p:
        processors.append(MinPLogitsWarper(sampling.min_p))
    return processors


SETTINGS = [
    Sampling(),  # the CLI's defaults: 0.8, top-k 40, top-p 0.95, min-p 0.05
    Sampling(temperature=1.3, top_k=0, top_p=0.5, min_p=0.0),
    Sampling(temperature=0.6, top_k=7, top_p=1.0, min_p=0.2, repetition_penalty=1.3),
    Sampling(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=0.7),
]


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_distribution_equals_transformers_processors(sampling):
    generator = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = torch.randn(500, generator=generator) * (1 + 2 * trial)
        previous = torch.randint(0, 500, (12,), generator=generator)
        expected = transformers_processors(sampling)(previous[None], logits[None].clone())[0].softmax(-1)
        ours = filtered_probabilities(penalize_repetition(logits, sampling.repetition_penalty, previous), sampling)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        assert (ours > 0).sum() < 500 or sampling.top_k == 0  # the filters did cut something


def test_greedy_is_the_argmax_after_the_repetition_penalty():
    logits = torch.tensor([1.0, 5.0, 4.5, -2.0])
    assert sample_next(logits, Sampling(temperature=0), None, torch.tensor([], dtype=torch.long)) == 1
    penalized = Sampling(temperature=0, repetition_penalty=1.2)
    expected = transformers_processors(penalized)(torch.tensor([[1]]), logits[None].clone())[0].argmax()
    assert sample_next(logits, penalized, None, torch.tensor([1])) == expected == 2


def test_seeded_draws_repeat_and_follow_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    no_history = torch.tensor([], dtype=torch.long)
    draws = [[sample_next(logits, sampling, torch.Generator().manual_seed(3), no_history) for _ in range(2)]
             for _ in range(2)]
    assert draws[0] == draws[1]
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_next(logits, sampling, generator, no_history)
                                          for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, logits.softmax(-1), atol=0.03, rtol=0)


# ---- Generation ----------------------------------------------------------------------------------------

class CountingNetwork:
    """Predicts token (last + 1) % 10 and records the (start, length) of every forward."""

    config = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=2, vocab_size=10)

    def __init__(self):
        self.calls = []

    def new_cache(self, batch, max_length):
        return object()

    def __call__(self, input_ids, cache, start, last_only):
        self.calls.append((start, input_ids.shape[1]))
        return torch.nn.functional.one_hot((input_ids[:, -1:] + 1) % 10, 10).float() * 10


GREEDY = Sampling(temperature=0)


def test_generation_runs_each_token_once_and_stops_at_the_limit():
    network, session = CountingNetwork(), Session()
    tokens = list(generate_ids(network, [1, 2, 3], 4, GREEDY, stop_ids=set(), max_context=100, session=session))
    assert tokens == [4, 5, 6, 7] and session.finish_reason == "length"
    assert network.calls == [(0, 3), (3, 1), (4, 1), (5, 1)]  # the last token is never run


def test_generation_stops_at_a_stop_id_and_a_full_context():
    network, session = CountingNetwork(), Session()
    assert list(generate_ids(network, [1, 2], 10, GREEDY, {5}, 100, session)) == [3, 4]
    assert session.finish_reason == "stop"
    network, session = CountingNetwork(), Session()
    assert list(generate_ids(network, [1, 2], 10, GREEDY, set(), 5, session)) == [3, 4, 5, 6]
    assert network.calls[-1] == (4, 1) and session.finish_reason == "context"  # position 4 is the context's last
    assert list(generate_ids(network, [1, 2], 0, GREEDY, set(), 5, session)) == []
    assert session.finish_reason == "length"
    stopped = generate_ids(network, [1, 2], 10, GREEDY, set(), 100, session)
    next(stopped)
    stopped.close()  # what stream_text does at a stop string
    assert session.finish_reason == "stop"


def test_a_session_runs_only_what_follows_the_shared_prefix():
    network, session = CountingNetwork(), Session()
    assert list(generate_ids(network, [1, 2, 3], 2, GREEDY, set(), 100, session)) == [4, 5]
    assert session.tokens == [1, 2, 3, 4]  # 5 was never run
    network.calls.clear()
    assert list(generate_ids(network, [1, 2, 3, 4, 5, 9, 9], 1, GREEDY, set(), 100, session)) == [0]
    assert network.calls == [(4, 3)]
    network.calls.clear()
    list(generate_ids(network, [1, 2], 1, GREEDY, set(), 100, session))  # a prefix: its last token runs again
    assert network.calls == [(1, 1)]


# ---- Stop strings --------------------------------------------------------------------------------------

def test_find_stop():
    assert find_stop("Hello world", ["<|im_end|>"]) is None
    assert find_stop("Hi<|im_end|>", ["<|im_end|>"]) == 2
    assert find_stop("a STOP b <|im_end|>", ["<|im_end|>", "STOP"]) == 2  # the earliest, not the first listed
    assert find_stop("<|im_end|>", ["<|im_end|>"]) == 0
    assert find_stop("Hello", ["", "xyz"]) is None  # an empty stop string is ignored
    assert find_stop("Hello", []) is None


def test_safe_prefix_len():
    stops = ["<|im_end|>", "\nUser:"]
    assert safe_prefix_len("Hello", stops) == 5
    assert safe_prefix_len("Hello <|im", stops) == 6  # "<|im" may become "<|im_end|>"
    assert safe_prefix_len("Hello <", stops) == 6
    assert safe_prefix_len("Hello <|x", stops) == 9  # "<|x" cannot
    assert safe_prefix_len("Hi\nUse", stops) == 2
    assert safe_prefix_len("Hi<|im_end|> more", stops) == 2  # never past a complete stop string
    assert safe_prefix_len("<|im_end", stops) == 0
    assert safe_prefix_len("", stops) == 0
    assert safe_prefix_len("ab<|im_end|", ["<|im_end|>", "b<|im"]) == 1  # the earliest possible start wins


def stream(chunks: list[str], stop_strings: list[str]) -> list[str]:
    """Print as the engine does: what is safe after each chunk, everything left if no stop string came."""
    text, printed, shown = "", 0, []
    for chunk in chunks:
        text += chunk
        end = safe_prefix_len(text, stop_strings)
        shown.append(text[printed:end])
        printed = end
        if find_stop(text, stop_strings) is not None:
            return shown
    shown.append(text[printed:])
    return shown


def test_stop_string_split_across_chunks_is_never_printed():
    assert stream(["Sure", "! <|im", "_e", "nd|>", " junk"], ["<|im_end|>"]) == ["Sure", "! ", "", ""]
    # A false alarm is printed once it can no longer be a stop string.
    assert stream(["a <|im", "_start|> b"], ["<|im_end|>"]) == ["a ", "<|im_start|> b", ""]
    # Every way of cutting the text into three chunks prints exactly the text before the stop string.
    text, stops = "Hello world\nUser: <|im_end|>tail", ["<|im_end|>", "\nUser:"]
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert "".join(stream([text[:i], text[i:j], text[j:]], stops)) == "Hello world", (i, j)
