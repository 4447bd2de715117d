"""What the model families share: RMSNorm, rotary position embeddings, the KV cache, causal self-attention
over fused q/k/v heads, the pre-norm residual block and the decoder stack around the blocks. Each family
writes its own attention and MLP out of these (models/llama.py, models/bitnet.py).

RoPE follows Su et al. (RoFormer) in the "rotate half" layout that Hugging Face checkpoints use, with
the llama3 frequency scaling of Meta's Llama 3.1 release. Numerics follow transformers' Llama modules
in float32 so that logits agree to ~1e-5. The steps a decode step runs most often call named native ops
(trillm/native/ops.py), each with its PyTorch twin.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trillm.checkpoint.fields import REQUIRED, Fields
from trillm.errors import CheckpointError
from trillm.native import ops


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
    # How a conversation becomes a prompt: the tokenizer's chat template, or (gpt-oss) harmony.
    chat_format: ClassVar[str] = "template"

    @staticmethod
    def hf_fields(config: Fields, defaults: dict) -> dict:
        """These fields from config.json under transformers' names, each checked; `defaults` holds the
        family's defaults (transformers' config class's), a key it leaves out is required."""
        default = lambda key: defaults.get(key, REQUIRED)  # noqa: E731
        hidden = config.integer("hidden_size", default("hidden_size"))
        heads = config.integer("num_attention_heads", default("num_attention_heads"))
        rope_theta, rope_scaling = rope_settings_from_hf(config, default("rope_theta"))
        return dict(
            vocab_size=config.integer("vocab_size", default("vocab_size")),
            hidden_size=hidden,
            intermediate_size=config.integer("intermediate_size", default("intermediate_size")),
            num_layers=config.integer("num_hidden_layers", default("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=config.integer("num_key_value_heads", defaults.get("num_key_value_heads", heads)),
            head_dim=config.integer("head_dim", hidden // heads),
            rms_norm_eps=config.number("rms_norm_eps", default("rms_norm_eps"), inclusive=True),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.integer("max_position_embeddings", default("max_position_embeddings")),
            tie_word_embeddings=config.flag("tie_word_embeddings", False),
        )

    @staticmethod
    def gguf_fields(metadata: Fields, tensor_names: list[str]) -> dict:
        """These fields from GGUF metadata, under llama.cpp's keys for the file's architecture, each checked."""
        arch = metadata.text("general.architecture")
        hidden = metadata.integer(f"{arch}.embedding_length")
        heads = metadata.integer(f"{arch}.attention.head_count")
        if f"{arch}.vocab_size" in metadata:
            vocab_size = metadata.integer(f"{arch}.vocab_size")
        elif isinstance(metadata.get("tokenizer.ggml.tokens", None), list):
            vocab_size = len(metadata.get("tokenizer.ggml.tokens"))
        else:
            raise CheckpointError(f"{metadata.source}: GGUF metadata has neither {arch}.vocab_size nor a vocabulary "
                                  f"(tokenizer.ggml.tokens)")
        return dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=metadata.integer(f"{arch}.feed_forward_length"),
            num_layers=metadata.integer(f"{arch}.block_count"),
            num_heads=heads,
            num_kv_heads=metadata.integer(f"{arch}.attention.head_count_kv", heads),
            head_dim=metadata.integer(f"{arch}.attention.key_length", hidden // heads),
            rms_norm_eps=metadata.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, inclusive=True),
            rope_theta=metadata.number(f"{arch}.rope.freq_base", 10000.0),
            rope_scaling=None,  # llama.cpp stores llama3 scaling as the `rope_freqs.weight` tensor instead
            max_position_embeddings=metadata.integer(f"{arch}.context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
        )

    def check(self, source):
        """Raise CheckpointError unless the shape is one the layers (and the kernels) can run."""
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"{source}: {self.num_heads} attention heads cannot share {self.num_kv_heads} "
                                  f"KV heads (the heads must be a multiple of the KV heads)")
        if self.head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {self.head_dim} is odd, but rotary positions rotate "
                                  f"pairs of channels")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] (..., 2 * dim): the SwiGLU of Shazeer (2020)."""
    return ops.swiglu(gate_up)


# ---- Rotary position embeddings -----------------------------------------------------------------------

def rope_settings_from_hf(config: Fields, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling) from an HF config.json: transformers 5 moves rope_theta and rope_scaling into
    `rope_parameters`; older configs have both. Scaling is None for plain RoPE, else the parameters of
    llama3's or YaRN's scaling, checked (the keys and defaults of transformers' modeling_rope_utils)."""
    rope = config.table("rope_parameters" if "rope_parameters" in config else "rope_scaling")
    rope_type = rope.text("rope_type", rope.text("type", "default"), choices=("default", "llama3", "yarn"))
    theta = config.number("rope_theta") if "rope_theta" in config else rope.number("rope_theta", default_theta)
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":
        if rope.number("partial_rotary_factor", 1.0) != 1.0:
            raise rope.fail("partial_rotary_factor", "1 (rotating part of each head is not supported)",
                            rope.get("partial_rotary_factor"))
        factor = rope.number("factor")
        if "attention_factor" in rope:
            attention_factor = rope.number("attention_factor")
        elif "mscale" in rope and "mscale_all_dim" in rope:
            attention_factor = yarn_mscale(factor, rope.number("mscale")) / yarn_mscale(factor, rope.number("mscale_all_dim"))
        else:
            attention_factor = yarn_mscale(factor)
        return theta, {"rope_type": "yarn", "factor": factor, "beta_fast": rope.number("beta_fast", 32.0),
                       "beta_slow": rope.number("beta_slow", 1.0), "truncate": rope.flag("truncate", True),
                       "original_max_position_embeddings": rope.integer("original_max_position_embeddings"),
                       "attention_factor": attention_factor}
    low, high = rope.number("low_freq_factor"), rope.number("high_freq_factor")
    if high <= low:
        raise rope.fail("high_freq_factor", f"greater than low_freq_factor {low:g}", high)
    return theta, {"rope_type": "llama3", "factor": rope.number("factor"), "low_freq_factor": low,
                   "high_freq_factor": high,
                   "original_max_position_embeddings": rope.integer("original_max_position_embeddings")}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (Peng et al., 2023): sqrt(1/t) = 0.1 ln(s) + 1 for a context s times longer."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotation speed of each pair of channels, (head_dim / 2,), with llama3 scaling if asked for (`scaling`
    as rope_settings_from_hf gives it)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "yarn":
        return yarn_inverse_frequencies(head_dim, theta, scaling)
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


