"""gpt-oss (OpenAI, 2025, "gpt-oss-120b & gpt-oss-20b Model Card"), from its MXFP4 release.

A pre-norm decoder (models/layers.py: Block, Transformer) whose MLP is a mixture of experts:
- attention: grouped-query (64 query, 8 KV heads in both sizes) with biases on q, k, v and o; a learned
  sink logit per head in the softmax's denominator; a 128-token sliding window on every other layer
  (config.json's layer_types); rotary positions with YaRN scaling (32x of a 4096-token original context)
  and its attention factor;
- MLP: a router (a linear layer with bias) picks 4 of 32 (20b) or 128 (120b) experts a token, weighted by a
  softmax over the chosen logits; an expert is gate and up projections, a clamped SwiGLU
  ((up + 1) * gate * sigmoid(1.702 gate), gate at most 7, up within ±7), and a down projection, all with
  biases, its weights MXFP4 (weights/mxfp4.py), multiplied as stored.
Numerics follow transformers' GptOssForCausalLM (models/gpt_oss/modeling_gpt_oss.py, eager attention) in
float32. Reads the Hugging Face release (`GptOssForCausalLM`) and GGUF files of llama.cpp's `gpt-oss`
architecture; the name maps of both are in the loading part below.
"""

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from trillm.checkpoint.fields import Fields
from trillm.errors import CheckpointError, TrillmError
from trillm.models.layers import (
    Block,
    DecoderConfig,
    RMSNorm,
    Transformer,
    mixture_of_experts,
    self_attention,
    yarn_mscale,
)
from trillm.models.loading import load_ends, load_layers, read_norm, rope_frequencies
from trillm.native import ops
from trillm.native.build import load
from trillm.weights import GGMLTensor, MXFP4Tensor, make_experts, make_linear
from trillm.weights.head import restore_dense
from trillm.weights.huge_pages import weights_copied
from trillm.weights.mxfp4 import check_activations, has_bf16_kernel


