"""GGML block formats as GGUF files store them: block layouts, a pure-PyTorch reference decoder, and the
linear layer that multiplies straight from the blocks.

Layouts follow llama.cpp (block_* in ggml-common.h, dequantize_row_* in ggml-quants.c). The reference
decoders compute what the gguf package's numpy dequantizer (gguf.quants.dequantize) computes, in the same
order of operations; transformers uses that one to load GGUF files, so matching it keeps our greedy
tokens equal to transformers'. The native kernels (csrc/ggml.c) keep the activations float32 for the
same reason; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K also have kernels that compute as llama.cpp
does, from int8 activations (`int8_activations`: the output heads re-stored in Q6_K, head.py, and
`--activations int8`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from trillm.weights.huge_pages import empty_rows
from trillm.weights.linear import KERNEL_MAX_TOKENS, RowEmbedding, RowLinear, prompt_linear, round_to_int8


@dataclass
class GGMLTensor:
    """A 2-D weight exactly as a GGUF file stores it: one row of blocks per output row."""

    type: GGMLQuantizationType
    data: torch.Tensor  # uint8 (rows, bytes_per_row), usually a view of the memory-mapped file
    shape: tuple[int, int]  # logical (rows, cols) = (out_features, in_features)


Q = GGMLQuantizationType

# (weights per block, bytes per block) of the types we decode.
BLOCK_LAYOUTS: dict[GGMLQuantizationType, tuple[int, int]] = {
    Q.Q8_0: (32, 34),  # fp16 d, 32 x int8
    Q.Q4_0: (32, 18),  # fp16 d, 16 bytes of nibbles
    Q.Q4_1: (32, 20),  # fp16 d, fp16 m, 16 bytes of nibbles
    Q.Q5_0: (32, 22),  # fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles
    Q.Q5_1: (32, 24),  # fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of nibbles
    Q.Q4_K: (256, 144),  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    Q.Q5_K: (256, 176),  # as Q4_K, with 32 bytes of fifth bits before the nibbles
    Q.Q6_K: (256, 210),  # 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d
}


# ---- Reference decoders: uint8 blocks (n, bytes per block) -> float32 weights (n, weights per block) ----

def fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 scale at this byte offset of each block, as float32 (n, 1)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) values: byte j holds weight j in its low nibble and j + 16 in its high."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes, a little-endian uint32 whose bit j belongs to weight j -> (n, 32) values 0 or 16."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).flatten(1)


def decode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float() * fp16_at(blocks, 0)


def decode_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return fp16_at(blocks, 0) * (nibbles(blocks[:, 2:]).float() - 8)


def decode_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return fp16_at(blocks, 0) * nibbles(blocks[:, 4:]).float() + fp16_at(blocks, 2)


def decode_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 6:]) | fifth_bits(blocks[:, 2:6])
    return fp16_at(blocks, 0) * (q.float() - 16)


def decode_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 8:]) | fifth_bits(blocks[:, 4:8])
    return fp16_at(blocks, 0) * q.float() + fp16_at(blocks, 2)


def k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> the 6-bit scale and min of each of the 8 sub-blocks, (n, 8) each.

    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 put their low
    4 bits in bytes 8-11 (scale low, min high nibble) and their top 2 bits in the top bits of bytes 0-7.
    """
    low, high, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 63, (extra & 15) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([high & 63, (extra >> 4) | ((high >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): sub-blocks 2k and 2k + 1 are the low and high nibbles of bytes 32k.."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32)


def decode_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = k_scales_mins(blocks[:, 4:16])
    scale = (fp16_at(blocks, 0) * scales).unsqueeze(-1)  # (n, 8, 1)
    offset = (fp16_at(blocks, 2) * mins).unsqueeze(-1)
    return (scale * k_nibbles(blocks[:, 16:]).float() - offset).flatten(1)


def decode_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = k_scales_mins(blocks[:, 4:16])
    scale = (fp16_at(blocks, 0) * scales).unsqueeze(-1)
    offset = (fp16_at(blocks, 2) * mins).unsqueeze(-1)
    # Bit s of byte j of the 32 fifth-bit bytes belongs to weight j of sub-block s.
    sub_blocks = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = ((blocks[:, 16:48].unsqueeze(1) >> sub_blocks) & 1) << 4
    q = k_nibbles(blocks[:, 48:]) | high
    return (scale * q.float() - offset).flatten(1)


def q6_k_integers(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks (n, 210) -> the codes minus 32 (n, 16, 16) and the int8 scale of each 16 weights (n, 16),
    as float32. w = d * scale * (code - 32), d the fp16 at byte 208."""
    # Each half of 128 weights is 4 quarters of 32: quarters 0, 1 are the low nibbles of the half's 64
    # bytes (first 32, last 32), quarters 2, 3 their high nibbles; quarter k adds bits 2k, 2k+1 of the
    # half's 32 high-bit bytes as bits 4 and 5.
    low_bytes = blocks[:, :128].reshape(-1, 2, 1, 2, 32)
    low = torch.cat([low_bytes & 15, low_bytes >> 4], dim=2).reshape(-1, 2, 4, 32)
    quarter_shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(-1, 2, 1, 32) >> quarter_shifts) & 3) << 4
    return (low | high).reshape(-1, 16, 16).float() - 32, blocks[:, 192:208].view(torch.int8).float()


def decode_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    q, scales = q6_k_integers(blocks)
    scale = fp16_at(blocks, 208) * scales  # one per 16 weights
    return (scale.unsqueeze(-1) * q).flatten(1)


DECODERS = {
    Q.Q8_0: decode_q8_0, Q.Q4_0: decode_q4_0, Q.Q4_1: decode_q4_1, Q.Q5_0: decode_q5_0, Q.Q5_1: decode_q5_1,
    Q.Q4_K: decode_q4_k, Q.Q5_K: decode_q5_k, Q.Q6_K: decode_q6_k,
}


# ---- Quantizer: dense weights -> Q8_0 blocks ---------------------------------------------------------

Q8_0_BLOCK_SIZE = 32


def quantize_q8_0(weight: torch.Tensor, rows_done: Callable[[int, int], None] | None = None) -> GGMLTensor:
    """Q8_0 blocks of a dense (rows, cols) weight, byte for byte what `gguf.quants.quantize(w, Q8_0)` and
    llama.cpp's quantize_row_q8_0_ref write: per 32 weights, d = absmax / 127 stored as fp16, and
    round-half-away-from-zero(w * (1 / d)) as int8, all in float32 and in their order of operations.
    Works through ~1 MB of float32 at a time: the passes stay in cache (4x faster than 40 MB chunks on
    the 2B4T embedding, 2.3 s), and a 128k-row embedding never needs a float32 copy of itself.
    `rows_done(start, end)` is called after each chunk: a loader can drop those rows' file pages there, so
    that the source and its quantized copy are never resident whole at once.
    """
    rows, cols = weight.shape
    if cols % Q8_0_BLOCK_SIZE:
        raise ValueError(f"Q8_0 rows hold blocks of {Q8_0_BLOCK_SIZE} weights; {cols} columns do not fit")
    block_bytes = BLOCK_LAYOUTS[Q.Q8_0][1]
    data = empty_rows(rows, cols // Q8_0_BLOCK_SIZE * block_bytes)
    rows_per_chunk = max(1, (1 << 18) // cols)
    for start in range(0, rows, rows_per_chunk):
        chunk = weight[start:start + rows_per_chunk]
        blocks = chunk.float().reshape(-1, Q8_0_BLOCK_SIZE)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        scaled = blocks * torch.where(d == 0, 0.0, 1 / d)
        # gguf's np_roundf: rounds halves away from zero (torch.round would round them to even).
        magnitude = scaled.abs()
        floored = magnitude.floor()
        q = scaled.sign() * (floored + (2 * (magnitude - floored)).floor())
        quantized = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
        data[start:start + chunk.shape[0]] = quantized.view(chunk.shape[0], -1)
        if rows_done is not None:
            rows_done(start, start + chunk.shape[0])
    return GGMLTensor(Q.Q8_0, data, (rows, cols))


Q6_K_BLOCK_SIZE = 256


def quantize_q6_k(weight: torch.Tensor, rows_done: Callable[[int, int], None] | None = None) -> GGMLTensor:
    """Q6_K blocks of a dense (rows, cols) weight, as llama.cpp's quantize_row_q6_K_ref lays them out.

    Per 16 weights a scale = (the weight of largest magnitude) / -32, so that weight lands on the code
    -32 (-32..31 is the range); per 256 weights d = (the scale of largest magnitude) / -128 in fp16, and
    each scale as round(scale / d) in int8; then every weight is rounded anew to its stored scale d * s.
    llama.cpp picks each 16-weight scale by a search of 19 candidates around that one (make_qx_quants,
    minimizing a w^2-weighted error): 4-6% lower rms error (0.0177 instead of 0.0188 of the weights' rms on
    Gaussian weights, 0.0216 instead of 0.0225 on SmolLM2's trained embedding) for 7x the time, about
    half a minute for 2B4T's head at every load. Chunks and `rows_done` as in quantize_q8_0.
    """
    rows, cols = weight.shape
    if cols % Q6_K_BLOCK_SIZE:
        raise ValueError(f"Q6_K rows hold blocks of {Q6_K_BLOCK_SIZE} weights; {cols} columns do not fit")
    data = empty_rows(rows, cols // Q6_K_BLOCK_SIZE * BLOCK_LAYOUTS[Q.Q6_K][1])
    rows_per_chunk = max(1, (1 << 18) // cols)
    for start in range(0, rows, rows_per_chunk):
        chunk = weight[start:start + rows_per_chunk]
        w = chunk.float().reshape(-1, 16, 16)  # (blocks, sub-blocks, weights)
        scales = signed_absmax(w).squeeze(-1) / -32  # (blocks, 16)
        max_scale = signed_absmax(scales)
        d = torch.where(max_scale == 0, 0.0, max_scale / -128).to(torch.float16)
        s = (scales * torch.where(max_scale == 0, 0.0, -128 / max_scale)).round().clamp(max=127)
        step = (d.float() * s).unsqueeze(-1)
        q = torch.where(step == 0, 0.0, w / step).round().clamp(-32, 31).to(torch.uint8) + 32
        data[start:start + chunk.shape[0]] = pack_q6_k(q, s.to(torch.int8), d).view(chunk.shape[0], -1)
        if rows_done is not None:
            rows_done(start, start + chunk.shape[0])
    return GGMLTensor(Q.Q6_K, data, (rows, cols))


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dimension, with its sign, keeping that dimension."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def pack_q6_k(q: torch.Tensor, scales: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes (blocks, 16, 16) uint8 0..63, int8 scales (blocks, 16), fp16 d (blocks, 1) -> (blocks, 210) bytes,
    the layout decode_q6_k reads."""
    halves = q.reshape(-1, 2, 2, 64)  # each half of 128 weights: ql byte j holds weights j and j + 64
    low = (halves[:, :, 0] & 15) | ((halves[:, :, 1] & 15) << 4)
    quarters = (q.reshape(-1, 2, 4, 32) >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = quarters[:, :, 0] | quarters[:, :, 1] | quarters[:, :, 2] | quarters[:, :, 3]  # quarter k: bits 2k, 2k+1
    return torch.cat([low.flatten(1), high.flatten(1), scales.view(torch.uint8), d.view(torch.uint8)], dim=1)


def check_layout(weight: GGMLTensor):
    """Raise ValueError unless the weight is a 2-D GGML tensor of a type we decode, with consistent sizes."""
    if weight.type not in BLOCK_LAYOUTS:
        supported = ", ".join(t.name for t in BLOCK_LAYOUTS)
        raise ValueError(f"GGML type {weight.type.name} is not supported (supported: {supported})")
    block_elems, block_bytes = BLOCK_LAYOUTS[weight.type]
    rows, cols = weight.shape
    if cols % block_elems:
        raise ValueError(f"{weight.type.name} rows hold blocks of {block_elems} weights; {cols} columns do not fit")
    expected = (rows, cols // block_elems * block_bytes)
    if weight.data.dtype != torch.uint8 or tuple(weight.data.shape) != expected:
        raise ValueError(f"{weight.type.name} weight of shape {weight.shape} needs uint8 data of shape {expected}, "
                         f"got {weight.data.dtype} {tuple(weight.data.shape)}")


def dequantize_ggml(weight: GGMLTensor) -> torch.Tensor:
    """Reference decode of the whole weight: float32 (rows, cols)."""
    check_layout(weight)
    block_elems, block_bytes = BLOCK_LAYOUTS[weight.type]
    blocks = weight.data.reshape(-1, block_bytes)
    return DECODERS[weight.type](blocks).reshape(weight.shape)


def concat_ggml_rows(weights: list[GGMLTensor]) -> GGMLTensor:
    """One weight whose rows are the given weights' rows, in order (to fuse q/k/v or gate/up)."""
    first = weights[0]
    for weight in weights:
        if weight.type != first.type or weight.shape[1] != first.shape[1]:
            raise ValueError(f"cannot concatenate rows of {weight.type.name} {weight.shape} "
                             f"and {first.type.name} {first.shape}: types and columns must match")
    rows = sum(weight.shape[0] for weight in weights)
    return GGMLTensor(first.type, torch.cat([weight.data for weight in weights]), (rows, first.shape[1]))


# ---- Int8 activations, as llama.cpp computes ---------------------------------------------------------------

# The block each type's activations are quantized in for its int8-activation kernel (csrc/ggml.c): every
# type of BLOCK_LAYOUTS has one.
INT8_ACTIVATION_BLOCKS = {Q.Q8_0: 32, Q.Q4_0: 32, Q.Q4_1: 32, Q.Q5_0: 32, Q.Q5_1: 32, Q.Q4_K: 256, Q.Q5_K: 256,
                         Q.Q6_K: Q6_K_BLOCK_SIZE}
# The types whose int8 kernel also takes prompts of any length: faster there than decoding the weights for
# torch's float32 matmul. Q8_0, Q4_0 and Q4_1 have a GEMM over repacked panels for prompts (csrc/ggml.c;
# measured, one Zen 4 core, 3072 x 576, 128 tokens: 270 GOPS, 1.8-2x the row kernel), Q6_K's row kernel is
# 2.5-2.9x the float matmul; Q4_K's and Q5_K's 0.85-1.0x, so they keep the float matmul for prompts.
INT8_PROMPT_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q6_K)


def takes_int8(weight: GGMLTensor, int8_activations: bool, tokens: int) -> bool:
    """Whether a matmul of this many tokens multiplies int8 activations (see INT8_PROMPT_TYPES)."""
    return int8_activations and (tokens <= KERNEL_MAX_TOKENS or weight.type in INT8_PROMPT_TYPES)


def int8_matmul(weight: GGMLTensor, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T as the int8 kernels compute it: Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 (as llama.cpp's
    vec_dot_q8_0_q8_0, q4_0_q8_0, q4_1_q8_1, q5_0_q8_0, q5_1_q8_1) with x quantized per 32, Q4_K and Q5_K
    (vec_dot_q4_K_q8_K, q5_K_q8_K) per 256, and the weights as decoded, in float64, so that only the kernel's
    float32 rounding separates the two; Q6_K by q6_k_int8_matmul."""
    if weight.type == Q.Q6_K:
        return q6_k_int8_matmul(weight, x)
    q, d = round_to_int8(x.reshape(-1, weight.shape[1]), INT8_ACTIVATION_BLOCKS[weight.type])
    y = F.linear((q * d).flatten(-2).double(), dequantize_ggml(weight).double()).float()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def q6_k_int8_matmul(weight: GGMLTensor, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T as the int8 kernel computes it (csrc/ggml.c, as llama.cpp's ggml_vec_dot_q6_K_q8_K): x
    quantized per 256 (round_to_int8), each block's integer sum of code * scale * activation, times
    d_w * d_x. The integer sums are exact here (float64), so the kernel differs only by float32 rounding.
    Rows are taken 4096 at a time: a whole 2B4T head in float64 would be 2.6 GB."""
    rows, cols = weight.shape
    x_q, x_d = round_to_int8(x.reshape(-1, cols), Q6_K_BLOCK_SIZE)  # (tokens, blocks, 256), (tokens, blocks, 1)
    y = torch.empty(x_q.shape[0], rows)
    for start in range(0, rows, 4096):
        blocks = weight.data[start:start + 4096].reshape(-1, BLOCK_LAYOUTS[Q.Q6_K][1])
        q, scales = q6_k_integers(blocks)
        integers = (q * scales.unsqueeze(-1)).reshape(-1, cols // Q6_K_BLOCK_SIZE, Q6_K_BLOCK_SIZE)  # (r, blocks, 256)
        totals = torch.einsum("rbk,tbk->trb", integers.double(), x_q.double())
        scale = fp16_at(blocks, 208).view(1, len(integers), -1).double() * x_d.transpose(1, 2).double()
        y[:, start:start + len(integers)] = (totals * scale).sum(dim=-1)
    return y.reshape(*x.shape[:-1], rows)


class GGMLLinear(RowLinear):
    """y = x W^T computed by the native kernel straight from the GGML blocks (csrc/ggml.c). With
    `int8_activations` (every type has an int8 kernel: INT8_ACTIVATION_BLOCKS), up to KERNEL_MAX_TOKENS
    tokens (any number for INT8_PROMPT_TYPES) are quantized to int8 first and the products are integers
    (int8_matmul), at the cost of the activations' rounding."""

    def __init__(self, weight: GGMLTensor, bias: torch.Tensor | None = None, int8_activations: bool = False):
        check_layout(weight)
        super().__init__(int(weight.type), weight.data, weight.shape, bias, int8_activations)
        self.weight = GGMLTensor(weight.type, self.stored, weight.shape)  # over the kernels' copy, if they have one
        self.int8_activations = int8_activations
        if int8_activations and weight.type in INT8_PROMPT_TYPES:
            self.kernel_max_tokens = None


class ReferenceGGMLLinear(nn.Module):
    """GGMLLinear's reference twin: decodes the blocks in PyTorch on every call, then a float32 matmul (or
    int8_matmul where GGMLLinear would run its int8 kernel; a prompt's in bfloat16 with `prompt_bf16`)."""

    prompt_bf16 = False

    def __init__(self, weight: GGMLTensor, bias: torch.Tensor | None = None, int8_activations: bool = False):
        super().__init__()
        check_layout(weight)
        self.weight = weight
        self.bias = bias
        self.int8_activations = int8_activations
        self.out_features, self.in_features = weight.shape
        self.stored_bytes = weight.data.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_int8(self.weight, self.int8_activations, x.numel() // self.in_features):
            y = int8_matmul(self.weight, x)
            return y if self.bias is None else y + self.bias
        prompt = x.numel() // self.in_features > KERNEL_MAX_TOKENS
        return prompt_linear(x.float(), dequantize_ggml(self.weight), self.bias, self.prompt_bf16 and prompt)


class GGMLEmbedding(RowEmbedding):
    """Token embeddings from GGML blocks: the native decoder reads only the looked-up rows."""

    def __init__(self, weight: GGMLTensor):
        check_layout(weight)
        super().__init__(int(weight.type), weight.data, weight.shape)
        self.weight = weight


class ReferenceGGMLEmbedding(nn.Module):
    """GGMLEmbedding's reference twin: the looked-up rows decoded in PyTorch."""

    def __init__(self, weight: GGMLTensor):
        super().__init__()
        check_layout(weight)
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids.reshape(-1), self.weight.data)  # raises for ids out of range, as the kernel does
        decoded = dequantize_ggml(GGMLTensor(self.weight.type, rows, (rows.shape[0], self.embedding_dim)))
        return decoded.view(*ids.shape, self.embedding_dim)