def yarn_inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (Peng et al., 2023): the fast-rotating pairs keep their frequency, the slow ones are interpolated
    by `factor`, with a linear ramp between (the pairs turning beta_fast to beta_slow times over the original
    context); in transformers' order of operations."""
    factor, original_context = scaling["factor"], scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for these positions, each (T, 1, head_dim), ready for `apply_rope`.

    Channel i pairs with channel i + head_dim/2; the sine table carries the rotation's sign
    (-sin for the first half, +sin for the second) so that applying it takes four ops. YaRN scales both
    tables by its attention factor (so q.k grows by its square).
    """
    angles = torch.outer(positions.float(), inv_freq)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, T, heads, head_dim) by the position angles:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) with the sign in the table."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# ---- Attention ------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer, preallocated: per layer (batch, kv_heads, slots, head_dim) each, slots
    being `max_length` positions, or for a layer with a sliding window of w positions a ring of w slots (a
    long context costs the full cache only on the full-attention layers).

    torch.empty reserves address space only: memory is touched as positions fill, so a long context
    costs nothing until it is used.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_length: int,
                 windows: list[int | None] | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.windows = windows or [None] * num_layers
        self.rope = rope  # rope_cos_sin's tables for positions 0..max_length, or None (computed per call)
        slots = [max_length if window is None else min(window, max_length) for window in self.windows]
        self.keys = [torch.empty(batch, num_kv_heads, n, head_dim) for n in slots]
        self.values = [torch.empty(batch, num_kv_heads, n, head_dim) for n in slots]
        self.max_length = max_length

    def row(self, index: int) -> "KVCache":
        """The cache of one sequence, row `index` of this batch: views, so its writes land here (a server's
        slot)."""
        view = object.__new__(KVCache)
        view.windows, view.rope, view.max_length = self.windows, self.rope, self.max_length
        view.keys = [keys[index:index + 1] for keys in self.keys]
        view.values = [values[index:index + 1] for values in self.values]
        return view

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int):
        """Store (B, kv_heads, T, head_dim) keys/values at positions start.., return all so far (a layer
        that keeps every position)."""
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def update_window(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int):
        """For a sliding-window layer: (keys, values, position of the first) of the window before position
        `start` followed by these new ones, in position order; the new ones then go into the ring (position
        p in slot p modulo its size, the oldest overwritten)."""
        slots, window = self.keys[layer].shape[2], self.windows[layer]
        first = max(0, start - window + 1)
        kept = torch.arange(first, start) % slots
        all_keys = torch.cat([self.keys[layer][:, :, kept], keys], dim=2)
        all_values = torch.cat([self.values[layer][:, :, kept], values], dim=2)
        last = min(keys.shape[2], slots)  # the new positions the ring keeps
        written = torch.arange(start + keys.shape[2] - last, start + keys.shape[2]) % slots
        self.keys[layer][:, :, written] = keys[:, :, -last:]
        self.values[layer][:, :, written] = values[:, :, -last:]
        return all_keys, all_values, first


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


def self_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None, layer: int,
                   start: int, num_heads: int, sinks: torch.Tensor | None = None,
                   window: int | None = None) -> torch.Tensor:
    """Grouped-query self-attention (Ainslie et al., 2023) of tokens at positions start.., from their fused
    projection qkv (B, T, heads + 2 kv_heads, head_dim): RoPE on the query and key heads, keys and values
    into the cache, causal attention over the positions so far (the last `window` of them, if given), with
    one sink logit per head if given. Returns (B, T, heads * head_dim).

    One new token with a cache (a decode step) is one native op, ops.attend_one_token. A decode step of
    several sequences (`cache` and `start` lists, one a row: see Transformer.forward) is one such op a row.
    """
    cos, sin = rope
    batch, length, all_heads, head_dim = qkv.shape
    if isinstance(cache, list):
        return torch.cat([ops.attend_one_token(qkv[row:row + 1], cos[row:row + 1], sin[row:row + 1],
                                               row_cache.keys[layer], row_cache.values[layer], position, num_heads,
                                               sinks, window)
                          for row, (row_cache, position) in enumerate(zip(cache, start))])
    if length == 1 and cache is not None:
        return ops.attend_one_token(qkv, cos, sin, cache.keys[layer], cache.values[layer], start, num_heads, sinks,
                                    window)
    kv_heads = (all_heads - num_heads) // 2
    qk = apply_rope(qkv[:, :, : num_heads + kv_heads], cos, sin)  # q and k rotate together
    q = qk[:, :, :num_heads].transpose(1, 2)  # (B, heads, T, head_dim)
    k = qk[:, :, num_heads:].transpose(1, 2)  # (B, kv_heads, T, head_dim)
    v = qkv[:, :, num_heads + kv_heads:].transpose(1, 2)
    if sinks is None and window is None:
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        out = causal_attention(q, k, v, start)
    else:
        first = start
        if cache is not None and window is not None:
            k, v, first = cache.update_window(layer, k, v, start)
        elif cache is not None:
            k, v = cache.update(layer, k, v, start)
            first = 0
        out = attention_with_sinks(q, k, v, start, first, sinks, window)
    return out.transpose(1, 2).reshape(batch, length, num_heads * head_dim)


# Queries taken at a time by attention_with_sinks: its scores are (heads, queries, keys) floats.
SCORES_PER_CHUNK = 1 << 24


def attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start: int, key_start: int,
                         sinks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Causal attention of queries at positions query_start.. over keys at positions key_start.., each query
    seeing the keys at most `window` positions back (if given), and with `sinks`, one more logit per head in
    the softmax's denominator whose value is dropped (gpt-oss: a head may attend to nothing much), as
    transformers' eager attention computes it. q (B, heads, T, D); k, v (B, kv_heads, L, D)."""
    batch, heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    key_positions = torch.arange(key_start, key_start + keys)
    out = torch.empty_like(q)
    step = max(1, SCORES_PER_CHUNK // (batch * heads * keys))
    for first in range(0, length, step):
        query = q[:, :, first:first + step].reshape(batch, kv_heads, heads // kv_heads, -1, head_dim)
        query_positions = torch.arange(query_start + first, query_start + first + query.shape[3])
        visible = key_positions <= query_positions[:, None]
        if window is not None:
            visible &= key_positions > query_positions[:, None] - window
        scores = torch.einsum("bkgtd,bkld->bkgtl", query, k) * head_dim ** -0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, kv_heads, -1, 1, 1).expand(batch, -1, -1, scores.shape[3], 1)
            scores = torch.cat([scores, sink], dim=-1)
        probabilities = scores.softmax(dim=-1)[..., :keys]
        out[:, :, first:first + step] = torch.einsum("bkgtl,bkld->bkgtd", probabilities, v).reshape(
            batch, heads, -1, head_dim)
    return out


# ---- Mixtures of experts ---------------------------------------------------------------------------------

def mixture_of_experts(x: torch.Tensor, router_logits: torch.Tensor, experts_per_token: int, experts) -> torch.Tensor:
    """Each token (n, dim) through the `experts_per_token` experts its router logits (n, experts) rank
    highest, their outputs weighted by a softmax over those logits alone and summed (Shazeer et al., 2017;
    gpt-oss). `experts(rows, groups)` runs all the routed copies of the tokens at once, sorted by expert:
    groups (g, 2) holds each expert and its number of rows, so that a prompt reads each expert's weights
    once and a decode step makes one call for its few experts."""
    rows, groups, weights, tokens = ops.route_to_experts(x, router_logits, experts_per_token)
    return ops.combine_experts(experts(rows, groups), weights, tokens, x.shape[0])


# ---- The decoder: pre-norm residual blocks between an embedding and an output head ----------------------

class Block(nn.Module):
    """A pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x)). The family gives the
    attention (forward(x, rope, cache, layer, start)) and the MLP."""

    def __init__(self, attention_norm: RMSNorm, attention: nn.Module, mlp_norm: RMSNorm, mlp: nn.Module):
        super().__init__()
        self.attention_norm = attention_norm
        self.attention = attention
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(self, x, rope, cache, layer, start):
        x = x + self.attention(self.attention_norm(x), rope, cache, layer, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder-only stack: token embedding, blocks, final RMSNorm, output head.

    `config` is the family's dataclass; the cache and RoPE need its num_layers, num_kv_heads and head_dim.
    """

    def __init__(self, config, embedding, blocks: list[nn.Module], norm: RMSNorm, head, inv_freq: torch.Tensor,
                 windows: list[int | None] | None = None):
        """`windows`: each layer's sliding window of positions, None for one attending to all."""
        super().__init__()
        self.config = config
        self.windows = windows
        self.attention_factor = (config.rope_scaling or {}).get("attention_factor", 1.0)  # YaRN's
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """A cache of max_length positions, with the RoPE tables of those positions (a decode step takes its
        row, a view: native/plan.py records the steps that read it)."""
        c = self.config
        rope = rope_cos_sin(self.inv_freq, torch.arange(max_length), self.attention_factor)
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_length, self.windows, rope)

    def forward(self, input_ids: torch.LongTensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens at positions start..; with a cache, keys/values are kept.

        Continuous batching: a decode step of B sequences at once gives one token a row (B, 1), `cache` a
        list of each row's cache (KVCache.row) and `start` a list of each row's position. The matmuls then
        read each weight once for all of them; attention runs row by row over each row's own cache."""
        if isinstance(start, list):
            if not len(cache) == len(start) == input_ids.shape[0] or input_ids.shape[1] != 1:
                raise ValueError(f"a decode step of several sequences takes one token, one cache and one position "
                                 f"a row: {tuple(input_ids.shape)} tokens, {len(cache)} caches, {len(start)} positions")
            positions = torch.tensor(start)
            rope = cache[0].rope[0][positions], cache[0].rope[1][positions]  # (B, 1, head_dim) each
            return self._blocks_and_head(input_ids, rope, cache, start, last_only)
        end = start + input_ids.shape[1]
        if cache is not None and cache.rope is not None and end <= cache.rope[0].shape[0]:
            rope = cache.rope[0][start:end], cache.rope[1][start:end]
        else:
            rope = rope_cos_sin(self.inv_freq, torch.arange(start, end), self.attention_factor)
        return self._blocks_and_head(input_ids, rope, cache, start, last_only)

    def _blocks_and_head(self, input_ids, rope, cache, start, last_only):
        x = self.embedding(input_ids)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, start)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))
