"""Layers the model families share: RMSNorm, rotary position embeddings, KV cache, causal attention,
the attention and gated feed-forward blocks, the pre-norm decoder stack, and its output head.

RoPE follows Su et al. (RoFormer) in the "rotate half" layout that Hugging Face checkpoints use, with
the llama3 frequency scaling of Meta's Llama 3.1 release. Numerics follow transformers' Llama modules
in float32 so that logits agree to ~1e-5. A family composes these (LLaMA: SwiGLU; BitNet: ReLU² and the
extra "subln" norms) and builds its linear layers through the weights factory.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from trillm.weights import GGMLTensor, make_linear, native
from trillm.weights.ggml import Q6_K_BLOCK_SIZE, Q8_0_BLOCK_SIZE, quantize_q6_k, quantize_q8_0

log = logging.getLogger("trillm")


@dataclass
class DecoderConfig:
    """The shape of a pre-norm decoder stack: what every family's config holds, and the cache and RoPE use."""

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

    @staticmethod
    def gguf_fields(metadata: dict, tensor_names: list[str]) -> dict:
        """These fields from GGUF metadata, under llama.cpp's keys for the file's architecture."""
        arch = metadata["general.architecture"]
        key = lambda name, default=None: metadata.get(f"{arch}.{name}", default)  # noqa: E731
        hidden, heads = key("embedding_length"), key("attention.head_count")
        return dict(
            vocab_size=key("vocab_size") or len(metadata["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=heads,
            num_kv_heads=key("attention.head_count_kv") or heads,
            head_dim=key("attention.key_length") or hidden // heads,
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=key("rope.freq_base", 10000.0),
            rope_scaling=None,  # llama.cpp stores llama3 scaling as the `rope_freqs.weight` tensor instead
            max_position_embeddings=key("context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019).

    The native kernel (csrc/layers.c) is one call where F.rms_norm, its reference twin, is six torch ops:
    it runs twice per layer per decoded token.
    """

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.eps = eps
        self.shape = (weight.shape[0],)
        self.kernel = native.load()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or x.dtype != torch.float32 or not x.is_contiguous():
            return self.reference(x)
        out = torch.empty_like(x)
        self.kernel.trillm_rms_norm(x.data_ptr(), self.weight.data_ptr(), x.numel() // self.shape[0],
                                    self.shape[0], self.eps, out.data_ptr())
        return out


def rope_settings_from_hf(config: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling) from an HF config.json: transformers 5 moves rope_theta and rope_scaling into
    `rope_parameters`; older configs have both. Scaling is None for plain RoPE."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = config.get("rope_theta") or rope.get("rope_theta", default_theta)
    return theta, None if rope_type == "default" else dict(rope, rope_type=rope_type)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotation speed of each pair of channels, (head_dim / 2,), with llama3 scaling if asked for."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
    # Llama 3.1: slow the low frequencies by `factor`, keep the high ones, blend the band between.
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original_context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelength < original_context / high_freq_factor) & ~(wavelength > original_context / low_freq_factor)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for these positions, each (T, 1, head_dim), ready for `apply_rope`.

    Channel i pairs with channel i + head_dim/2; the sine table carries the rotation's sign
    (-sin for the first half, +sin for the second) so that applying it takes four ops.
    """
    angles = torch.outer(positions.float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, T, heads, head_dim) by the position angles:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) with the sign in the table."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    torch.empty reserves address space only: memory is touched as positions fill, so a long context
    costs nothing until it is used.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_length: int):
        shape = (num_layers, batch, num_kv_heads, max_length, head_dim)
        self.keys = torch.empty(shape)
        self.values = torch.empty(shape)
        self.max_length = max_length
        self.length = 0  # positions filled (the next token goes at this position)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int):
        """Store (B, kv_heads, T, head_dim) keys/values at positions start.., return all so far."""
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Scaled dot-product attention of queries at positions start.. over keys 0..; GQA by head groups.

    q: (B, heads, T, head_dim); k, v: (B, kv_heads, start + T, head_dim).
    """
    query_length, key_length = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Queries continue a cached sequence: query i sees keys up to start + i.
    mask = torch.ones(query_length, key_length, dtype=torch.bool).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int, start: int,
           heads: int, norm: RMSNorm | None = None) -> torch.Tensor:
    """Self-attention of tokens at positions start.. from their fused projection qkv (B, T, heads + 2 kv_heads,
    head_dim): RoPE on the query and key heads, keys and values into the cache, causal attention over all
    positions so far, then `norm` over each token's heads if given. Returns (B, T, heads * head_dim)."""
    batch, length, all_heads, head_dim = qkv.shape
    kv_heads = (all_heads - heads) // 2
    # q and k rotate together: one RoPE call over their heads.
    qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)
    q = qk[:, :, :heads].transpose(1, 2)  # (B, heads, T, head_dim)
    k = qk[:, :, heads:].transpose(1, 2)  # (B, kv_heads, T, head_dim)
    v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
    if cache is not None:
        k, v = cache.update(layer, k, v, start)
    out = causal_attention(q, k, v, start).transpose(1, 2).reshape(batch, length, heads * head_dim)
    return out if norm is None else norm(out)


def attend_one_token(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
                     start: int, heads: int, norm: RMSNorm | None = None) -> torch.Tensor:
    """`attend` for one new token a sequence at position `start`, the decode step's case: one native call
    (csrc/layers.c) where `attend`, its reference twin, takes a dozen torch ops and the norm's call, and
    2-3x the time. cos and sin are rope_cos_sin's tables of that one position."""
    kernel = native.load()
    batch, _, all_heads, head_dim = qkv.shape
    keys, values = cache.keys, cache.values
    if (kernel is None or head_dim % 2 or start >= cache.max_length or qkv.dtype != torch.float32
            or not qkv.is_contiguous() or keys.dtype != torch.float32):
        return attend(qkv, cos, sin, cache, layer, start, heads, norm)
    out = torch.empty(batch, 1, heads * head_dim)
    layer_offset = layer * keys.stride(0) * keys.element_size()
    kernel.trillm_attention_one_token(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr() + layer_offset,
                                      values.data_ptr() + layer_offset, batch, heads, (all_heads - heads) // 2,
                                      head_dim, start, keys.stride(1), keys.stride(2), head_dim ** -0.5,
                                      *fused_norm(norm), out.data_ptr())
    return out


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al., 2021, Primer), BitNet's activation: transformers' "relu2"."""
    return F.relu(x).square()


def gated_activation(gate_up: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor],
                     norm: RMSNorm | None = None) -> torch.Tensor:
    """activation(gate) * up for gate_up = [gate | up] (..., 2 * dim), then `norm` if given. With squared ReLU
    one native call (csrc/layers.c) where its reference twin takes four torch ops and the norm's call, with
    the same floats as the twin (the norm's being those of its native kernel)."""
    kernel = native.load()
    dim = gate_up.shape[-1] // 2
    native_glu = activation is squared_relu and kernel is not None
    if not native_glu or gate_up.dtype != torch.float32 or not gate_up.is_contiguous():
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = activation(gate) * up
        return hidden if norm is None else norm(hidden)
    out = torch.empty(*gate_up.shape[:-1], dim)
    kernel.trillm_squared_relu_glu(gate_up.data_ptr(), out.numel() // dim, dim, *fused_norm(norm), out.data_ptr())
    return out


def fused_norm(norm: RMSNorm | None) -> tuple[int | None, float]:
    """What a native kernel takes to apply `norm` to its output: the weight's address and eps (NULL: none)."""
    return (None, 0.0) if norm is None else (norm.weight.data_ptr(), norm.eps)


# ---- Blocks: attention, gated feed-forward, the pre-norm decoder stack ---------------------------------

class Attention(nn.Module):
    """Grouped-query self-attention (Ainslie et al., 2023) with rotary positions: q, k and v come from one
    fused projection, keys and values go to the cache. `output_norm`, when given, normalizes the heads'
    output before the output projection: BitNet's "subln" (Wang et al., 2023), absent in LLaMA."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, qkv_weight, output_weight,
                 output_norm: RMSNorm | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = make_linear(qkv_weight)  # q, k and v projections fused into one matrix
        self.output_norm = output_norm
        self.output = make_linear(output_weight)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int):
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(batch, length, heads + 2 * kv_heads, head_dim)
        attention = attend_one_token if length == 1 and cache is not None else attend
        return self.output(attention(qkv, cos, sin, cache, layer, start, heads, self.output_norm))


class GatedFeedForward(nn.Module):
    """down(activation(gate(x)) * up(x)) (Shazeer, 2020), gate and up fused into one matrix: SwiGLU with
    silu; BitNet's ReLU² with squared ReLU and `inner_norm`, an RMSNorm before the down projection."""

    def __init__(self, gate_up_weight, down_weight, activation: Callable[[torch.Tensor], torch.Tensor],
                 inner_norm: RMSNorm | None = None):
        super().__init__()
        self.gate_up = make_linear(gate_up_weight)
        self.activation = activation
        self.inner_norm = inner_norm
        self.down = make_linear(down_weight)

    def forward(self, x):
        return self.down(gated_activation(self.gate_up(x), self.activation, self.inner_norm))


class Block(nn.Module):
    """A pre-norm residual block: x + attention(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, attention_norm: RMSNorm, attention: Attention, ffn_norm: RMSNorm, ffn: nn.Module):
        super().__init__()
        self.attention_norm = attention_norm
        self.attention = attention
        self.ffn_norm = ffn_norm
        self.ffn = ffn

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder-only stack: token embedding, blocks, final RMSNorm, output head.

    `config` is the family's dataclass; the cache and RoPE need its num_layers, num_kv_heads and head_dim.
    """

    def __init__(self, config, embedding, blocks: list[Block], norm: RMSNorm, head, inv_freq: torch.Tensor):
        super().__init__()
        self.config = config
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_length)

    def forward(self, input_ids: torch.LongTensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens at positions start..; with a cache, keys/values are kept."""
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + input_ids.shape[1]))
        x = self.embedding(input_ids)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, start)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))


# ---- The output head: the largest single read of a decode step when it is a tied embedding ------------

HEAD_FORMATS = ("bf16", "q8_0", "q6_k")


def make_output_head(weight: torch.Tensor | GGMLTensor, head_format: str | None = None,
                     rows_done: Callable[[int, int], None] | None = None) -> nn.Module:
    """The output projection (vocab, dim), re-stored in `head_format` when the weight is dense:

    - None: as stored;
    - "bf16": in bfloat16, unchanged (no copy) when stored so, as BitNet's tied embedding is;
    - "q8_0": GGML Q8_0 blocks (8.5 bits a weight, 47% fewer bytes than bf16: a decode step reads the whole
      head), quantized here as llama.cpp's quantizer would;
    - "q6_k": GGML Q6_K blocks (6.56 bits a weight, 59% fewer bytes than bf16; quantize_q6_k), multiplied
      with int8 activations as llama.cpp does (GGMLLinear): the float-activation Q6_K kernel is
      compute-bound at 40% of the memory's speed, the int8 one reads the head as fast as memory allows. Rows that do not split in blocks of 256 get Q8_0 instead (small test models; SmolLM2's
      576). A GGUF head stored in Q6_K (as llama.cpp's Q4_K_M files store it) gets the int8 kernel too.

    Rows that do not split in blocks of 32 stay as stored, with a warning. Otherwise a head stored in GGML
    blocks (a GGUF file) stays as its file chose. `rows_done` goes to the quantizer (see quantize_q8_0).
    """
    if head_format not in (None, *HEAD_FORMATS):
        raise ValueError(f"unknown output head format {head_format!r} (choose from {', '.join(HEAD_FORMATS)})")
    if isinstance(weight, GGMLTensor):
        int8_activations = head_format == "q6_k" and weight.type == GGMLQuantizationType.Q6_K
        return make_linear(weight, int8_activations=int8_activations)
    if head_format == "q6_k" and weight.shape[1] % Q6_K_BLOCK_SIZE == 0:
        return make_linear(quantize_q6_k(weight, rows_done), int8_activations=True)
    if head_format in ("q6_k", "q8_0"):
        if weight.shape[1] % Q8_0_BLOCK_SIZE == 0:
            return make_linear(quantize_q8_0(weight, rows_done))
        log.warning("trillm: the output head has %d columns, not a multiple of %d: kept in %s, not %s",
                    weight.shape[1], Q8_0_BLOCK_SIZE, weight.dtype, head_format.upper())
    if head_format == "bf16":
        return make_linear(weight.to(torch.bfloat16))
    return make_linear(weight)
