"""BitNet b1.58 2B4T (Ma et al., 2025, "BitNet b1.58 2B4T Technical Report"; Ma et al., 2024, "The Era of
1-bit LLMs"; Wang et al., 2023, "BitNet").

A LLaMA 3 shaped decoder whose every projection is a BitLinear: ternary weights {-1, 0, +1} with one scale
per matrix, activations quantized to int8 per token (absmax), "W1.58A8". What differs from LLaMA:
- an RMSNorm over the attention output before o_proj, and one over the FFN's hidden state before
  down_proj: the "subln" of Magneto (Wang et al., 2023), named attn_sub_norm and ffn_sub_norm;
- squared ReLU (So et al., 2021, Primer) in place of SiLU in the gated FFN;
- the bf16 embedding is tied to the output head, by far the largest read of a decode step (see
  `load_bitnet` for the head's format).

Numerics follow transformers' BitNetForCausalLM (models/bitnet/modeling_bitnet.py) and its BitLinear
layers (integrations/bitnet.py). config.json's quantization_config says how the projections are stored,
packed or as bf16 master weights (see models/loading.py: TernaryStorage).
Either way the weights factory receives `TernaryTensor`s and multiplies straight from the 2-bit codes.
GGUF files of llama.cpp's "bitnet" architecture (TQ2_0 or TQ1_0 blocks) are repacked into the same
layout at load: see `load_bitnet_gguf`.
"""

from dataclasses import dataclass

import torch
from torch import nn

from trillm.checkpoint.fields import Fields
from trillm.errors import CheckpointError
from trillm.models.layers import Block, DecoderConfig, RMSNorm, Transformer, self_attention, swiglu
from trillm.models.loading import (
    DECODER_LAYER_NAMES,
    TERNARY_PROJECTIONS,
    TernaryStorage,
    check_packed_shapes,
    decoder_layer_shapes,
    load_ends,
    load_layers,
    read_norm,
    read_ternary,
    rope_frequencies,
    ternary_storage,
)
from trillm.native import ops
from trillm.weights import GGMLTensor, TernaryTensor, make_linear
from trillm.weights.ternary import ternary_from_gguf

# The output head's format unless the caller picks one: Q6_K reads 59% fewer bytes than bf16 per decoded
# token (Q8_0: 47%); see load_bitnet for the measured cost in logits.
DEFAULT_HEAD = "q6_k"


@dataclass
class BitNetConfig(DecoderConfig):
    ternary: TernaryStorage = TernaryStorage(packed=True, scale_divides=False)  # the release's
    hidden_act: str = "relu2"  # the FFN's activation: a key of GLU_ACTIVATIONS (2B4T's relu2; SiLU in GGUF files)

    @classmethod
    def from_hf(cls, config: dict, source="config.json") -> "BitNetConfig":
        """From config.json; a missing key takes transformers' BitNetConfig default (the 2B4T's shape)."""
        fields = Fields(config, source)
        storage = ternary_storage(fields, source)
        if storage is None:
            raise CheckpointError(f"{source}: a BitNetForCausalLM config needs a quantization_config with "
                                  f"quant_method 'bitnet' (it says how the ternary projections are stored)")
        hidden_act = fields.text("hidden_act", "relu2", choices=tuple(GLU_ACTIVATIONS))
        if fields.flag("attention_bias", False):
            raise CheckpointError(f"{source}: BitNet with attention biases is not supported")
        defaults = dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
                        num_attention_heads=20, num_key_value_heads=5, rms_norm_eps=1e-5, rope_theta=500000.0,
                        max_position_embeddings=2048)  # transformers' BitNetConfig's
        config = cls(**DecoderConfig.hf_fields(fields, defaults), ternary=storage, hidden_act=hidden_act)
        config.check(source)
        return config

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: list[str], source="GGUF file") -> "BitNetConfig":
        """From the metadata of llama.cpp's "bitnet" architecture (see the GGUF part of loading)."""
        fields = Fields(metadata, source)
        activation = fields.text("bitnet.hidden_activation", "silu", choices=tuple(GGUF_ACTIVATIONS))
        scaling = fields.text("bitnet.rope.scaling.type", "none")
        if scaling not in ("none", "linear") or fields.number("bitnet.rope.scaling.factor", 1.0) != 1.0:
            raise CheckpointError(f"{source}: RoPE scaling {scaling!r} with factor "
                                  f"{fields.get('bitnet.rope.scaling.factor', 1.0)} is not supported for BitNet")
        config = cls(**DecoderConfig.gguf_fields(fields, tensor_names),
                     # TQ blocks hold w = d * code; ternary_from_gguf turns d into the divisor
                     ternary=TernaryStorage(packed=True, scale_divides=True),
                     hidden_act=GGUF_ACTIVATIONS[activation])
        config.check(source)
        return config

    def check(self, source):
        super().check(source)
        check_packed_shapes(self, self.ternary, source)


