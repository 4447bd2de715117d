"""A loaded model: the network of its family, its tokenizer, and generation with its own stop tokens."""

from collections.abc import Iterator

import torch

from trillm.chat import render_chat
from trillm.checkpoint import open_checkpoint
from trillm.checkpoint.pages import trim_heap
from trillm.engine import Sampling, Session, generate_ids, stream_text
from trillm.errors import TrillmError
from trillm.models import family_loader
from trillm.weights.head import HEAD_FORMATS


class Model:
    def __init__(self, network, tokenizer, source: str, generation_config: dict, ctx_size: int | None = None):
        self.network = network
        self.tokenizer = tokenizer
        self.source = source
        self.max_context = min(ctx_size or network.config.max_position_embeddings,
                               network.config.max_position_embeddings)
        eos = generation_config.get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None:
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

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ready for the reply."""
        tokenizer = self.require_tokenizer()
        text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                           bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        return tokenizer.encode(text, add_special_tokens=False)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, sampling: Sampling | None = None,
                     session: Session | None = None) -> Iterator[int]:
        return generate_ids(self.network, prompt_ids, max_new_tokens, sampling or Sampling(), self.stop_ids,
                            self.max_context, session)

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 256, sampling: Sampling | None = None,
               stop: list[str] = (), session: Session | None = None) -> Iterator[str]:
        """Yield the reply as text pieces. A str prompt is continued as is; a message list goes through
        the chat template."""
        tokenizer = self.require_tokenizer()
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else self.chat_prompt(prompt)
        return stream_text(tokenizer, self.generate_ids(prompt_ids, max_new_tokens, sampling, session), stop)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, sampling: Sampling | None = None,
                 stop: list[str] = ()) -> str:
        return "".join(self.stream(prompt, max_new_tokens, sampling, stop))


def load(source=None, ctx_size: int | None = None, head: str | None = None) -> Model:
    """Load a model folder, GGUF file, Hugging Face repo id, or (None) the default model.

    `head` picks how the output head is kept in memory, the largest single read of a decode step when it
    is a tied embedding: "bf16" (exact), "q8_0" (GGML Q8_0, 47% fewer bytes than bf16) or "q6_k" (59% fewer,
    int8 activations; see weights/head.py); None, the family's default: as stored for LLaMA, q6_k for
    BitNet (models/bitnet.py: DEFAULT_HEAD).
    """
    if head not in (None, *HEAD_FORMATS):
        raise TrillmError(f"invalid output head format {head!r} (choose from {', '.join(HEAD_FORMATS)})")
    checkpoint = open_checkpoint(source)
    family = family_loader(checkpoint)
    # The tokenizer first, then its scratch handed back: building a 128k vocabulary passes through ~150 MB
    # that would otherwise sit beside the weights at the peak.
    tokenizer = checkpoint.tokenizer()
    trim_heap()
    network = family(checkpoint, head=head)
    return Model(network, tokenizer, str(checkpoint.path), checkpoint.generation_config(), ctx_size)
