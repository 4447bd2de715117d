"""The one factory models build their weights with: it receives tensors as the checkpoint stores them
and returns the module that computes from them, the native kernel's or, when there are no native kernels
(they cannot be built, or TRILLM_ISA=reference), the pure-PyTorch reference twin. Models never look at
formats or kernels.

    make_linear(weight)         forward(x float32 [..., in]) -> float32 [..., out]
    make_linear([q, k, v])      the same over the weights' rows stacked: one matmul where they can share one
    make_embedding(weight)      forward(ids int64 [...]) -> float32 [..., dim]
    make_experts(bank, bias, k) forward(x float32 [n, in], groups int64 [g, 2]) -> float32 [n, out], a mixture's
                                experts: x's rows grouped by expert, groups (expert, rows) in that order
    weight_bytes_per_token(m)   the bytes of stored weights a decode step of model m reads
"""

import torch
from torch import nn

from trillm.native import ops
from trillm.native.build import load
from trillm.weights.dense import DenseEmbedding, DenseLinear, ReferenceDenseEmbedding, ReferenceDenseLinear, check_dense
from trillm.weights.ggml import (
    GGMLEmbedding,
    GGMLLinear,
    GGMLTensor,
    ReferenceGGMLEmbedding,
    ReferenceGGMLLinear,
    concat_ggml_rows,
)
from trillm.weights.mxfp4 import MXFP4Experts, MXFP4Tensor, ReferenceMXFP4Experts
from trillm.weights.ternary import ReferenceTernaryLinear, TernaryLinear, TernaryTensor, concat_ternary_rows

__all__ = ["GGMLTensor", "MXFP4Tensor", "TernaryTensor", "can_concat_rows", "concat_rows", "make_embedding",
           "make_experts", "make_linear", "weight_bytes_per_token"]

Weight = torch.Tensor | GGMLTensor | TernaryTensor


def make_linear(weight: Weight | list[Weight], bias: torch.Tensor | None = None,
                int8_activations: bool = False, prompt_bf16: bool = False) -> nn.Module:
    """A linear layer y = x W^T (+ bias) over weight (out_features, in_features) as stored.

    A list of weights is their rows stacked in order (q/k/v, gate/up): one matrix, so one matmul, when they
    share format and columns; else one layer each, their outputs concatenated (GGUF files that mix types,
    e.g. Q4_K_M with Q6_K value projections). `int8_activations` asks for the kernels that quantize x to
    int8 first, for GGML weights (every type has them: ggml.INT8_ACTIVATION_BLOCKS; dense and ternary
    weights keep their own); `prompt_bf16` for prompts multiplied in bfloat16 (dense and GGML weights:
    linear.prompt_linear)."""
    module = linear_module(weight, bias, int8_activations)
    for part in module.modules():
        if hasattr(part, "prompt_bf16"):
            part.prompt_bf16 = prompt_bf16
    return module


def linear_module(weight: Weight | list[Weight], bias: torch.Tensor | None, int8_activations: bool) -> nn.Module:
    if isinstance(weight, list):
        if not can_concat_rows(weight):
            return StackedLinear([make_linear(part, int8_activations=int8_activations) for part in weight], bias)
        weight = concat_rows(weight)
    use_native = load() is not None
    if isinstance(weight, TernaryTensor):
        return (TernaryLinear if use_native else ReferenceTernaryLinear)(weight, bias)
    if isinstance(weight, GGMLTensor):
        return (GGMLLinear if use_native else ReferenceGGMLLinear)(weight, bias, int8_activations)
    if isinstance(weight, torch.Tensor):
        return (DenseLinear if use_native else ReferenceDenseLinear)(weight, bias)
    raise TypeError(f"no linear layer for a {type(weight).__name__}")


