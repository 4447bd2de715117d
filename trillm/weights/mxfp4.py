"""MXFP4 weights (OCP Microscaling Formats v1.0) as gpt-oss stores its experts: 32 FP4 E2M1 elements share one
E8M0 scale, value = FP4_VALUES[code] * 2^(scale - 127), 4.25 bits a weight. The experts of a layer are one
bank, (experts, rows, cols); a token multiplies by the few its router picks.

Two stored layouts (csrc/mxfp4.c computes from either as stored, memory-mapped, no copy):
- the Hugging Face release: `*_blocks` uint8 (experts, rows, cols / 32, 16), byte j of a block holding
  element 2j in its low nibble and 2j + 1 in its high, and `*_scales` uint8 (experts, rows, cols / 32);
- GGUF (llama.cpp's MXFP4, ggml type 39): 17-byte blocks, the scale byte then 16 bytes whose byte j holds
  element j in its low nibble and j + 16 in its high, rows of blocks (experts, rows, cols / 32 * 17).
The reference decode equals transformers' integrations.mxfp4.convert_moe_packed_tensors.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trillm.native.build import load
from trillm.native.plan import call
from trillm.weights.linear import round_to_int8

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_SIZE = 32
GGUF_BLOCK_BYTES = 17  # the scale, then 16 bytes of codes


@dataclass
class MXFP4Tensor:
    """A bank of MXFP4 matrices as stored; `scales` is None in the GGUF layout (inside the blocks)."""

    codes: torch.Tensor  # uint8: (experts, rows, cols / 32, 16), or GGUF blocks (experts, rows, cols / 32 * 17)
    scales: torch.Tensor | None  # uint8 (experts, rows, cols / 32)
    shape: tuple[int, int, int]  # (experts, rows, cols)

    @property
    def layout(self) -> str:
        return "gguf" if self.scales is None else "hf"


def check_mxfp4(weight: MXFP4Tensor):
    """Raise ValueError unless codes, scales and shape agree. Rows may be any stride apart (the gate rows of
    the release's interleaved gate/up bank are every other row); a row's blocks must be contiguous."""
    experts, rows, cols = weight.shape
    if cols % BLOCK_SIZE or min(weight.shape) < 1:
        raise ValueError(f"MXFP4 rows hold blocks of {BLOCK_SIZE}; shape {weight.shape} does not fit")
    blocks = cols // BLOCK_SIZE
    if weight.scales is None:
        expected = {"codes": (experts, rows, blocks * GGUF_BLOCK_BYTES)}
    else:
        expected = {"codes": (experts, rows, blocks, 16), "scales": (experts, rows, blocks)}
    for name, shape in expected.items():
        tensor = getattr(weight, name)
        row = tensor[0, 0] if len(shape) > 2 else tensor
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != shape or not row.is_contiguous():
            raise ValueError(f"MXFP4 {name} of a {weight.shape} bank must be uint8 {list(shape)} with contiguous "
                             f"rows, got {tensor.dtype} {list(tensor.shape)}")


def mxfp4_to_float(weight: MXFP4Tensor, expert: int | None = None) -> torch.Tensor:
    """The decoded weights, float32: (experts, rows, cols), or (rows, cols) of one expert."""
    codes = weight.codes if expert is None else weight.codes[expert:expert + 1]
    table = torch.tensor(FP4_VALUES)
    if weight.scales is None:
        blocks = codes.reshape(*codes.shape[:2], -1, GGUF_BLOCK_BYTES)
        scales, qs = blocks[..., 0], blocks[..., 1:]
        values = torch.cat([table[(qs & 15).long()], table[(qs >> 4).long()]], dim=-1)  # elements j, then j + 16
    else:
        scales = weight.scales if expert is None else weight.scales[expert:expert + 1]
        values = torch.stack([table[(codes & 15).long()], table[(codes >> 4).long()]], dim=-1).flatten(-2)
    decoded = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127).flatten(-2)
    return decoded if expert is None else decoded[0]


# The activations the experts' products take: "int8" blocks (as llama.cpp's MXFP4 x Q8_0), "bf16" (CPUs
# with AVX512-BF16; for prompts, where it is the fastest), or "float32" as given (exact, slower). The numbers
# are csrc/mxfp4.c's ACTIVATIONS_*.
ACTIVATIONS = {"float32": 0, "int8": 1, "bf16": 2}
# A call takes its prompt activations when its rows average this many a routed expert (a prompt's tokens
# share experts; a decode step's rows meet one expert each).
PROMPT_ROWS_PER_EXPERT = 4


def has_bf16_kernel() -> bool:
    """Whether the native library and this CPU multiply bfloat16 activations (AVX512-BF16)."""
    lib = load()
    return lib is not None and lib.trillm_mxfp4_has_bf16() == 1


def round_activations(x: torch.Tensor, activations: str) -> torch.Tensor:
    """x (..., cols) as the kernel taking `activations` sees it, as float32. int8: per block of 32,
    q = round_half_even(x * (127 / max|x|)) and x ~ q * max|x| / 127, operation for operation as csrc/mxfp4.c's
    quantize_q8_row (llama.cpp's Q8_0 activations, but for its rounding of halves and its scale kept in
    float32, not fp16); bf16: rounded to bfloat16 (to nearest even); float32: as given."""
    if activations == "bf16":
        return x.to(torch.bfloat16).float()
    if activations == "float32":
        return x.float()
    q, d = round_to_int8(x, BLOCK_SIZE)
    return (q * d).flatten(-2)


def check_activations(activations: str, prompt_activations: str, native: bool):
    for name in (activations, prompt_activations):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown expert activations {name!r} (choose from {', '.join(ACTIVATIONS)})")
        if name == "bf16" and native and not has_bf16_kernel():
            raise ValueError("bf16 expert activations need the AVX512-BF16 kernel, which this CPU (or the level "
                             "TRILLM_ISA chose) lacks: use int8 or float32")


def stored_bytes(weight: MXFP4Tensor) -> int:
    return weight.codes.numel() + (0 if weight.scales is None else weight.scales.numel())


class MXFP4Experts(nn.Module):
    """The experts of a layer, by the native kernel straight from the stored blocks: forward(x, groups) with x
    float32 (n, cols) and groups int64 (g, 2) of (expert e, count), x's rows in that order, the first group's
    count of them, then the next's, is x W_e^T + b_e for each row, (n, rows): one call for all the experts
    a layer's tokens are routed to. A decode step reads `experts_per_token` of them.

    `activations` (see ACTIVATIONS) is what x is rounded to first; `prompt_activations` (None: the same)
    for a prompt's calls of PROMPT_ROWS_PER_EXPERT rows or more an expert (`decoding`: a decode step's, one
    new token a sequence, however many sequences run at once, always take `activations`, so that a
    sequence gets the same logits in a batch as alone). int8 is about twice as fast as float32 (whose
    kernel is compute-bound), bf16 a prompt's 1.3-1.5x faster than int8 again, at the cost of that rounding."""

    def __init__(self, weight: MXFP4Tensor, bias: torch.Tensor | None, experts_per_token: int,
                 activations: str = "int8", prompt_activations: str | None = None):
        super().__init__()
        check_mxfp4(weight)
        lib = load()
        if lib is None:
            raise RuntimeError("the native kernels are unavailable; use ReferenceMXFP4Experts instead")
        self.activations, self.prompt_activations = activations, prompt_activations or activations
        check_activations(self.activations, self.prompt_activations, native=True)
        self.weight = weight
        self.bias = None if bias is None else bias.float().contiguous()
        self.num_experts, self.out_features, self.in_features = weight.shape
        codes = weight.codes
        if weight.scales is None:  # GGUF: the scale at byte 0 of each 17-byte block, its codes after it
            base = codes.data_ptr()
            layout = (0, base + 1, GGUF_BLOCK_BYTES, codes.stride(1), codes.stride(0),
                      base, GGUF_BLOCK_BYTES, codes.stride(1), codes.stride(0))
        else:
            scales = weight.scales
            layout = (1, codes.data_ptr(), 16, codes.stride(1), codes.stride(0),
                      scales.data_ptr(), 1, scales.stride(1), scales.stride(0))
        interleaved, *strides = layout
        bias_address = None if self.bias is None else self.bias.data_ptr()
        self._matmuls = {name: functools.partial(lib.trillm_mxfp4_experts, interleaved, ACTIVATIONS[name], *strides,
                                                 *weight.shape, bias_address)
                         for name in {self.activations, self.prompt_activations}}
        self.stored_bytes = stored_bytes(weight)
        self.bytes_per_token = self.stored_bytes * experts_per_token // self.num_experts

    def forward(self, x: torch.Tensor, groups: torch.Tensor, decoding: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the kernel would read past x
            raise ValueError(f"input has {x.shape[-1]} features, this bank takes {self.in_features}")
        x = x.float().contiguous()
        groups = groups.to(torch.int64).contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        prompt = not decoding and x.shape[0] >= PROMPT_ROWS_PER_EXPERT * groups.shape[0]
        matmul = self._matmuls[self.prompt_activations if prompt else self.activations]
        if call(matmul, groups.data_ptr(), groups.shape[0], x.data_ptr(), x.shape[0], y.data_ptr()):
            raise ValueError(f"expert groups {groups.tolist()} for {x.shape[0]} rows: this bank has experts "
                             f"0 to {self.num_experts - 1}, and the counts must sum to the rows")
        return y


class ReferenceMXFP4Experts(nn.Module):
    """MXFP4Experts' reference twin: each expert decoded in PyTorch on every call, then a float32 matmul of
    the activations rounded as the kernel rounds them."""

    def __init__(self, weight: MXFP4Tensor, bias: torch.Tensor | None, experts_per_token: int,
                 activations: str = "int8", prompt_activations: str | None = None):
        super().__init__()
        check_mxfp4(weight)
        self.activations, self.prompt_activations = activations, prompt_activations or activations
        check_activations(self.activations, self.prompt_activations, native=False)
        self.weight = weight
        self.bias = None if bias is None else bias.float()
        self.num_experts, self.out_features, self.in_features = weight.shape
        self.stored_bytes = stored_bytes(weight)
        self.bytes_per_token = self.stored_bytes * experts_per_token // self.num_experts

    def forward(self, x: torch.Tensor, groups: torch.Tensor, decoding: bool = False) -> torch.Tensor:
        prompt = not decoding and x.shape[0] >= PROMPT_ROWS_PER_EXPERT * groups.shape[0]
        activations = self.prompt_activations if prompt else self.activations
        outputs, first = [], 0
        for expert, count in groups.tolist():
            if not 0 <= expert < self.num_experts or count < 0:
                raise ValueError(f"expert {expert} ({count} rows) of a bank of {self.num_experts}")
            x_group = x[first:first + count]
            x_group = round_activations(x_group, activations)
            outputs.append(F.linear(x_group, mxfp4_to_float(self.weight, expert),
                                    None if self.bias is None else self.bias[expert]))
            first += count
        if first != x.shape[0]:
            raise ValueError(f"expert groups {groups.tolist()} for {x.shape[0]} rows: the counts must sum to the rows")
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.out_features)