@dataclass
class GptOssConfig(DecoderConfig):
    num_experts: int = 32
    experts_per_token: int = 4
    sliding_window: int = 128
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it attend over the sliding window only?
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    chat_format: ClassVar[str] = "harmony"

    @classmethod
    def from_hf(cls, config: dict, source="config.json") -> "GptOssConfig":
        """From config.json; a missing key takes transformers' GptOssConfig default."""
        fields = Fields(config, source)
        if fields.table("quantization_config").get("quant_method", None) != "mxfp4":
            raise CheckpointError(f"{source}: trillm reads gpt-oss with its experts in MXFP4, as released "
                                  f"(quantization_config quant_method 'mxfp4')")
        if not fields.flag("attention_bias", True):
            raise fields.fail("attention_bias", "true (gpt-oss's projections have biases)", False)
        defaults = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=150000.0,
                        max_position_embeddings=131072)  # transformers' GptOssConfig's
        shape = DecoderConfig.hf_fields(fields, defaults)
        layer_count = shape["num_layers"]
        types = fields.get("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(layer_count)])
        if not isinstance(types, list) or len(types) != layer_count or \
                not set(types) <= {"sliding_attention", "full_attention"}:
            raise fields.fail("layer_types", f"a list of {layer_count} 'sliding_attention' or 'full_attention'", types)
        config = cls(**shape,
                     num_experts=fields.integer("num_local_experts", 128),
                     experts_per_token=fields.integer("num_experts_per_tok", fields.integer("experts_per_token", 4)),
                     sliding_window=fields.integer("sliding_window", 128),
                     sliding_layers=tuple(kind == "sliding_attention" for kind in types),
                     swiglu_alpha=fields.number("swiglu_alpha", 1.702),
                     swiglu_limit=fields.number("swiglu_limit", 7.0))
        config.check(source)
        return config

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: list[str], source="GGUF file") -> "GptOssConfig":
        """From llama.cpp's `gpt-oss` metadata: its sliding window on the even layers, as llama.cpp reads it."""
        fields = Fields(metadata, source)
        shape = DecoderConfig.gguf_fields(fields, tensor_names)
        if fields.text("gpt-oss.rope.scaling.type", "yarn") != "yarn":
            raise fields.fail("gpt-oss.rope.scaling.type", "'yarn'", fields.get("gpt-oss.rope.scaling.type"))
        factor = fields.number("gpt-oss.rope.scaling.factor", 32.0)
        shape["rope_scaling"] = {
            "rope_type": "yarn", "factor": factor,
            "beta_fast": fields.number("gpt-oss.rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": fields.number("gpt-oss.rope.scaling.yarn_beta_slow", 1.0),
            "truncate": False,  # the release's config says so; GGUF has no key for it
            "original_max_position_embeddings": fields.integer("gpt-oss.rope.scaling.original_context_length", 4096),
            "attention_factor": fields.number("gpt-oss.rope.scaling.yarn_attn_factor", yarn_mscale(factor)),
        }
        shape["intermediate_size"] = fields.integer("gpt-oss.expert_feed_forward_length", shape["intermediate_size"])
        config = cls(**shape,
                     num_experts=fields.integer("gpt-oss.expert_count"),
                     experts_per_token=fields.integer("gpt-oss.expert_used_count"),
                     sliding_window=fields.integer("gpt-oss.attention.sliding_window", 128),
                     sliding_layers=tuple(i % 2 == 0 for i in range(shape["num_layers"])))
        config.check(source)
        return config

    def check(self, source):
        super().check(source)
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise CheckpointError(f"{source}: {self.experts_per_token} experts per token of {self.num_experts}")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            raise CheckpointError(f"{source}: MXFP4 experts need hidden and intermediate sizes in blocks of 32, "
                                  f"not {self.hidden_size} and {self.intermediate_size}")

    @property
    def windows(self) -> list[int | None]:
        return [self.sliding_window if sliding else None for sliding in self.sliding_layers]



class Attention(nn.Module):
    """Grouped-query attention with biases, a sink logit per head, and on sliding layers a window of the
    last `window` positions (whose cache is a ring of that many slots). With `prompt_bf16` a prompt's
    projections multiply in bfloat16 (weights/linear.py: prompt_linear)."""

    def __init__(self, config: GptOssConfig, w: dict, window: int | None, prompt_bf16: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.window = config.num_heads, config.head_dim, window
        self.qkv_proj = make_linear([w["q"], w["k"], w["v"]],
                                    torch.cat([w["q_bias"], w["k_bias"], w["v_bias"]]).float(), prompt_bf16=prompt_bf16)
        self.o_proj = make_linear(w["o"], w["o_bias"].float(), prompt_bf16=prompt_bf16)
        self.sinks = w["sinks"].float().contiguous()

    def forward(self, x, rope, cache, layer: int, start: int):
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, -1, self.head_dim)
        return self.o_proj(self_attention(qkv, rope, cache, layer, start, self.num_heads, self.sinks, self.window))


class MLP(nn.Module):
    """The mixture of experts: a router picks experts_per_token experts a token; each expert is
    down(clamped_swiglu(gate(x), up(x))), gate and up one projection whose even outputs are the gate's and
    odd ones the up's (the release's order), every projection with a bias. The clamped SwiGLU is
    (up + 1) * gate * sigmoid(alpha * gate), the gate clamped from above and up on both sides at `limit`
    (ops.reference_clamped_swiglu)."""

    def __init__(self, config: GptOssConfig, w: dict, activations: tuple[str, str]):
        super().__init__()
        self.experts_per_token = config.experts_per_token
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.router = make_linear(w["router"], w["router_bias"].float())
        k = config.experts_per_token
        self.gate_up_proj = make_experts(w["gate_up"], w["gate_up_bias"], k, *activations)
        self.down_proj = make_experts(w["down"], w["down_bias"], k, *activations)

    def experts(self, x: torch.Tensor, groups: torch.Tensor, decoding: bool) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, groups, decoding)
        return self.down_proj(ops.clamped_swiglu(gate_up, self.alpha, self.limit), groups, decoding)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        decoding = x.shape[1] == 1  # one new token a sequence: a decode step, however many sequences
        return mixture_of_experts(tokens, self.router(tokens), self.experts_per_token,
                                  functools.partial(self.experts, decoding=decoding)).view(x.shape)


def gpt_oss_block(config: GptOssConfig, w: dict, layer: int, activations: tuple[str, str]) -> Block:
    eps = config.rms_norm_eps
    return Block(attention_norm=RMSNorm(w["attention_norm"], eps),
                 attention=Attention(config, w, config.windows[layer], prompt_bf16=activations[1] == "bf16"),
                 mlp_norm=RMSNorm(w["mlp_norm"], eps),
                 mlp=MLP(config, w, activations))


