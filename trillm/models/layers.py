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

import torch
import torch.nn.functional as F
from torch import nn

from trillm.weights import GGMLTensor, make_linear, native
from trillm.weights.ggml import Q8_0_BLOCK_SIZE, quantize_q8_0

log = logging.getLogger("trillm")


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


def attention_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over all cached positions, the decode step's case: one native call
    (csrc/layers.c) where scaled_dot_product_attention, its reference twin, costs several times more.

    q: (B, heads, 1, head_dim); k, v: (B, kv_heads, length, head_dim) views into the cache, positions
    contiguous within each head.
    """
    kernel = native.load()
    batch, heads, _, head_dim = q.shape
    if kernel is None or k.stride() != v.stride() or k.stride(2) != head_dim or k.stride(3) != 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != k.shape[1])
    q = q.contiguous()
    out = torch.empty_like(q)
    kernel.trillm_attention_one_token(q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, heads, k.shape[1], head_dim,
                                      k.shape[2], k.stride(0), k.stride(1), head_dim ** -0.5, out.data_ptr())
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Scaled dot-product attention of queries at positions start.. over keys 0..; GQA by head groups.

    q: (B, heads, T, head_dim); k, v: (B, kv_heads, start + T, head_dim).
    """
    query_length, key_length = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if query_length == 1:
        return attention_one_token(q, k, v)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Queries continue a cached sequence: query i sees keys up to start + i.
    mask = torch.ones(query_length, key_length, dtype=torch.bool).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


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
        # q and k rotate together: one RoPE call over their heads.
        qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)
        q = qk[:, :, :heads].transpose(1, 2)  # (B, heads, T, head_dim)
        k = qk[:, :, heads:].transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        out = causal_attention(q, k, v, start).transpose(1, 2).reshape(batch, length, heads * head_dim)
        if self.output_norm is not None:
            out = self.output_norm(out)
        return self.output(out)


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
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        hidden = self.activation(gate) * up
        if self.inner_norm is not None:
            hidden = self.inner_norm(hidden)
        return self.down(hidden)


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

HEAD_FORMATS = ("bf16", "q8_0")


def make_output_head(weight: torch.Tensor | GGMLTensor, head_format: str | None = None) -> nn.Module:
    """The output projection (vocab, dim), re-stored in `head_format` when the weight is dense:

    - None: as stored;
    - "bf16": in bfloat16, unchanged (no copy) when stored so, as BitNet's tied embedding is;
    - "q8_0": GGML Q8_0 blocks (8.5 bits a weight, 47% fewer bytes than bf16: a decode step reads the whole
      head), quantized here as llama.cpp's quantizer would. Rows whose length is not a multiple of 32
      cannot be cut in Q8_0 blocks: that head stays as stored, with a warning.

    A head stored in GGML blocks (a GGUF file) stays as its file chose.
    """
    if head_format not in (None, *HEAD_FORMATS):
        raise ValueError(f"unknown output head format {head_format!r} (choose from {', '.join(HEAD_FORMATS)})")
    if head_format is None or isinstance(weight, GGMLTensor):
        return make_linear(weight)
    if head_format == "q8_0":
        if weight.shape[1] % Q8_0_BLOCK_SIZE == 0:
            return make_linear(quantize_q8_0(weight))
        log.warning("trillm: the output head has %d columns, not a multiple of %d: kept in %s, not Q8_0",
                    weight.shape[1], Q8_0_BLOCK_SIZE, weight.dtype)
        return make_linear(weight)
    return make_linear(weight.to(torch.bfloat16))
