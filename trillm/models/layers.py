"""Layers the model families share: RMSNorm, rotary position embeddings, KV cache, causal attention.

RoPE follows Su et al. (RoFormer) in the "rotate half" layout that Hugging Face checkpoints use, with
the llama3 frequency scaling of Meta's Llama 3.1 release. Numerics follow transformers' Llama modules
in float32 so that logits agree to ~1e-5.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trillm.weights import native


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