# ---- Loading: the release's names and MXFP4 blocks, and llama.cpp's ------------------------------------------
#
# The release (openai/gpt-oss-20b, -120b) stores each layer's experts as one bank per projection, its gate
# and up rows interleaved (even rows gate, odd rows up): `*_blocks` uint8 [E, rows, cols / 32, 16] with
# `*_scales` uint8 [E, rows, cols / 32], biases bf16 [E, rows]. llama.cpp's converter (conversion/gpt_oss.py)
# splits gate and up into their own ggml MXFP4 tensors, `blk.N.ffn_{gate,up,down}_exps.weight` [E, rows, cols]
# in 17-byte blocks, with their biases, and names the sinks `blk.N.attn_sinks.weight`; q and k rows stay in
# the release's order (its rope is NEOX-style, halves). The release's gate/up bank is read whole (a view of
# the file), llama.cpp's two banks as their rows interleaved (weights: make_experts), without a copy either way.

LAYER_NAMES = {  # our key -> (Hugging Face name, GGUF name); None where the layout has no such tensor
    "attention_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    **{f"{p}{suffix}": (f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"blk.{{i}}.attn_{g}.{kind}")
       for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
       for suffix, kind in (("", "weight"), ("_bias", "bias"))},
    "sinks": ("model.layers.{i}.self_attn.sinks", "blk.{i}.attn_sinks.weight"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    "router": ("model.layers.{i}.mlp.router.weight", "blk.{i}.ffn_gate_inp.weight"),
    "router_bias": ("model.layers.{i}.mlp.router.bias", "blk.{i}.ffn_gate_inp.bias"),
    "gate_up_blocks": ("model.layers.{i}.mlp.experts.gate_up_proj_blocks", None),
    "gate_up_scales": ("model.layers.{i}.mlp.experts.gate_up_proj_scales", None),
    "gate_up_bias": ("model.layers.{i}.mlp.experts.gate_up_proj_bias", None),
    "down_blocks": ("model.layers.{i}.mlp.experts.down_proj_blocks", None),
    "down_scales": ("model.layers.{i}.mlp.experts.down_proj_scales", None),
    "down_bias": ("model.layers.{i}.mlp.experts.down_proj_bias", "blk.{i}.ffn_down_exps.bias"),
    "gate": (None, "blk.{i}.ffn_gate_exps.weight"),
    "gate_bias": (None, "blk.{i}.ffn_gate_exps.bias"),
    "up": (None, "blk.{i}.ffn_up_exps.weight"),
    "up_bias": (None, "blk.{i}.ffn_up_exps.bias"),
    "down": (None, "blk.{i}.ffn_down_exps.weight"),
}


