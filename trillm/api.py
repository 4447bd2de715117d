"""A loaded model: the network of its family, its tokenizer, and generation with its own stop tokens."""

import functools
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from trillm.chat import render_chat
from trillm.checkpoint import open_checkpoint
from trillm.checkpoint.fields import Fields
from trillm.checkpoint.pages import trim_heap
from trillm.engine import Sampling, Session, generate_ids, stream_text
from trillm.engine.stopping import cut_at_stop
from trillm.errors import TrillmError
from trillm.harmony import Harmony
from trillm.models import family_loader
from trillm.models.gpt_oss import EXPERT_ACTIVATIONS
from trillm.models.llama import ACTIVATIONS
from trillm.weights.head import DENSE_FORMATS, HEAD_FORMATS

log = logging.getLogger("trillm")

HARMONY_STOPS = ("<|return|>", "<|call|>")


class Model:
    def __init__(self, network, tokenizer, source: str, generation_config: dict, ctx_size: int | None = None):
        """`ctx_size`: the context in tokens, None or 0 for the model's own; more than the model's own is
        cut to it, with a warning."""
        self.network = network
        self.tokenizer = tokenizer
        self.source = source
        limit = network.config.max_position_embeddings
        if ctx_size and ctx_size > limit:
            log.warning("trillm: warning: the context of %d tokens asked for is more than this model's %d; using %d",
                        ctx_size, limit, limit)
        self.max_context = min(ctx_size or limit, limit)
        self.stop_ids = set(Fields(generation_config, Path(source) / "generation_config.json").token_ids("eos_token_id"))
        if tokenizer is not None and network.config.chat_format == "harmony":
            # harmony's reply ends at <|return|> or <|call|>; <|end|> only closes its analysis message.
            self.stop_ids |= {i for i in map(tokenizer.backend.token_to_id, HARMONY_STOPS) if i is not None}
        elif tokenizer is not None:
            self.stop_ids |= tokenizer.stop_ids

    @property
    def config(self):
        return self.network.config

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of a full forward pass, no cache."""
        return self.network(input_ids)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise TrillmError(f"{self.source}: this model has no tokenizer files; only forward() on token ids works")
        return self.tokenizer

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt. One that cannot fit in the context is refused before it is tokenized whole
        (a 10 MB text took 13 s and 1.7 GB to be found too long): a token stands for at most the vocabulary's
        longest entry in bytes."""
        tokenizer = self.require_tokenizer()
        size = len(text.encode("utf-8", "surrogatepass"))
        if size >= self.max_context and size // tokenizer.max_token_bytes >= self.max_context:
            raise TrillmError(f"the prompt is at least {size // tokenizer.max_token_bytes} tokens ({size} bytes), "
                              f"longer than the context of {self.max_context} tokens (shorten it, or raise "
                              f"--ctx-size up to the model's limit)")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    @functools.cached_property
    def harmony(self) -> Harmony:
        return Harmony(self.require_tokenizer(), self.source)

    def chat_prompt(self, messages: list[dict], reasoning_effort: str = "medium") -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (or harmony, for gpt-oss, with
        its reasoning effort: low, medium or high), ready for the reply."""
        tokenizer = self.require_tokenizer()
        if self.config.chat_format == "harmony":
            return self.harmony.render(messages, reasoning_effort)
        text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                           bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        return self.encode_prompt(text, add_special_tokens=False)

    def stream_messages(self, messages: list[dict], max_new_tokens: int = 256, sampling: Sampling | None = None,
                        session: Session | None = None, reasoning_effort: str = "medium") -> Iterator[tuple[str, str]]:
        """Yield a chat reply as (channel, text) pieces: for gpt-oss its "analysis" (reasoning) and "final"
        (the answer) channels as harmony parses them; for other models their whole reply as "final"."""
        token_ids = self.generate_ids(self.chat_prompt(messages, reasoning_effort), max_new_tokens, sampling, session)
        if self.config.chat_format != "harmony":
            pieces = stream_text(self.require_tokenizer(), token_ids)
            try:
                for piece in pieces:
                    yield "final", piece
            finally:
                pieces.close()
            return
        parser = self.harmony.parser()
        try:
            for token in token_ids:
                piece = parser.push(token)
                if piece is not None:
                    yield piece
        finally:
            token_ids.close()

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, sampling: Sampling | None = None,
                     session: Session | None = None) -> Iterator[int]:
        return generate_ids(self.network, prompt_ids, max_new_tokens, sampling or Sampling(), self.stop_ids,
                            self.max_context, session)

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 256, sampling: Sampling | None = None,
               stop: list[str] = (), session: Session | None = None) -> Iterator[str]:
        """Yield the reply as text pieces. A str prompt is continued as is; a message list goes through
        the chat template (for gpt-oss: harmony, and only its final answer is yielded; see stream_messages)."""
        tokenizer = self.require_tokenizer()
        if isinstance(prompt, str):
            return stream_text(tokenizer, self.generate_ids(self.encode_prompt(prompt), max_new_tokens, sampling,
                                                            session), stop)
        if self.config.chat_format == "harmony":
            return cut_at_stop(final_pieces(self.stream_messages(prompt, max_new_tokens, sampling, session)), stop)
        return stream_text(tokenizer, self.generate_ids(self.chat_prompt(prompt), max_new_tokens, sampling, session),
                           stop)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, sampling: Sampling | None = None,
                 stop: list[str] = ()) -> str:
        return "".join(self.stream(prompt, max_new_tokens, sampling, stop))


def final_pieces(messages: Iterator[tuple[str, str]]) -> Iterator[str]:
    """The "final" channel's text of a reply's (channel, text) pieces; closing this closes the reply."""
    try:
        yield from (text for channel, text in messages if channel == "final")
    finally:
        messages.close()


def load(source=None, ctx_size: int | None = None, head: str | None = None, dense: str | None = None,
         expert_activations: str | None = None, activations: str | None = None) -> Model:
    """Load a model folder, GGUF file, Hugging Face repo id, or (None) the default model.

    `ctx_size` is the context in tokens: None or 0 for the model's own, more is cut to it (with a warning).

    `head` picks how the output head is kept in memory, the largest single read of a decode step when it
    is a tied embedding: "bf16" (exact), "q8_0" (GGML Q8_0, 47% fewer bytes than bf16) or "q6_k" (59% fewer,
    int8 activations; see weights/head.py); None, the family's default: as stored for LLaMA, q6_k for
    BitNet (models/bitnet.py: DEFAULT_HEAD).

    LLaMA only: `activations` "int8" quantizes each matmul's activations to int8 (per 32, or 256 for the K
    types), as llama.cpp does, for weights in GGML blocks that have such a kernel (Q8_0, Q4_0, Q4_1, Q4_K,
    Q5_K, Q6_K): faster decoding, logits no longer exactly transformers'; None or "float32" (the default)
    keeps them exact.

    gpt-oss only: `dense` "q8_0" re-stores the attention projections and (unless `head` says otherwise) the
    head in Q8_0, as llama.cpp's GGUF files have them; None keeps them as stored. `expert_activations`
    "int8" multiplies the MXFP4 experts with activations quantized per 32, as llama.cpp does, "bf16" with
    them rounded to bfloat16 (CPUs with AVX512-BF16; a prompt's attention projections then multiply in
    bfloat16 too), "float32" exactly (slower); None (the default): int8 for decode steps, and bf16 for
    prompts where the CPU has it (see weights/mxfp4.py).
    """
    if head not in (None, *HEAD_FORMATS):
        raise TrillmError(f"invalid output head format {head!r} (choose from {', '.join(HEAD_FORMATS)})")
    if dense not in (None, *DENSE_FORMATS):
        raise TrillmError(f"invalid dense format {dense!r} (choose from {', '.join(DENSE_FORMATS)})")
    if expert_activations not in (None, *EXPERT_ACTIVATIONS):
        raise TrillmError(f"invalid expert activations {expert_activations!r} "
                          f"(choose from {', '.join(EXPERT_ACTIVATIONS)})")
    if activations not in (None, *ACTIVATIONS):
        raise TrillmError(f"invalid activations {activations!r} (choose from {', '.join(ACTIVATIONS)})")
    if ctx_size is not None and (isinstance(ctx_size, bool) or not isinstance(ctx_size, int) or ctx_size < 0):
        raise TrillmError(f"invalid context size {ctx_size!r}: a number of tokens, or 0 for the model's own")
    checkpoint = open_checkpoint(source)
    family = family_loader(checkpoint)
    # The tokenizer first, then its scratch handed back: building a 128k vocabulary passes through ~150 MB
    # that would otherwise sit beside the weights at the peak.
    tokenizer = checkpoint.tokenizer()
    trim_heap()
    options = {name: value for name, value in (("dense", dense), ("expert_activations", expert_activations),
                                               ("activations", activations)) if value is not None}
    for name in options:
        if name not in inspect.signature(family).parameters:
            applies_to = "LLaMA" if name == "activations" else "gpt-oss"
            raise TrillmError(f"{name} applies to {applies_to} only, not to {checkpoint.path}")
    network = family(checkpoint, head=head, **options)
    return Model(network, tokenizer, str(checkpoint.path), checkpoint.generation_config(), ctx_size)
