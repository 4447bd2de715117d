"""Dense weights (float32, float16, bfloat16), kept in their stored dtype: a float16 or bfloat16 model
takes half the memory of float32 and a decode step reads half the bytes.

The native kernel (csrc/dense.c) reads the stored dtype and sums in float32; the reference twin is
torch's float32 linear over the upcast weight, which is what transformers computes in float32.
"""

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from trillm.weights.linear import KERNEL_MAX_TOKENS, RowEmbedding, RowLinear, prompt_linear

# The kernels know the dtypes by their ggml_type numbers (csrc/kernels.h).
TYPE_CODES = {torch.float32: int(GGMLQuantizationType.F32), torch.float16: int(GGMLQuantizationType.F16),
              torch.bfloat16: int(GGMLQuantizationType.BF16)}


def check_dense(weight: torch.Tensor):
    if weight.dtype not in TYPE_CODES or weight.dim() != 2:
        raise ValueError(f"dense weights must be 2-D float32, float16 or bfloat16; got {weight.dtype} "
                         f"{tuple(weight.shape)}")


class DenseLinear(RowLinear):
    """y = x W^T + bias with float32 in and out, W in its stored dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        check_dense(weight)
        super().__init__(TYPE_CODES[weight.dtype], weight, tuple(weight.shape), bias)
        self.weight = self.stored

    def float_weight(self) -> torch.Tensor:
        return self.weight if self.weight.dtype == torch.float32 else super().float_weight()

    def prompt_weight(self) -> torch.Tensor:
        # a bfloat16 weight serves a bfloat16 matmul as stored, no decode
        return self.weight if self.prompt_bf16 and self.weight.dtype == torch.bfloat16 else self.float_weight()


class ReferenceDenseLinear(nn.Module):
    """DenseLinear's reference twin: the weight upcast to float32 on every call, then torch's linear (a
    prompt's in bfloat16 with `prompt_bf16`, as DenseLinear)."""

    prompt_bf16 = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        check_dense(weight)
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.stored_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompt = x.numel() // self.in_features > KERNEL_MAX_TOKENS
        return prompt_linear(x.float(), self.weight, self.bias, self.prompt_bf16 and prompt)


class DenseEmbedding(RowEmbedding):
    """Token embeddings from a dense matrix in its stored dtype; the native decoder turns the looked-up rows
    into float32."""

    def __init__(self, weight: torch.Tensor):
        check_dense(weight)
        super().__init__(TYPE_CODES[weight.dtype], weight, tuple(weight.shape))
        self.weight = self.stored


class ReferenceDenseEmbedding(nn.Module):
    """DenseEmbedding's reference twin: torch's lookup, then the rows upcast."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        check_dense(weight)
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()
