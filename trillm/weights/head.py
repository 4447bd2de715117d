"""How an output head is kept in memory: the largest single read of a decode step when it is a tied
embedding (656 MB in bf16 for BitNet 2B4T, more than its 30 layers' ternary weights), so the caller may
have it re-stored in fewer bytes than the checkpoint's; and likewise other dense weights (gpt-oss's
attention, half of what its decode step reads beside the MXFP4 experts).
"""

import logging
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType
from torch import nn

from trillm.weights import GGMLTensor, make_linear
from trillm.weights.huge_pages import in_huge_pages
from trillm.weights.ggml import Q6_K_BLOCK_SIZE, Q8_0_BLOCK_SIZE, quantize_q6_k, quantize_q8_0

log = logging.getLogger("trillm")

HEAD_FORMATS = ("bf16", "q8_0", "q6_k")
DENSE_FORMATS = ("q8_0",)


def restore_dense(weight: torch.Tensor | GGMLTensor, dense_format: str | None,
                  rows_done: Callable[[int, int], None] | None = None) -> torch.Tensor | GGMLTensor:
    """A dense weight re-stored in `dense_format`: "q8_0" (GGML Q8_0, as llama.cpp's quantizer writes it:
    8.5 bits a weight, 47% fewer bytes than bf16), or None: as stored. A weight already in GGML blocks, or
    whose rows do not split in blocks of 32, stays as stored. `rows_done` as for quantize_q8_0."""
    if dense_format not in (None, *DENSE_FORMATS):
        raise ValueError(f"unknown dense format {dense_format!r} (choose from {', '.join(DENSE_FORMATS)})")
    if dense_format is None or isinstance(weight, GGMLTensor) or weight.shape[-1] % Q8_0_BLOCK_SIZE:
        return weight
    return quantize_q8_0(weight, rows_done)


def make_output_head(weight: torch.Tensor | GGMLTensor, head_format: str | None = None,
                     rows_done: Callable[[int, int], None] | None = None, int8_activations: bool = False) -> nn.Module:
    """The output projection (vocab, dim), re-stored in `head_format` when the weight is dense:

    - None: as stored;
    - "bf16": in bfloat16, not re-stored when stored so, as BitNet's tied embedding is;
    - "q8_0": GGML Q8_0 blocks (8.5 bits a weight, 47% fewer bytes than bf16: a decode step reads the whole
      head), quantized here as llama.cpp's quantizer would;
    - "q6_k": GGML Q6_K blocks (6.56 bits a weight, 59% fewer bytes than bf16; quantize_q6_k), multiplied
      with int8 activations as llama.cpp does (GGMLLinear): the float-activation Q6_K kernel is
      compute-bound at 40% of the memory's speed, the int8 one reads the head as fast as memory allows.
      Rows that do not split in blocks of 256 get Q8_0 instead (small test models; SmolLM2's 576). A GGUF
      head stored in Q6_K (as llama.cpp's Q4_K_M files store it) gets the int8 kernel too.

    Rows that do not split in blocks of 32 stay as stored, with a warning. Otherwise a head stored in GGML
    blocks (a GGUF file) stays as its file chose. `rows_done` goes to the quantizer (see quantize_q8_0),
    or to the copy into huge pages of a head kept as stored (huge_pages.HugePageArena.copy).
    `int8_activations`: a head in GGML blocks takes the int8 kernel where its type has one (make_linear).
    """
    if head_format not in (None, *HEAD_FORMATS):
        raise ValueError(f"unknown output head format {head_format!r} (choose from {', '.join(HEAD_FORMATS)})")
    if isinstance(weight, GGMLTensor):
        int8_activations |= head_format == "q6_k" and weight.type == GGMLQuantizationType.Q6_K
        weight = GGMLTensor(weight.type, in_huge_pages(weight.data, rows_done), weight.shape)
        return make_linear(weight, int8_activations=int8_activations)
    if head_format == "q6_k" and weight.shape[1] % Q6_K_BLOCK_SIZE == 0:
        return make_linear(quantize_q6_k(weight, rows_done), int8_activations=True)
    if head_format in ("q6_k", "q8_0"):
        if weight.shape[1] % Q8_0_BLOCK_SIZE == 0:
            return make_linear(quantize_q8_0(weight, rows_done), int8_activations=int8_activations)
        log.warning("trillm: the output head has %d columns, not a multiple of %d: kept in %s, not %s",
                    weight.shape[1], Q8_0_BLOCK_SIZE, weight.dtype, head_format.upper())
    if head_format == "bf16":
        weight = weight.to(torch.bfloat16)
    return make_linear(in_huge_pages(weight, rows_done))
