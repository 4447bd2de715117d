"""The BitNet b1.58 training recipe (Ma et al., 2024, "The Era of 1-bit LLMs: Training Tips, Code and FAQ";
Ma et al., 2025, "BitNet b1.58 2B4T Technical Report").

The model is BitNet 2B4T's architecture (trillm/models/bitnet.py: LLaMA 3's decoder with squared-ReLU GLU,
attn_sub_norm before o_proj and ffn_sub_norm before down_proj, tied embedding), with full-precision master
weights; or, started from a LLaMA checkpoint (train/init_from.py), LLaMA's own (SwiGLU, no sub norms, the
head as the checkpoint has it, in full precision), as Hugging Face's "Fine-tuning LLMs to 1.58bit" does. Every projection is a BitLinear: on the way in, its input is quantized to int8 per token (absmax)
and its weight to {-1, 0, +1} times the matrix's mean |w| (absmean); the products are taken of the
quantized values; the backward pass goes straight through both roundings (STE: the gradient of the rounded
value is taken as that of the value). The RMSNorm that LLaMA puts before attention and FFN sits at the
input of the BitLinears that follow it (q/k/v and gate/up), the sub norms at o_proj's and down_proj's.
In eval mode the forward is exactly what trillm and transformers compute from the exported checkpoint.
Started from a full-precision model, the projections blend into BitLinears over a warm-up: the quantizers'
steps are taken times lambda, which rises linearly from 0 (the model as it was) to 1 (ternary).

Schedules (two stages, switched at the midpoint): the learning rate rises linearly over the warm-up to its
first peak and decays linearly to halfway between the two peaks at the midpoint; there it drops to the
second, lower peak and decays linearly to 0 at the last step (seeds/002: "1.5e-3 to 8e-4, then 5e-4 to 0").
Weight decay is 0.1 in the first stage and 0 in the second. AdamW with betas (0.9, 0.95).
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trillm.models.layers import rope_inverse_frequencies

# Shapes (LLaMA sizes of the FAQ, and the 2B4T) with the paper's learning-rate peaks; the small ones train
# on two cores. vocab_size comes from the tokenizer.
PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, lr=(3e-3, 2e-3)),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, lr=(2e-3, 1.5e-3)),
    "700m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=24,
                 num_key_value_heads=24, lr=(1.5e-3, 1e-3)),
    "1.3b": dict(hidden_size=2048, intermediate_size=5460, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, lr=(1.2e-3, 8e-4)),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, lr=(1.2e-3, 8e-4)),
    "3.9b": dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=26, num_attention_heads=32,
                 num_key_value_heads=32, lr=(1.2e-3, 8e-4)),
    "2b4t": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                 num_key_value_heads=5, lr=(1.2e-3, 8e-4)),
}
WARMUP_STEPS = 375
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)


@dataclass
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096  # the 2B4T's
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    architecture: str = "bitnet"  # or "llama": SwiGLU without sub norms (a model started from LLaMA)
    tie_word_embeddings: bool = True
    rope_scaling: dict | None = None  # as models/layers.py's rope_inverse_frequencies takes it

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


def preset_shape(preset: str, vocab_size: int, **overrides) -> ModelShape:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    shape = {key: value for key, value in PRESETS[preset].items() if key != "lr"}
    return ModelShape(vocab_size=vocab_size, **{**shape, **overrides})


# ---- BitLinear -------------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """absmean: (ternary values {-1, 0, 1}, the scale mean|w|), as transformers' AutoBitLinear computes it."""
    scale = weight.abs().mean().clamp(min=1e-5)
    return (weight / scale).round().clamp(-1, 1), scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """absmax per token to int8 and back: round(x * 127 / max|x|) / (127 / max|x|)."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


class BitLinear(nn.Linear):
    """nn.Linear whose forward multiplies the quantized input and weight; gradients pass straight through
    both quantizers to the full-precision values. `ternary=False` is the full-precision baseline. `blend`
    (set by the training loop) is lambda, the share of the quantizers' steps taken: 1 but in a warm-up
    from a full-precision model."""

    def __init__(self, in_features: int, out_features: int, ternary: bool = True):
        super().__init__(in_features, out_features, bias=False)
        self.ternary = ternary
        self.blend = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ternary:
            return F.linear(x, self.weight)
        values, scale = quantize_weight(self.weight)
        weight = self.weight + self.blend * (values * scale - self.weight).detach()
        x = x.float()  # the roundings in float32, also under bf16 autocast (which then rounds the products' inputs)
        x = x + self.blend * (quantize_activations(x) - x).detach()
        return F.linear(x, weight)


# ---- The model -------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (batch, heads, T, head_dim), halves rotated (LLaMA's layout in Hugging Face checkpoints)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, s: ModelShape, ternary: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = BitLinear(s.hidden_size, self.heads * self.head_dim, ternary)
        self.k_proj = BitLinear(s.hidden_size, self.kv_heads * self.head_dim, ternary)
        self.v_proj = BitLinear(s.hidden_size, self.kv_heads * self.head_dim, ternary)
        self.attn_sub_norm = RMSNorm(self.heads * self.head_dim, s.rms_norm_eps) if s.architecture == "bitnet" \
            else nn.Identity()
        self.o_proj = BitLinear(self.heads * self.head_dim, s.hidden_size, ternary)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(self.attn_sub_norm(out))


class MLP(nn.Module):
    """BitNet's: down(subln(relu(gate(x))^2 * up(x))); LLaMA's: down(silu(gate(x)) * up(x))."""

    def __init__(self, s: ModelShape, ternary: bool):
        super().__init__()
        self.gate_proj = BitLinear(s.hidden_size, s.intermediate_size, ternary)
        self.up_proj = BitLinear(s.hidden_size, s.intermediate_size, ternary)
        self.bitnet = s.architecture == "bitnet"
        self.ffn_sub_norm = RMSNorm(s.intermediate_size, s.rms_norm_eps) if self.bitnet else nn.Identity()
        self.down_proj = BitLinear(s.intermediate_size, s.hidden_size, ternary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.relu(self.gate_proj(x)).square() if self.bitnet else F.silu(self.gate_proj(x))
        return self.down_proj(self.ffn_sub_norm(gate * self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, s: ModelShape, ternary: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s, ternary)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s, ternary)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetModel(nn.Module):
    """BitNetForCausalLM's layout (parameter names as its checkpoints' without "model."), or LlamaForCausalLM's
    (architecture "llama"); the head is the embedding when tied, else lm_head (never ternary)."""

    def __init__(self, shape: ModelShape, ternary: bool = True):
        super().__init__()
        self.shape, self.ternary = shape, ternary
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(Layer(shape, ternary) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        if not shape.tie_word_embeddings:
            self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        inv_freq = rope_inverse_frequencies(shape.head_dim, shape.rope_theta, shape.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, T, vocab)."""
        angles = torch.outer(torch.arange(ids.shape[1], dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        head = self.embed_tokens.weight if self.shape.tie_word_embeddings else self.lm_head.weight
        return F.linear(self.norm(x), head)

    def set_blend(self, blend: float):
        for module in self.modules():
            if isinstance(module, BitLinear):
                module.blend = blend


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matrices (projections, embedding), none on the norms."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


# ---- Schedules -------------------------------------------------------------------------------------------

@dataclass
class TwoStageSchedule:
    """The learning rate and weight decay of each step (see the top of this file)."""

    steps: int
    peaks: tuple[float, float]
    warmup: int = WARMUP_STEPS
    weight_decay: float = WEIGHT_DECAY
    midpoint: int = field(init=False)

    def __post_init__(self):
        if not self.peaks[0] > self.peaks[1] > 0:
            raise ValueError(f"the second stage's peak learning rate must be lower than the first's: {self.peaks}")
        self.warmup = min(self.warmup, max(self.steps // 10, 1))  # a short run keeps most of its steps
        self.midpoint = self.steps // 2

    def learning_rate(self, step: int) -> float:
        first, second = self.peaks
        if step < self.warmup:
            return first * (step + 1) / self.warmup
        if step < self.midpoint:
            progress = (step - self.warmup) / max(self.midpoint - self.warmup, 1)
            return first + progress * ((first + second) / 2 - first)
        return second * (self.steps - step) / (self.steps - self.midpoint)

    def decay(self, step: int) -> float:
        return self.weight_decay if step < self.midpoint else 0.0
