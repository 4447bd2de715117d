"""Named operations of the models' math that have a native kernel (csrc/layers.c), each bound here beside
its pure-PyTorch twin `reference_<name>`, which takes the same arguments and computes the same values.

An op runs its kernel when the library is loaded (build.load()) and the inputs are ones the kernel takes
(float32, contiguous where it reads them); otherwise it runs its twin. The tests hold every op to its twin
on every instruction-set level this machine runs. Why these: each is one call where its twin is several
torch ops, and each runs once or twice per layer per decoded token.
"""

import torch
import torch.nn.functional as F

from trillm.native import plan
from trillm.native.build import check, load
from trillm.native.plan import call


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich, 2019)."""
    lib = load()
    if lib is None or x.dtype != torch.float32 or not x.is_contiguous() or weight.dtype != torch.float32:
        return reference_rms_norm(x, weight, eps)
    dim = weight.shape[0]
    out = torch.empty_like(x)
    call(lib.trillm_rms_norm, x.data_ptr(), weight.data_ptr(), x.numel() // dim, dim, eps, out.data_ptr())
    return out


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (weight.shape[0],), weight, eps)


def gated(kernel: str, reference, gate_up: torch.Tensor, *parameters: float) -> torch.Tensor:
    """A gated activation of gate_up (..., 2 * dim) -> (..., dim) by the kernel named (its arguments: gate_up,
    rows, dim, the parameters, out), or by its twin reference(gate_up, *parameters)."""
    lib = load()
    if lib is None or gate_up.dtype != torch.float32 or not gate_up.is_contiguous():
        return reference(gate_up, *parameters)
    dim = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], dim)
    call(getattr(lib, kernel), gate_up.data_ptr(), out.numel() // dim, dim, *parameters, out.data_ptr())
    return out


def squared_relu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    """relu(gate)^2 * up for gate_up = [gate | up] (..., 2 * dim): BitNet's gated activation (squared ReLU: So
    et al., 2021, Primer). The same floats as the twin: the kernel keeps torch's order of operations."""
    return gated("trillm_squared_relu_glu", reference_squared_relu_glu, gate_up)


def reference_squared_relu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.relu(gate).square() * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] (..., 2 * dim): LLaMA's SwiGLU (Shazeer, 2020). Equal to the
    twin up to the last bit of the sigmoid's exp."""
    return gated("trillm_swiglu", reference_swiglu, gate_up)


def reference_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated activation over gate_up (..., 2 * dim) whose even channels are the gate's and odd ones
    the up projection's: (up + 1) * gate * sigmoid(alpha * gate), the gate clamped from above and the up
    projection on both sides at `limit`. Equal to the twin up to the last bit of the sigmoid's exp."""
    return gated("trillm_clamped_swiglu", reference_clamped_swiglu, gate_up, alpha, limit)


def reference_clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def route_to_experts(x: torch.Tensor, router_logits: torch.Tensor, k: int):
    """A mixture of experts' routing of tokens x (n, dim) by their router logits (n, experts): each token's k
    highest logits and a softmax over those alone, then the (token, rank) pairs sorted by expert, stably.
    Returns rows (n k, dim), each pair's token's x in that order; groups (g, 2) int64 of (expert, rows) in
    increasing expert order; weights (n k,) and tokens (n k,) int64, each row's softmax weight and token."""
    lib = load()
    n, dim = x.shape
    experts = router_logits.shape[-1]
    if (lib is None or x.dtype != torch.float32 or not x.is_contiguous() or router_logits.dtype != torch.float32
            or not router_logits.is_contiguous() or not 1 <= k <= experts <= 1024):
        return reference_route_to_experts(x, router_logits, k)
    rows, weights = torch.empty(n * k, dim), torch.empty(n * k)
    tokens, groups = torch.empty(n * k, dtype=torch.int64), torch.empty(experts, 2, dtype=torch.int64)
    count = torch.empty(1, dtype=torch.int64)
    check(call(lib.trillm_route_to_experts, x.data_ptr(), router_logits.data_ptr(), n, dim, experts, k, rows.data_ptr(),
               tokens.data_ptr(), weights.data_ptr(), groups.data_ptr(), count.data_ptr()))
    # one token's k experts are distinct: its groups are k, known without reading the count back (which a
    # decode plan could not do at each run: native/plan.py)
    return rows, groups[:k if n == 1 else int(count)], weights, tokens


def reference_route_to_experts(x: torch.Tensor, router_logits: torch.Tensor, k: int):
    top_logits, chosen = router_logits.topk(k, dim=-1)
    weights = top_logits.softmax(dim=-1).flatten()
    order = chosen.flatten().argsort(stable=True)  # the (token, rank) pairs by expert
    expert, count = chosen.flatten()[order].unique_consecutive(return_counts=True)
    tokens = order // k
    return x[tokens], torch.stack([expert, count], dim=1), weights[order], tokens


