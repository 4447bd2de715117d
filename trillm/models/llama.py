"""LLaMA 2 and LLaMA 3 (Touvron et al., 2023; Grattafiori et al., 2024) and their derivatives (SmolLM2...).

A pre-norm decoder (models/layers.py: Block, Transformer): x + attention(norm(x)), then x + mlp(norm(x)),
with grouped-query attention over rotary positions and a SwiGLU MLP. Numerics follow transformers'
LlamaForCausalLM (models/llama/modeling_llama.py) in float32. Reads Hugging Face folders
(`LlamaForCausalLM`) and GGUF files (`general.architecture = llama`); linear layers come from the weights
factory, which multiplies straight from the stored format (dense, or GGML blocks, or ternary codes where
config.json's quantization_config says the projections were trained to 1.58 bits: BitLinears as BitNet's,
see models/loading.py: TernaryStorage; the head stays as stored).
"""

from dataclasses import dataclass

import torch
from torch import nn

from trillm.checkpoint.fields import Fields
from trillm.errors import CheckpointError
from trillm.models.layers import Block, DecoderConfig, RMSNorm, Transformer, self_attention, swiglu
from trillm.models.loading import (
    DECODER_LAYER_NAMES,
    TernaryStorage,
    check_packed_shapes,
    decoder_layer_shapes,
    load_ends,
    load_layers,
    read_ternary,
    read_tensor,
    rope_frequencies,
    ternary_storage,
)
from trillm.weights import make_linear
from trillm.weights.huge_pages import weights_copied


@dataclass
class LlamaConfig(DecoderConfig):
    """LLaMA's hyperparameters, from config.json or from GGUF metadata, checked."""

    ternary: TernaryStorage | None = None  # the projections' storage where they are BitLinears

    @classmethod
    def from_hf(cls, config: dict, source="config.json") -> "LlamaConfig":
        fields = Fields(config, source)
        if fields.text("hidden_act", "silu") != "silu":
            raise fields.fail("hidden_act", "'silu' (LLaMA's activation)", fields.get("hidden_act"))
        for bias in ("attention_bias", "mlp_bias"):
            if fields.flag(bias, False):
                raise CheckpointError(f"{source}: LLaMA variants with attention/MLP biases are not supported")
        # transformers' LlamaConfig defaults for what a config.json may leave out.
        defaults = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096)
        config = cls(**DecoderConfig.hf_fields(fields, defaults), ternary=ternary_storage(fields, source))
        config.check(source)
        return config

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: list[str], source="GGUF file") -> "LlamaConfig":
        config = cls(**DecoderConfig.gguf_fields(Fields(metadata, source), tensor_names))
        config.check(source)
        return config

    def check(self, source):
        super().check(source)
        check_packed_shapes(self, self.ternary, source)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; q, k and v come from one fused projection."""

    def __init__(self, config: LlamaConfig, q, k, v, o, int8_activations: bool):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = make_linear([q, k, v], int8_activations=int8_activations)
        self.o_proj = make_linear(o, int8_activations=int8_activations)

    def forward(self, x, rope, cache, layer: int, start: int):
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, -1, self.head_dim)  # heads, then kv heads for k, then for v
        return self.o_proj(self_attention(qkv, rope, cache, layer, start, self.num_heads))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, gate, up, down, int8_activations: bool):
        super().__init__()
        self.gate_up_proj = make_linear([gate, up], int8_activations=int8_activations)
        self.down_proj = make_linear(down, int8_activations=int8_activations)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_up_proj(x)))


def llama_block(config: LlamaConfig, w: dict, int8_activations: bool) -> Block:
    eps = config.rms_norm_eps
    return Block(attention_norm=RMSNorm(w["attention_norm"], eps),
                 attention=Attention(config, w["q"], w["k"], w["v"], w["o"], int8_activations),
                 mlp_norm=RMSNorm(w["mlp_norm"], eps),
                 mlp=MLP(w["gate"], w["up"], w["down"], int8_activations))


# ---- Loading: the config, every tensor's shape checked, GGUF's q/k row order ---------------------------

# The activations of the linear layers: float32 (the default, exact: transformers' logits) or int8, each
# matmul's activations quantized per 32 (per 256 for the K types) as llama.cpp does, for weights in GGML
# blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; weights/ggml.py), dense ones keeping float32.
ACTIVATIONS = ("float32", "int8")


def load_llama(checkpoint, head: str | None = None, activations: str = "float32") -> Transformer:
    """Build the model from an HF folder or a GGUF file, checking every tensor's shape.

    `head`: None keeps the output head as stored; "bf16", "q8_0" or "q6_k" re-store a dense head (see
    weights/head.py); a head in GGML blocks stays as the file has it. `activations`: see ACTIVATIONS.
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r} (choose from {', '.join(ACTIVATIONS)})")
    int8 = activations == "int8"
    gguf = checkpoint.kind == "gguf"
    if gguf:
        config = LlamaConfig.from_gguf(checkpoint.metadata, checkpoint.names(), checkpoint.path)
    else:
        config = LlamaConfig.from_hf(checkpoint.config, checkpoint.path / "config.json")

    def read(key: str, name: str, shape: tuple):
        if config.ternary is not None and len(shape) == 2:
            return read_ternary(checkpoint, name, shape, config.ternary)
        tensor = read_tensor(checkpoint, name, shape)
        if gguf and key in ("q", "k"):
            return unpermute_rope_rows(tensor, config.num_heads if key == "q" else config.num_kv_heads)
        return tensor

    blocks = load_layers(checkpoint, config, DECODER_LAYER_NAMES, decoder_layer_shapes(config), read,
                         lambda tensors, layer: llama_block(config, tensors, int8),
                         copied=("q", "k", "v", "o", "gate", "up", "down") if config.ternary or weights_copied()
                         else ("q", "k", "v", "gate", "up"))
    embedding, output_head, norm = load_ends(checkpoint, config, head, int8)
    return Transformer(config, embedding, blocks, norm, output_head, rope_frequencies(checkpoint, config))


def unpermute_rope_rows(weight, num_heads: int):
    """GGUF stores q/k rows in Meta's interleaved-pair order; put them back in Hugging Face's halves order."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    within_head = torch.arange(head_dim).view(head_dim // 2, 2).t().reshape(-1)
    order = (torch.arange(num_heads)[:, None] * head_dim + within_head).reshape(-1)
    if isinstance(weight, torch.Tensor):
        return weight[order]
    return type(weight)(weight.type, weight.data[order], weight.shape)
