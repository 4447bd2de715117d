"""The one factory models build their weights with: it receives tensors as the checkpoint stores them
and returns the module that computes from them, the native kernel's or, when the kernels cannot be built
(or TRILLM_NATIVE=0), the pure-PyTorch reference twin. Models never look at formats or kernels.

    make_linear(weight)     forward(x float32 [..., in]) -> float32 [..., out]
    make_embedding(weight)  forward(ids int64 [...]) -> float32 [..., dim]
    concat_rows(weights)    one weight of the same kind, to fuse q/k/v or gate/up into one matmul
"""

import torch
from torch import nn

from trillm.weights import native
from trillm.weights.dense import DenseEmbedding, DenseLinear, ReferenceDenseLinear, check_dense
from trillm.weights.ggml import (
    GGMLEmbedding,
    GGMLLinear,
    GGMLTensor,
    ReferenceGGMLEmbedding,
    ReferenceGGMLLinear,
    concat_ggml_rows,
)
from trillm.weights.ternary import ReferenceTernaryLinear, TernaryLinear, TernaryTensor, concat_ternary_rows

__all__ = ["GGMLTensor", "TernaryTensor", "can_concat_rows", "concat_rows", "make_embedding", "make_linear"]


def make_linear(weight: torch.Tensor | GGMLTensor | TernaryTensor, bias: torch.Tensor | None = None,
                int8_activations: bool = False) -> nn.Module:
    """A linear layer y = x W^T (+ bias) over weight (out_features, in_features) as stored.
    `int8_activations` asks for the kernel that quantizes x to int8 first (Q6_K only; see GGMLLinear)."""
    use_native = native.load() is not None
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
        return (GGMLEmbedding if native.load() is not None else ReferenceGGMLEmbedding)(weight)
    if isinstance(weight, torch.Tensor):
        return DenseEmbedding(weight)
    raise TypeError(f"no embedding for a {type(weight).__name__}")


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
