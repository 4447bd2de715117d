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
layers (integrations/bitnet.py). config.json's quantization_config says how the projections are stored:
- packed, "quantization_mode": "offline" (the release, microsoft/bitnet-b1.58-2B-4T): uint8
  [out/4, in], four 2-bit codes a byte, and a bf16 `weight_scale` [1] beside each weight. With
  "linear_class": "autobitlinear" (the release's) transformers multiplies the output by weight_scale;
  with "bitlinear" it divides by it.
- dense, "autobitlinear" + "online" (the bf16 master weights, microsoft/bitnet-b1.58-2B-4T-bf16): bf16
  [out, in], which transformers ternarizes by absmean on every forward; here once, at load.
Either way the weights factory receives `TernaryTensor`s and multiplies straight from the 2-bit codes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trillm.errors import CheckpointError
from trillm.models.layers import (
    Attention,
    Block,
    GatedFeedForward,
    RMSNorm,
    Transformer,
    make_output_head,
    rope_inverse_frequencies,
    rope_settings_from_hf,
)
from trillm.weights import concat_rows, make_embedding
from trillm.weights.ternary import TernaryTensor, check_ternary_codes, ternarize_absmean

# Ternary codes per stored byte of a packed projection (rows r, r + R, r + 2R, r + 3R share byte row r).
CODES_PER_BYTE = 4

# The output head's format unless the caller picks one: Q8_0 reads 47% fewer bytes than bf16 per decoded
# token; see load_bitnet for the measured cost in logits.
DEFAULT_HEAD = "q8_0"


@dataclass
class BitNetConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    packed: bool  # uint8 codes + weight_scale ("offline"); False: dense master weights ("online")
    scale_divides: bool  # linear_class "bitlinear": y / weight_scale; "autobitlinear": y * weight_scale

    @classmethod
    def from_hf(cls, config: dict) -> "BitNetConfig":
        """From config.json; a missing key takes transformers' BitNetConfig default (the 2B4T's shape)."""
        quantization = config["quantization_config"]
        linear_class = quantization.get("linear_class", "bitlinear")
        online = linear_class == "autobitlinear" and quantization.get("quantization_mode", "offline") == "online"
        rope_theta, rope_scaling = rope_settings_from_hf(config, default_theta=500000.0)
        hidden, heads = config.get("hidden_size", 2560), config.get("num_attention_heads", 20)
        kv_heads = config.get("num_key_value_heads", 5)  # transformers' default, even with other head counts
        return cls(
            vocab_size=config.get("vocab_size", 128256),
            hidden_size=hidden,
            intermediate_size=config.get("intermediate_size", 6912),
            num_layers=config.get("num_hidden_layers", 30),
            num_heads=heads,
            num_kv_heads=kv_heads or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            packed=not online,
            scale_divides=linear_class == "bitlinear",
        )


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, transformers' "relu2"."""
    return F.relu(x).square()


def bitnet_block(config: BitNetConfig, weights: dict) -> Block:
    """RMSNorm, attention with RoPE and a sub-norm before o_proj, RMSNorm, ReLU² GLU with a sub-norm:
    x + o(subln(attention(norm(x)))), then x + down(subln(relu(gate(x))^2 * up(x)))."""
    eps = config.rms_norm_eps
    return Block(
        attention_norm=RMSNorm(weights["attention_norm"], eps),
        attention=Attention(config.num_heads, config.num_kv_heads, config.head_dim, weights["qkv"], weights["output"],
                            output_norm=RMSNorm(weights["attention_sub_norm"], eps)),
        ffn_norm=RMSNorm(weights["ffn_norm"], eps),
        ffn=GatedFeedForward(weights["gate_up"], weights["down"], activation=squared_relu,
                             inner_norm=RMSNorm(weights["ffn_sub_norm"], eps)),
    )


# ---- Loading: checkpoint names, expected shapes, the two stored layouts of the projections --------------

NAMES = {"embedding": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}

PROJECTIONS = ("q", "k", "v", "output", "gate", "up", "down")


def layer_names(i: int) -> dict:
    prefix = f"model.layers.{i}"
    return {
        "attention_norm": f"{prefix}.input_layernorm.weight",
        "q": f"{prefix}.self_attn.q_proj.weight",
        "k": f"{prefix}.self_attn.k_proj.weight",
        "v": f"{prefix}.self_attn.v_proj.weight",
        "attention_sub_norm": f"{prefix}.self_attn.attn_sub_norm.weight",
        "output": f"{prefix}.self_attn.o_proj.weight",
        "ffn_norm": f"{prefix}.post_attention_layernorm.weight",
        "gate": f"{prefix}.mlp.gate_proj.weight",
        "up": f"{prefix}.mlp.up_proj.weight",
        "ffn_sub_norm": f"{prefix}.mlp.ffn_sub_norm.weight",
        "down": f"{prefix}.mlp.down_proj.weight",
    }


def expected_layer_shapes(c: BitNetConfig) -> dict:
    """Logical shapes (out_features, in_features) of the projections, and the norms' lengths."""
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "attention_norm": (c.hidden_size,),
        "q": (q_rows, c.hidden_size),
        "k": (kv_rows, c.hidden_size),
        "v": (kv_rows, c.hidden_size),
        "attention_sub_norm": (q_rows,),
        "output": (c.hidden_size, q_rows),
        "ffn_norm": (c.hidden_size,),
        "gate": (c.intermediate_size, c.hidden_size),
        "up": (c.intermediate_size, c.hidden_size),
        "ffn_sub_norm": (c.intermediate_size,),
        "down": (c.hidden_size, c.intermediate_size),
    }


