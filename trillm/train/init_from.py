"""`trillm train --init-from MODEL`: a BitNet started from a LLaMA checkpoint that trillm loads (a Hugging Face
folder or a GGUF file, e.g. the shipped SmolLM2-135M), as Hugging Face's "Fine-tuning LLMs to 1.58bit"
(2024) does: LLaMA's architecture kept, its seven projections made BitLinears (recipe.py) whose quantizers
blend in over a warm-up, the embedding, norms and head kept in full precision. The weights are read in
float32: GGML blocks decoded, GGUF's q/k rows put back in Hugging Face's order."""

import torch

from trillm.checkpoint import open_checkpoint
from trillm.errors import TrillmError
from trillm.models import family_loader
from trillm.models.llama import LlamaConfig, load_llama, unpermute_rope_rows
from trillm.models.loading import DECODER_LAYER_NAMES, MODEL_NAMES, checkpoint_names, decoder_layer_shapes
from trillm.train.recipe import ModelShape
from trillm.weights import GGMLTensor
from trillm.weights.ggml import dequantize_ggml


def llama_start(source: str):
    """(shape, state dict under BitNetModel's names, tokenizer) of a LLaMA checkpoint; TrillmError where it
    is not one."""
    checkpoint = open_checkpoint(source)
    if family_loader(checkpoint) is not load_llama:
        kind = checkpoint.metadata.get("general.architecture") if checkpoint.kind == "gguf" else \
            (checkpoint.config.get("architectures") or [checkpoint.config.get("model_type")])[0]
        raise TrillmError(f"--init-from {source}: a {kind} model is not LLaMA-shaped (only LLaMA checkpoints "
                          f"can be started from)")
    gguf = checkpoint.kind == "gguf"
    c = LlamaConfig.from_gguf(checkpoint.metadata, checkpoint.names(), checkpoint.path) if gguf else \
        LlamaConfig.from_hf(checkpoint.config, checkpoint.path / "config.json")
    if c.ternary is not None:
        raise TrillmError(f"--init-from {source}: its projections are ternary already")
    if c.head_dim * c.num_heads != c.hidden_size:
        raise TrillmError(f"--init-from {source}: heads of {c.head_dim} channels times {c.num_heads} are not the "
                          f"hidden size {c.hidden_size}, which the training model assumes")
    tokenizer = checkpoint.tokenizer()
    if tokenizer is None:
        raise TrillmError(f"--init-from {source}: that model has no tokenizer")
    shape = ModelShape(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position_embeddings,
                       rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, architecture="llama",
                       tie_word_embeddings=c.tie_word_embeddings)

    def read(name: str, shape: tuple, rope_heads: int | None = None) -> torch.Tensor:
        tensor = checkpoint.get(name, shape)
        tensor = dequantize_ggml(tensor) if isinstance(tensor, GGMLTensor) else tensor.float()
        return unpermute_rope_rows(tensor, rope_heads) if gguf and rope_heads else tensor

    kind = checkpoint.kind
    ends = checkpoint_names(MODEL_NAMES, kind)
    vocab = (c.vocab_size, c.hidden_size)
    state = {"embed_tokens.weight": read(ends["embedding"], vocab), "norm.weight": read(ends["norm"], (c.hidden_size,))}
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = read(ends["head"], vocab)
    shapes = decoder_layer_shapes(c)
    for i in range(c.num_layers):
        ours = checkpoint_names(DECODER_LAYER_NAMES, "safetensors", i)  # Hugging Face's names: ours with "model."
        for key, name in checkpoint_names(DECODER_LAYER_NAMES, kind, i).items():
            heads = {"q": c.num_heads, "k": c.num_kv_heads}.get(key)
            state[ours[key].removeprefix("model.")] = read(name, shapes[key], heads)
    return shape, state, tokenizer