# The gated FFN's activation, on the fused [gate | up]: 2B4T's squared ReLU, or SiLU (GGUF files of the
# 1bitLLM models, which llama.cpp runs with SiLU).
GLU_ACTIVATIONS = {"relu2": ops.squared_relu_glu, "silu": swiglu}


class Attention(nn.Module):
    """LLaMA's grouped-query attention with rotary positions, and an RMSNorm over the heads' output before
    o_proj (attn_sub_norm): o(subln(attention(x)))."""

    def __init__(self, config: BitNetConfig, q, k, v, sub_norm, o):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = make_linear([q, k, v])
        self.attn_sub_norm = RMSNorm(sub_norm, config.rms_norm_eps)
        self.o_proj = make_linear(o)

    def forward(self, x, rope, cache, layer: int, start: int):
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, -1, self.head_dim)
        return self.o_proj(self.attn_sub_norm(self_attention(qkv, rope, cache, layer, start, self.num_heads)))


class MLP(nn.Module):
    """The gated FFN with an RMSNorm before down_proj (ffn_sub_norm): down(subln(relu(gate(x))^2 * up(x)))."""

    def __init__(self, config: BitNetConfig, gate, up, sub_norm, down):
        super().__init__()
        self.gate_up_proj = make_linear([gate, up])
        self.activation = GLU_ACTIVATIONS[config.hidden_act]
        self.ffn_sub_norm = RMSNorm(sub_norm, config.rms_norm_eps)
        self.down_proj = make_linear(down)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(self.activation(self.gate_up_proj(x))))


def bitnet_block(config: BitNetConfig, w: dict) -> Block:
    eps = config.rms_norm_eps
    return Block(attention_norm=RMSNorm(w["attention_norm"], eps),
                 attention=Attention(config, w["q"], w["k"], w["v"], w["attention_sub_norm"], w["o"]),
                 mlp_norm=RMSNorm(w["mlp_norm"], eps),
                 mlp=MLP(config, w["gate"], w["up"], w["mlp_sub_norm"], w["down"]))


# ---- Loading: LLaMA's tensor names and two sub-norms; the projections' stored layouts ----------------------

LAYER_NAMES = {
    **DECODER_LAYER_NAMES,
    "attention_sub_norm": ("model.layers.{i}.self_attn.attn_sub_norm.weight", "blk.{i}.attn_sub_norm.weight"),
    "mlp_sub_norm": ("model.layers.{i}.mlp.ffn_sub_norm.weight", "blk.{i}.ffn_sub_norm.weight"),
}


def layer_shapes(c: BitNetConfig) -> dict:
    """Logical shapes (out_features, in_features) of the projections, and the norms' lengths."""
    return {**decoder_layer_shapes(c), "attention_sub_norm": (c.num_heads * c.head_dim,),
            "mlp_sub_norm": (c.intermediate_size,)}