def combine_experts(y: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(n, dim): for each token, the sum of its routed rows y (rows, dim) times their weights (rows,), in
    the rows' order; `tokens` (rows,) int64 names each row's token."""
    lib = load()
    if (lib is None or y.dtype != torch.float32 or not y.is_contiguous() or weights.dtype != torch.float32
            or not weights.is_contiguous() or tokens.dtype != torch.int64 or not tokens.is_contiguous()):
        return reference_combine_experts(y, weights, tokens, n)
    out = torch.empty(n, y.shape[-1])
    call(lib.trillm_combine_experts, y.data_ptr(), weights.data_ptr(), tokens.data_ptr(), y.shape[0], y.shape[-1], n,
         out.data_ptr())
    return out


def reference_combine_experts(y: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    return y.new_zeros(n, y.shape[-1]).index_add_(0, tokens, y * weights[:, None])


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., 2 d): a's and b's last dimension (d) interleaved, a[..., 0], b[..., 0], a[..., 1], ..."""
    lib = load()
    if (lib is None or a.dtype != torch.float32 or b.dtype != torch.float32 or not a.is_contiguous()
            or not b.is_contiguous() or a.shape != b.shape):
        return reference_interleave(a, b)
    out = torch.empty(*a.shape[:-1], 2 * a.shape[-1])
    call(lib.trillm_interleave, a.data_ptr(), b.data_ptr(), a.numel(), out.data_ptr())
    return out


def reference_interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], dim=-1).flatten(-2)


def attend_one_token(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, position: int, num_heads: int, sinks: torch.Tensor | None = None,
                     window: int | None = None) -> torch.Tensor:
    """Self-attention of one new token a sequence, the decode step's case, in one call.

    qkv (B, 1, heads + 2 kv_heads, head_dim) is the fused projection of the token at `position`; cos and
    sin (1, 1, head_dim) are its RoPE tables (models/layers.py: rope_cos_sin, "rotate half" pairs with the
    sign in the sine table). Rotates the query and key heads, writes the key and value into one layer's
    cache keys/values (B, kv_heads, slots, head_dim) and attends, query head h reading kv head
    h // (heads / kv_heads). Without a `window` the cache holds every position, the token's goes to slot
    `position` and it attends over slots 0..position; with one, the cache is a ring of at most `window`
    slots (the last positions, in any order: the keys carry their rotation), the token's slot is position
    modulo their count. `sinks` (heads,) adds one logit per head to the softmax's denominator (gpt-oss).
    Returns (B, 1, heads * head_dim).
    """
    lib = load()
    batch, _, all_heads, head_dim = qkv.shape
    kv_heads = (all_heads - num_heads) // 2
    if kv_heads < 1 or num_heads % kv_heads or 2 * kv_heads + num_heads != all_heads:
        raise ValueError(f"{num_heads} query heads and {all_heads - num_heads} key/value heads do not make "
                         f"grouped-query attention")
    slot, length = cache_slot(keys.shape[2], position, window)
    if (lib is None or qkv.dtype != torch.float32 or not qkv.is_contiguous() or keys.dtype != torch.float32
            or head_dim % 2 or keys.stride(-1) != 1 or keys.stride(-2) != head_dim or keys.stride() != values.stride()
            or (sinks is not None and (sinks.dtype != torch.float32 or not sinks.is_contiguous()))):
        return reference_attend_one_token(qkv, cos, sin, keys, values, position, num_heads, sinks, window)
    out = torch.empty(batch, 1, num_heads * head_dim)
    recorder = plan.recorder()
    if recorder is not None:  # recorded to run at each token's position, not this one's
        recorder.add_attention(qkv, cos, keys, values, sinks, position, num_heads, kv_heads, window, out)
    check(lib.trillm_attention_one_token(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
                                         values.data_ptr(), None if sinks is None else sinks.data_ptr(), batch,
                                         num_heads, kv_heads, head_dim, slot, length, keys.stride(0), keys.stride(1),
                                         head_dim ** -0.5, out.data_ptr()))
    return out


def reference_attend_one_token(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                               values: torch.Tensor, position: int, num_heads: int, sinks: torch.Tensor | None = None,
                               window: int | None = None) -> torch.Tensor:
    batch, _, all_heads, head_dim = qkv.shape
    kv_heads = (all_heads - num_heads) // 2
    slot, length = cache_slot(keys.shape[2], position, window)
    qk = qkv[:, 0, :num_heads + kv_heads]  # (B, heads + kv_heads, head_dim): q and k rotate together
    qk = qk * cos[0] + qk.roll(head_dim // 2, dims=-1) * sin[0]
    keys[:, :, slot] = qk[:, num_heads:]
    values[:, :, slot] = qkv[:, 0, num_heads + kv_heads:]
    q = qk[:, :num_heads].view(batch, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("bkgd,bkld->bkgl", q, keys[:, :, :length]) * head_dim ** -0.5
    if sinks is not None:  # one more logit per head, dropped after the softmax
        scores = torch.cat([scores, sinks.float().view(1, kv_heads, -1, 1).expand(batch, -1, -1, 1)], dim=-1)
    probabilities = scores.softmax(dim=-1)[..., :length]
    out = torch.einsum("bkgl,bkld->bkgd", probabilities, values[:, :, :length])
    return out.reshape(batch, 1, num_heads * head_dim)


def cache_slot(slots: int, position: int, window: int | None) -> tuple[int, int]:
    """(the slot a token at `position` writes, the slots attended): see attend_one_token."""
    if window is None:
        if position >= slots:
            raise ValueError(f"position {position} is past the cache's {slots} positions")
        return position, position + 1
    return position % slots, min(position + 1, slots)