def make_embedding(weight: torch.Tensor | GGMLTensor) -> nn.Module:
    """An embedding table (num_embeddings, dim) as stored; looked-up rows come out float32."""
    if isinstance(weight, GGMLTensor):
        return (GGMLEmbedding if load() is not None else ReferenceGGMLEmbedding)(weight)
    if isinstance(weight, torch.Tensor):
        return (DenseEmbedding if load() is not None else ReferenceDenseEmbedding)(weight)
    raise TypeError(f"no embedding for a {type(weight).__name__}")


def make_experts(weight: MXFP4Tensor | list[MXFP4Tensor], bias: torch.Tensor | None, experts_per_token: int,
                 activations: str = "int8", prompt_activations: str | None = None) -> nn.Module:
    """The experts of a mixture-of-experts layer, a bank (experts, out_features, in_features) as stored, with
    their biases (experts, out_features); a decode step reads `experts_per_token` of them. A list of banks
    is their rows interleaved, the first's row 0, the second's row 0, ... (gpt-oss's release keeps its gate
    and up rows so, in one bank; llama.cpp's GGUF in two). `activations`, `prompt_activations`: see
    MXFP4Experts."""
    if isinstance(weight, list):
        biases = [None] * len(weight) if bias is None else bias.unflatten(1, (-1, len(weight))).unbind(2)
        return InterleavedExperts([make_experts(bank, part_bias, experts_per_token, activations, prompt_activations)
                                   for bank, part_bias in zip(weight, biases)])
    if isinstance(weight, MXFP4Tensor):
        experts = MXFP4Experts if load() is not None else ReferenceMXFP4Experts
        return experts(weight, bias, experts_per_token, activations, prompt_activations)
    raise TypeError(f"no experts module for a {type(weight).__name__}")


def stored_format(weight: torch.Tensor | GGMLTensor | TernaryTensor):
    """The GGML type, "ternary", or the torch dtype a weight is stored in."""
    if isinstance(weight, TernaryTensor):
        return "ternary"
    return weight.type if isinstance(weight, GGMLTensor) else weight.dtype


def can_concat_rows(weights: list) -> bool:
    """Whether concat_rows accepts these: one stored format and one column count for all (GGUF files that
    mix types, e.g. Q4_K_M with Q6_K value projections, have some that cannot be fused)."""
    return len({(stored_format(weight), weight.shape[1]) for weight in weights}) == 1


def concat_rows(weights: list) -> torch.Tensor | GGMLTensor | TernaryTensor:
    """The weights stacked along output rows, in order; all must share format and in_features."""
    if not can_concat_rows(weights):
        described = ", ".join(f"{stored_format(weight)} {tuple(weight.shape)}" for weight in weights)
        raise ValueError(f"cannot concatenate rows of {described}: formats and columns must match")
    if isinstance(weights[0], GGMLTensor):
        return concat_ggml_rows(weights)
    if isinstance(weights[0], TernaryTensor):
        return concat_ternary_rows(weights)
    for weight in weights:
        check_dense(weight)
    return torch.cat(weights)


class StackedLinear(nn.Module):
    """Linear layers over the same input whose outputs are concatenated: stacked weights that cannot share
    one matrix."""

    def __init__(self, parts: list[nn.Module], bias: torch.Tensor | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([part(x) for part in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


class InterleavedExperts(nn.Module):
    """Two banks of experts over the same input whose output rows are interleaved (see make_experts)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        if len(parts) != 2:
            raise ValueError(f"interleaved experts come as two banks (gate and up), not {len(parts)}")
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, groups: torch.Tensor, decoding: bool = False) -> torch.Tensor:
        return ops.interleave(self.parts[0](x, groups, decoding), self.parts[1](x, groups, decoding))


def weight_bytes_per_token(network: nn.Module) -> int:
    """Bytes of stored weights a decode step reads: every linear layer's once, a mixture's routed experts
    only (the embedding's one row is left out)."""
    return sum(getattr(module, "bytes_per_token", module.stored_bytes) for module in network.modules()
               if hasattr(module, "stored_bytes"))
