"""Generation as plain functions: `prefill` runs a prompt in one pass, `decode_one_token` one token, and
`generate_ids` samples and stops between them."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from trillm.engine.sampling import Sampling, sample_next
from trillm.engine.session import Session
from trillm.errors import TrillmError
from trillm.native.plan import DecodePlan


@contextmanager
def torch_threads(n: int):
    """Run torch ops on n threads inside the block.

    A decode step is ~150 tiny torch ops around the native matmuls (which have their own threads);
    waking a second torch thread for each costs more than the op, so decoding runs torch on one. torch's
    setting (OpenMP's) belongs to the calling thread: sequences run from other threads keep their own.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prefill(network, session: Session, token_ids: list[int]) -> torch.Tensor:
    """Run these tokens after the session's (their keys and values into its cache); the logits (vocab,)
    after the last one. One token is a decode step."""
    if len(token_ids) == 1:
        return decode_one_token(network, session, token_ids[0])
    logits = network(torch.tensor([token_ids]), session.cache, len(session.tokens), last_only=True)[0, -1]
    session.tokens.extend(token_ids)
    return logits


def decode_one_token(network, session: Session, token: int) -> torch.Tensor:
    """One decode step: the logits (vocab,) after `token`, which joins the session.

    A session's first step over its cache is recorded as a decode plan (native/plan.py) and the next ones
    run it: one native call a token instead of the model's Python. Steps that cannot be a plan, and every
    step with TRILLM_PLAN=0, run the model's forward."""
    position = len(session.tokens)
    logits = None
    with torch_threads(1):
        if session.plan is None or session.plan[0] is not session.cache:
            if os.environ.get("TRILLM_PLAN", "1") != "0":
                plan, logits = DecodePlan.record(network, session.cache, token, position)
                session.plan = (session.cache, plan)
        elif session.plan[1] is not None:
            logits = session.plan[1].run(token, position)
        if logits is None:  # no plan: the model's forward
            logits = network(torch.tensor([[token]]), session.cache, position, last_only=True)[0, -1]
    session.tokens.append(token)
    return logits


def new_cache(network, max_context: int, sequences: int = 1):
    """The network's KV cache for `sequences` sequences of max_context positions, refused in one line when
    it could not fit in this machine's memory at all (torch reserves it lazily, so a huge one would fail
    late)."""
    c = network.config
    needed = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * max_context * sequences
    what = f"a context of {max_context} tokens" if sequences == 1 else \
        f"{sequences} slots (--parallel) of {max_context} tokens"
    lower = "lower -c/--ctx-size" if sequences == 1 else "lower -c/--ctx-size or --parallel"
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if physical and needed > physical:
        raise TrillmError(f"{what} needs a {needed / 2**30:.1f} GB KV cache, more than "
                          f"this machine's {physical / 2**30:.1f} GB of memory: {lower}")
    try:
        return network.new_cache(sequences, max_context)
    except RuntimeError as error:  # torch's allocator: "can't allocate memory"
        raise TrillmError(f"{what} needs a {needed / 2**30:.1f} GB KV cache, which "
                          f"could not be allocated: {lower}") from error


@torch.inference_mode()
def generate_ids(network, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, stop_ids: set[int],
                 max_context: int, session: Session | None = None) -> Iterator[int]:
    """Yield generated token ids; stops at a stop id (not yielded), max_new_tokens or a full context."""
    if not prompt_ids:
        raise TrillmError("the prompt is empty")
    vocab_size = network.config.vocab_size
    outside = [i for i in prompt_ids if not 0 <= i < vocab_size]
    if outside:
        raise TrillmError(f"token id {outside[0]} is outside the model's vocabulary of {vocab_size} tokens (its "
                          f"tokenizer and its embedding disagree)")
    if len(prompt_ids) >= max_context:
        raise TrillmError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the context of {max_context} tokens "
            "(shorten it, or raise --ctx-size up to the model's limit)"
        )
    session = session if session is not None else Session()
    session.finish_reason = "length"
    if max_new_tokens < 1:
        return
    if session.cache is None:
        session.cache = new_cache(network, max_context)
    session.finish_reason = None
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    history = torch.tensor(prompt_ids, dtype=torch.long)

    logits = prefill(network, session, prompt_ids[session.keep_common_prefix(prompt_ids):])
    for produced in range(1, max_new_tokens + 1):
        token = sample_next(logits, sampling, generator, history)
        if token in stop_ids:
            session.finish_reason = "stop"
            return
        try:
            yield token
        except GeneratorExit:  # the consumer stopped here (at a stop string)
            session.finish_reason = "stop"
            raise
        if produced == max_new_tokens:
            session.finish_reason = "length"
            return
        if len(session.tokens) == max_context:
            session.finish_reason = "context"
            return
        history = torch.cat((history, torch.tensor([token])))
        logits = decode_one_token(network, session, token)
