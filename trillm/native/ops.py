"""Named operations of the models' math that have a native kernel (csrc/layers.c), each bound here beside
its pure-PyTorch twin `reference_<name>`, which takes the same arguments and computes the same values.

An op runs its kernel when the library is loaded (build.load()) and the inputs are ones the kernel takes
(float32, contiguous where it reads them); otherwise it runs its twin. The tests hold every op to its twin
on every instruction-set level this machine runs. Why these: each is one call where its twin is several
torch ops, and each runs once or twice per layer per decoded token.
"""

import torch
import torch.nn.functional as F

from trillm.native.build import check, load


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich, 2019)."""
    lib = load()
    if lib is None or x.dtype != torch.float32 or not x.is_contiguous() or weight.dtype != torch.float32:
        return reference_rms_norm(x, weight, eps)
    dim = weight.shape[0]
    out = torch.empty_like(x)
    lib.trillm_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // dim, dim, eps, out.data_ptr())
    return out


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (weight.shape[0],), weight, eps)


def squared_relu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    """relu(gate)^2 * up for gate_up = [gate | up] (..., 2 * dim): BitNet's gated activation (squared ReLU: So
    et al., 2021, Primer). The same floats as the twin: the kernel keeps torch's order of operations."""
    lib = load()
    if lib is None or gate_up.dtype != torch.float32 or not gate_up.is_contiguous():
        return reference_squared_relu_glu(gate_up)
    dim = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], dim)
    lib.trillm_squared_relu_glu(gate_up.data_ptr(), out.numel() // dim, dim, out.data_ptr())
    return out


def reference_squared_relu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.relu(gate).square() * up


def attend_one_token(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, position: int, num_heads: int) -> torch.Tensor:
    """Self-attention of one new token a sequence, the decode step's case, in one call.

    qkv (B, 1, heads + 2 kv_heads, head_dim) is the fused projection of the token at `position`; cos and
    sin (1, 1, head_dim) are its RoPE tables (models/layers.py: rope_cos_sin, "rotate half" pairs with the
    sign in the sine table). Rotates the query and key heads, writes the key and value into one layer's
    cache keys/values (B, kv_heads, max_length, head_dim) at `position`, and attends over positions
    0..position, query head h reading kv head h // (heads / kv_heads). Returns (B, 1, heads * head_dim).
    """
    lib = load()
    batch, _, all_heads, head_dim = qkv.shape
    kv_heads = (all_heads - num_heads) // 2
    if kv_heads < 1 or num_heads % kv_heads or 2 * kv_heads + num_heads != all_heads:
        raise ValueError(f"{num_heads} query heads and {all_heads - num_heads} key/value heads do not make "
                         f"grouped-query attention")
    if (lib is None or qkv.dtype != torch.float32 or not qkv.is_contiguous() or keys.dtype != torch.float32
            or head_dim % 2 or position >= keys.shape[2] or keys.stride(-1) != 1 or keys.stride(-2) != head_dim
            or keys.stride() != values.stride()):
        return reference_attend_one_token(qkv, cos, sin, keys, values, position, num_heads)
    out = torch.empty(batch, 1, num_heads * head_dim)
    check(lib.trillm_attention_one_token(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
                                         values.data_ptr(), batch, num_heads, kv_heads, head_dim, position,
                                         keys.stride(0), keys.stride(1), head_dim ** -0.5, out.data_ptr()))
    return out


def reference_attend_one_token(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                               values: torch.Tensor, position: int, num_heads: int) -> torch.Tensor:
    batch, _, all_heads, head_dim = qkv.shape
    kv_heads = (all_heads - num_heads) // 2
    qk = qkv[:, 0, :num_heads + kv_heads]  # (B, heads + kv_heads, head_dim): q and k rotate together
    qk = qk * cos[0] + qk.roll(head_dim // 2, dims=-1) * sin[0]
    keys[:, :, position] = qk[:, num_heads:]
    values[:, :, position] = qkv[:, 0, num_heads + kv_heads:]
    out = F.scaled_dot_product_attention(qk[:, :num_heads, None], keys[:, :, :position + 1],
                                         values[:, :, :position + 1], enable_gqa=kv_heads != num_heads)
    return out.reshape(batch, 1, num_heads * head_dim)