def load_bitnet(checkpoint, head: str | None = None) -> Transformer:
    """Build BitNet from an HF folder in either layout, checking every tensor's shape and every code.

    `head` is the tied output head's format in memory: "bf16" (the stored embedding itself, exact), "q8_0"
    or "q6_k", the default (see weights/head.py). The head is the largest read of a decode step: 656 MB
    in bf16 for 2B4T, more than all 30 layers' ternary weights (497 MB); Q8_0 makes it 349 MB, Q6_K 269 MB.
    Measured on `trillm synth bitnet-b1.58-2b-4t` (random weights, 2 threads, one process):
    - decoding 34.9 tokens/s with Q6_K, 32.0 with Q8_0, 26.4 with bf16 (the head's matmul 10, 15 and 23 ms);
      peak RSS ~1150 MB with Q6_K, ~1250 MB with Q8_0;
    - against the bf16 head, logits (std 4.2) move by 0.086 rms, 0.51 at most with Q6_K (0.079 from its
      weights, 0.034 from its int8 activations); 0.022 and 0.13 with Q8_0. The greedy token is the same
      at 289 of 300 steps (teacher-forced; Q8_0: 300), all 11 where the bf16 top two were within 0.3, and
      3 of 10 prompts decode the same 32 tokens (Q8_0: 8). A random model's top two logits are often that
      close (a quarter of its steps); trained models have wider margins.
    """
    config = BitNetConfig.from_hf(checkpoint.config, checkpoint.path / "config.json")
    return load_blocks(checkpoint, config, head, lambda name, shape: read_ternary(checkpoint, name, shape, config.ternary))


def load_blocks(checkpoint, config: BitNetConfig, head: str | None, read_projection) -> Transformer:
    """The network from either kind of checkpoint, `read_projection(name, shape)` reading each BitLinear
    weight as a TernaryTensor. Every block keeps its own retiled or float copies, so the file's pages of
    all a layer's tensors are let go once it is built."""
    def read(key: str, name: str, shape: tuple):
        return read_projection(name, shape) if key in TERNARY_PROJECTIONS else read_norm(checkpoint, name, shape)

    blocks = load_layers(checkpoint, config, LAYER_NAMES, layer_shapes(config), read,
                         lambda tensors, layer: bitnet_block(config, tensors), copied=tuple(LAYER_NAMES))
    embedding, output_head, norm = load_ends(checkpoint, config, head or DEFAULT_HEAD)
    return Transformer(config, embedding, blocks, norm, output_head, rope_frequencies(checkpoint, config))


# ---- Loading a GGUF file of llama.cpp's "bitnet" architecture --------------------------------------------
#
# As llama.cpp's converter writes it (convert_hf_to_gguf.py, BitnetModel) and its graph reads it
# (src/models/bitnet.cpp): each projection is ternary values times one scale, stored as TQ2_0 or TQ1_0
# blocks whose fp16 d is that scale (F16 where a row is not whole 256-weight blocks), with no scale tensor
# beside it; q and k rows in Hugging Face's order (llama.cpp ropes bitnet in the NEOX "halves" layout, so
# the converter permutes nothing, unlike LLaMA's); norms F32; token_embd F16, also the output head. The FFN
# activation is `bitnet.hidden_activation`, SiLU when absent as in llama.cpp (the 1bitLLM bitnet_b1_58
# models'); 2B4T's squared ReLU is "relu2".

GGUF_ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "swish": "silu", "swiglu": "silu"}


def load_bitnet_gguf(checkpoint, head: str | None = None) -> Transformer:
    """Build BitNet from a GGUF file, checking every tensor's shape, code and scale. The same network as
    `load_bitnet` builds, so the same weights give the same logits from a folder or a GGUF file; `head` as
    there (a head the file stores in GGML blocks stays as stored)."""
    config = BitNetConfig.from_gguf(checkpoint.metadata, checkpoint.names(), checkpoint.path)
    return load_blocks(checkpoint, config, head, lambda name, shape: load_gguf_projection(checkpoint, name, shape))


def load_gguf_projection(checkpoint, name: str, shape: tuple[int, int]) -> TernaryTensor:
    """One projection's blocks decoded and repacked into the release layout, once."""
    stored = checkpoint.get(name, shape)
    try:
        weight = ternary_from_gguf(stored)
    except ValueError as error:
        stored_type = stored.type.name if isinstance(stored, GGMLTensor) else str(stored.dtype).removeprefix("torch.")
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} ({stored_type} {list(shape)}): {error}") from None
    if not torch.isfinite(weight.scale).all() or (weight.scale == 0).any():  # the divisors: 1 / the block scale
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r}: a block scale is NaN or infinite")
    return weight