def layer_shapes(c: GptOssConfig) -> dict:
    q_rows, kv_rows, hidden, inner, experts = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, \
        c.hidden_size, c.intermediate_size, c.num_experts
    return {
        "attention_norm": (hidden,), "mlp_norm": (hidden,), "sinks": (c.num_heads,),
        "q": (q_rows, hidden), "k": (kv_rows, hidden), "v": (kv_rows, hidden), "o": (hidden, q_rows),
        "q_bias": (q_rows,), "k_bias": (kv_rows,), "v_bias": (kv_rows,), "o_bias": (hidden,),
        "router": (experts, hidden), "router_bias": (experts,),
        "gate_up_blocks": (experts, 2 * inner, hidden // 32, 16), "gate_up_scales": (experts, 2 * inner, hidden // 32),
        "gate_up_bias": (experts, 2 * inner),
        "down_blocks": (experts, hidden, inner // 32, 16), "down_scales": (experts, hidden, inner // 32),
        "down_bias": (experts, hidden),
        "gate": (experts, inner, hidden), "up": (experts, inner, hidden), "down": (experts, hidden, inner),
        "gate_bias": (experts, inner), "up_bias": (experts, inner),
    }


EXPERT_ACTIVATIONS = ("int8", "bf16", "float32")


def expert_activations_of(choice: str | None) -> tuple[str, str]:
    """(decode, prompt) activations of the MXFP4 experts (weights/mxfp4.py: ACTIVATIONS) for a user's choice:
    one for both, or None: int8 for decode steps, and for prompts bf16 where this CPU has it, else int8.
    Prompts in bf16 multiply the attention projections in bf16 too (Attention)."""
    if choice is not None:
        try:  # refused here, before any layer is built, in one line
            check_activations(choice, choice, native=load() is not None)
        except ValueError as error:
            raise TrillmError(f"--expert-activations: {error}") from None
        return choice, choice
    return "int8", "bf16" if has_bf16_kernel() else "int8"


def load_gpt_oss(checkpoint, head: str | None = None, dense: str | None = None,
                 expert_activations: str | None = None) -> Transformer:
    """Build gpt-oss from the release's folder or a GGUF file, checking every tensor's shape. The experts
    stay in the file's memory map, MXFP4 as stored, multiplied with `expert_activations` "int8" (as
    llama.cpp does), "bf16" (CPUs with AVX512-BF16; a prompt's attention projections in bf16 too), "float32"
    (exact, slower), or None: the fastest of these 8-bit forms for decode steps and for prompts
    (expert_activations_of); `dense` "q8_0" re-stores the attention
    projections and, unless `head` says otherwise, the output head in Q8_0 (weights/head.py)."""
    if expert_activations not in (None, *EXPERT_ACTIVATIONS):
        raise ValueError(f"unknown expert activations {expert_activations!r} (choose from {', '.join(EXPERT_ACTIVATIONS)})")
    activations = expert_activations_of(expert_activations)
    gguf = checkpoint.kind == "gguf"
    if gguf:
        config = GptOssConfig.from_gguf(checkpoint.metadata, checkpoint.names(), checkpoint.path)
    else:
        config = GptOssConfig.from_hf(checkpoint.config, checkpoint.path / "config.json")
    table = {key: names for key, names in LAYER_NAMES.items() if names[1 if gguf else 0] is not None}

    def read(key: str, name: str, shape: tuple):
        if key in ("gate", "up", "down"):  # GGUF's MXFP4 experts
            return mxfp4_from_gguf(checkpoint, name, checkpoint.get(name, shape))
        if len(shape) == 1 and key != "sinks" and not key.endswith("bias"):
            return read_norm(checkpoint, name, shape)
        if key in ("q", "k", "v", "o"):
            return restore_dense(checkpoint.get(name, shape), dense, lambda start, end: checkpoint.release(name, (start, end)))
        return checkpoint.get(name, shape)

    def make_block(w: dict, layer: int) -> Block:
        w.update(experts_from_gguf(w) if gguf else experts_from_release(w, config))
        return gpt_oss_block(config, w, layer, activations)

    blocks = load_layers(checkpoint, config, table, layer_shapes(config), read, make_block,
                         copied=("q", "k", "v", "o", "router") if weights_copied() else ("q", "k", "v"))
    embedding, output_head, norm = load_ends(checkpoint, config, head or dense)
    return Transformer(config, embedding, blocks, norm, output_head, rope_frequencies(checkpoint, config),
                       config.windows)


def experts_from_release(w: dict, config: GptOssConfig) -> dict:
    """The release's banks as MXFP4Tensors, views of the file."""
    experts, hidden, inner = config.num_experts, config.hidden_size, config.intermediate_size
    return {"gate_up": MXFP4Tensor(w["gate_up_blocks"], w["gate_up_scales"], (experts, 2 * inner, hidden)),
            "down": MXFP4Tensor(w["down_blocks"], w["down_scales"], (experts, hidden, inner))}


def experts_from_gguf(w: dict) -> dict:
    """llama.cpp's gate and up banks as one with interleaved rows, as the release has it."""
    return {"gate_up": [w["gate"], w["up"]], "gate_up_bias": torch.stack([w["gate_bias"], w["up_bias"]], -1).flatten(1)}


def mxfp4_from_gguf(checkpoint, name: str, stored) -> MXFP4Tensor:
    if not isinstance(stored, GGMLTensor) or stored.type.name != "MXFP4":
        kind = stored.type.name if isinstance(stored, GGMLTensor) else stored.dtype
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} is {kind}; trillm reads gpt-oss's experts in MXFP4")
    experts, rows, cols = stored.shape
    return MXFP4Tensor(stored.data.view(experts, rows, -1), None, stored.shape)
