"""LLaMA 2 and LLaMA 3 (Touvron et al., 2023; Grattafiori et al., 2024) and their derivatives (SmolLM2...).

A pre-norm decoder built from the shared blocks of models/layers.py: RMSNorm, grouped-query attention
with rotary positions, RMSNorm, SwiGLU MLP.
Reads Hugging Face folders (`LlamaForCausalLM`) and GGUF files (`general.architecture = llama`);
the checkpoint-name maps for both are at the bottom of this file. Linear layers come from the weights
factory, which multiplies straight from the stored format (dense, or GGML blocks).
"""

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trillm.errors import CheckpointError
from trillm.models.layers import (
    Attention,
    Block,
    DecoderConfig,
    GatedFeedForward,
    RMSNorm,
    Transformer,
    make_output_head,
    rope_inverse_frequencies,
    rope_settings_from_hf,
)
from trillm.weights import concat_rows, make_embedding


class LlamaConfig(DecoderConfig):
    """LLaMA's hyperparameters, from config.json or from GGUF metadata."""

    @classmethod
    def from_hf(cls, config: dict) -> "LlamaConfig":
        rope_theta, rope_scaling = rope_settings_from_hf(config, default_theta=10000.0)
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: list[str]) -> "LlamaConfig":
        return cls(**DecoderConfig.gguf_fields(metadata, tensor_names))


def llama_block(config: LlamaConfig, weights: dict) -> Block:
    """RMSNorm, grouped-query attention with RoPE, RMSNorm, SwiGLU: silu(gate(x)) * up(x) -> down."""
    return Block(
        attention_norm=RMSNorm(weights["attention_norm"], config.rms_norm_eps),
        attention=Attention(config.num_heads, config.num_kv_heads, config.head_dim, weights["qkv"], weights["output"]),
        ffn_norm=RMSNorm(weights["ffn_norm"], config.rms_norm_eps),
        ffn=GatedFeedForward(weights["gate_up"], weights["down"], activation=F.silu),
    )


# ---- Loading: checkpoint names, expected shapes, fusion of q/k/v and gate/up --------------------------

def hf_layer_names(i: int) -> dict:
    prefix = f"model.layers.{i}"
    return {
        "attention_norm": f"{prefix}.input_layernorm.weight",
        "q": f"{prefix}.self_attn.q_proj.weight",
        "k": f"{prefix}.self_attn.k_proj.weight",
        "v": f"{prefix}.self_attn.v_proj.weight",
        "output": f"{prefix}.self_attn.o_proj.weight",
        "ffn_norm": f"{prefix}.post_attention_layernorm.weight",
        "gate": f"{prefix}.mlp.gate_proj.weight",
        "up": f"{prefix}.mlp.up_proj.weight",
        "down": f"{prefix}.mlp.down_proj.weight",
    }


HF_NAMES = {"embedding": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}


def gguf_layer_names(i: int) -> dict:
    prefix = f"blk.{i}"
    return {
        "attention_norm": f"{prefix}.attn_norm.weight",
        "q": f"{prefix}.attn_q.weight",
        "k": f"{prefix}.attn_k.weight",
        "v": f"{prefix}.attn_v.weight",
        "output": f"{prefix}.attn_output.weight",
        "ffn_norm": f"{prefix}.ffn_norm.weight",
        "gate": f"{prefix}.ffn_gate.weight",
        "up": f"{prefix}.ffn_up.weight",
        "down": f"{prefix}.ffn_down.weight",
    }


GGUF_NAMES = {"embedding": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight"}


def expected_layer_shapes(c: LlamaConfig) -> dict:
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "attention_norm": (c.hidden_size,),
        "q": (q_rows, c.hidden_size),
        "k": (kv_rows, c.hidden_size),
        "v": (kv_rows, c.hidden_size),
        "output": (c.hidden_size, q_rows),
        "ffn_norm": (c.hidden_size,),
        "gate": (c.intermediate_size, c.hidden_size),
        "up": (c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }


def unpermute_rope_rows(weight, num_heads: int):
    """GGUF stores q/k rows in Meta's interleaved-pair order; put them back in Hugging Face's halves order."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    within_head = torch.arange(head_dim).view(head_dim // 2, 2).t().reshape(-1)
    order = (torch.arange(num_heads)[:, None] * head_dim + within_head).reshape(-1)
    if isinstance(weight, torch.Tensor):
        return weight[order]
    return type(weight)(weight.type, weight.data[order], weight.shape)


def load_llama(checkpoint, head: str | None = None) -> Transformer:
    """Build the model from an HF folder or a GGUF file, checking every tensor's shape.

    `head`: None keeps the output head as stored; "bf16" or "q8_0" re-store a dense head (see
    `make_output_head`); a head in GGML blocks stays as the file has it.
    """
    if checkpoint.kind == "gguf":
        config = LlamaConfig.from_gguf(checkpoint.metadata, checkpoint.names())
        names, layer_names = GGUF_NAMES, gguf_layer_names
    else:
        check_supported(checkpoint.config)
        config = LlamaConfig.from_hf(checkpoint.config)
        names, layer_names = HF_NAMES, hf_layer_names
    shapes = expected_layer_shapes(config)
    vocab_shape = (config.vocab_size, config.hidden_size)

    embedding_weight = checkpoint.get(names["embedding"], vocab_shape)
    embedding = make_embedding(embedding_weight)
    tied = config.tie_word_embeddings or names["head"] not in checkpoint.names()
    head = make_output_head(embedding_weight if tied else checkpoint.get(names["head"], vocab_shape), head)
    norm = RMSNorm(checkpoint.get(names["norm"], (config.hidden_size,)), config.rms_norm_eps)

    blocks = []
    for i in tqdm(range(config.num_layers), desc="loading", unit="layer", leave=False, disable=None):
        stored = {key: checkpoint.get(name, shapes[key]) for key, name in layer_names(i).items()}
        if checkpoint.kind == "gguf":
            stored["q"] = unpermute_rope_rows(stored["q"], config.num_heads)
            stored["k"] = unpermute_rope_rows(stored["k"], config.num_kv_heads)
        stored["qkv"] = concat_rows([stored["q"], stored["k"], stored["v"]])
        stored["gate_up"] = concat_rows([stored["gate"], stored["up"]])
        blocks.append(llama_block(config, stored))
        for key in ("q", "k", "v", "gate", "up"):  # the model keeps its fused copies, not these
            checkpoint.release(layer_names(i)[key])

    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    if checkpoint.kind == "gguf" and "rope_freqs.weight" in checkpoint.names():
        # llama.cpp stores Llama 3.1's frequency scaling as per-pair divisors.
        inv_freq = inv_freq / checkpoint.get("rope_freqs.weight", (config.head_dim // 2,)).float()
    return Transformer(config, embedding, blocks, norm, head, inv_freq)


def check_supported(config: dict):
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported activation {config['hidden_act']!r} (LLaMA uses silu)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError("LLaMA variants with attention/MLP biases are not supported")