def load_projection(checkpoint, name: str, shape: tuple[int, int], config: BitNetConfig) -> TernaryTensor:
    """One BitLinear weight as ternary codes and the scale that `y = (int8(x) @ W^T) / (act_scale * scale)`
    needs, from either layout."""
    if not config.packed:
        return ternarize_absmean(checkpoint.get(name, shape))  # as transformers' online AutoBitLinear does
    out_features, in_features = shape
    packed = checkpoint.get(name, (out_features // CODES_PER_BYTE, in_features))
    file = checkpoint.file_of(name)
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"{file}: tensor {name!r} is {packed.dtype}, expected uint8 packed ternary codes "
                              f"(config.json's quantization_config says the projections are packed)")
    try:
        check_ternary_codes(packed, name)
    except CheckpointError as error:
        raise CheckpointError(f"{file}: {error}") from None
    scale_name = f"{name}_scale"
    if scale_name not in checkpoint.names():
        raise CheckpointError(f"{file}: tensor {scale_name!r} is missing: each packed BitNet projection needs "
                              f"its weight_scale beside it")
    weight_scale = checkpoint.get(scale_name, (1,)).float()
    # autobitlinear multiplies the output by weight_scale, bitlinear divides it: fold both into a divisor.
    return TernaryTensor(packed, weight_scale if config.scale_divides else 1 / weight_scale, shape)


def load_bitnet(checkpoint, head: str | None = None) -> Transformer:
    """Build BitNet from an HF folder in either layout, checking every tensor's shape and every code.

    `head` is the tied output head's format in memory: "bf16" (the stored embedding itself, exact) or
    "q8_0", the default. The head is the largest read of a decode step: 656 MB in bf16 for 2B4T, more
    than all 30 layers' ternary weights (497 MB); Q8_0 makes it 349 MB. Measured on `trillm synth
    bitnet-b1.58-2b-4t` (random weights, 2 threads): decoding 17.6 tokens/s instead of 13.6 (the head's
    matmul 11 ms instead of 25); logits move by 0.022 rms, 0.13 at most, for logits of std 4.2; the
    greedy token is the same at 329 of 330 steps (teacher-forced), and 7 of 10 prompts decode the same
    32 tokens (a random model's top two logits are often within 0.1). Trained models have wider margins.
    """
    check_supported(checkpoint.config, checkpoint.path / "config.json")
    config = BitNetConfig.from_hf(checkpoint.config)
    check_packable(config, checkpoint.path / "config.json")
    shapes = expected_layer_shapes(config)

    embedding_weight = checkpoint.get(NAMES["embedding"], (config.vocab_size, config.hidden_size))
    embedding = make_embedding(embedding_weight)
    tied = config.tie_word_embeddings or NAMES["head"] not in checkpoint.names()
    head_weight = embedding_weight if tied else checkpoint.get(NAMES["head"], (config.vocab_size, config.hidden_size))
    output_head = make_output_head(head_weight, head or DEFAULT_HEAD)
    norm = RMSNorm(checkpoint.get(NAMES["norm"], (config.hidden_size,)), config.rms_norm_eps)

    blocks = []
    for i in tqdm(range(config.num_layers), desc="loading", unit="layer", leave=False, disable=None):
        names = layer_names(i)
        stored = {key: load_projection(checkpoint, names[key], shapes[key], config) if key in PROJECTIONS
                  else checkpoint.get(names[key], shapes[key]) for key in names}
        stored["qkv"] = concat_rows([stored["q"], stored["k"], stored["v"]])
        stored["gate_up"] = concat_rows([stored["gate"], stored["up"]])
        blocks.append(bitnet_block(config, stored))

    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return Transformer(config, embedding, blocks, norm, output_head, inv_freq)


def check_supported(config: dict, path):
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "bitnet":
        raise CheckpointError(f"{path}: a BitNetForCausalLM config needs a quantization_config with quant_method "
                              f"'bitnet' (it says how the ternary projections are stored)")
    linear_class = quantization.get("linear_class", "bitlinear")
    mode = quantization.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear") or mode not in ("offline", "online"):
        raise CheckpointError(f"{path}: unsupported BitNet quantization_config linear_class {linear_class!r}, "
                              f"quantization_mode {mode!r}")
    if quantization.get("use_rms_norm"):
        raise CheckpointError(f"{path}: BitNet with use_rms_norm (a norm inside every BitLinear) is not supported")
    if config.get("hidden_act", "relu2") != "relu2":
        raise CheckpointError(f"{path}: unsupported activation {config['hidden_act']!r} (BitNet uses relu2)")
    if config.get("attention_bias"):
        raise CheckpointError(f"{path}: BitNet with attention biases is not supported")


def check_packable(config: BitNetConfig, path):
    """Packed rows hold 4 codes: every projection's output size must be a multiple of 4."""
    if not config.packed:
        return
    shapes = expected_layer_shapes(config)
    for key in PROJECTIONS:
        out_features = shapes[key][0]
        if out_features % CODES_PER_BYTE:
            raise CheckpointError(f"{path}: packed BitNet projections need output sizes that are multiples of "
                                  f"{CODES_PER_BYTE}; {key} has {out_features}")
