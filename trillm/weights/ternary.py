"""Ternary weights of BitNet b1.58 ("The Era of 1-bit LLMs", Ma et al. 2024) as the released checkpoints
store them, with transformers' arithmetic (integrations/bitnet.py: pack_weights, unpack_weights, BitLinear).

Layout: uint8 (out_features / 4, in_features); the 2-bit code of a weight is w + 1 (00 = -1, 01 = 0,
10 = +1, 11 is invalid) and packed row r holds original rows r, r + R, r + 2R, r + 3R (R = out / 4) in
bits 0-1, 2-3, 4-5, 6-7. One float scale per projection (`weight_scale`), or one per row once q/k/v or
gate/up are fused.

Arithmetic: each token is quantized to int8 with its own scale 127 / max|x|; the int8 activations times
the ternary weights are summed as integers; one rescale y = sum / (act_scale * weight_scale). In float32
those sums are exact (products of |x| <= 127 and |w| <= 1, fewer than 2^24 / 127 columns), so the native
kernel (csrc/ternary.c), which sums in int32 straight from the 2-bit codes, equals transformers exactly.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from trillm.errors import CheckpointError
from trillm.native.build import load
from trillm.weights.ggml import GGMLTensor, fp16_at
from trillm.weights.huge_pages import in_huge_pages
from trillm.weights.linear import NativeLinear

# Beyond this many columns float32 sums of the integer products could round (and int32 lanes overflow).
MAX_IN_FEATURES = 1 << 17

# Blocks of 16 packed rows moved into the kernel's layout at a time (~100 KB of 2B4T's rows).
BLOCKS_PER_TILING = 4

# Columns repacked at a time when fusing weights (a few MB of int8 for 2B4T's gate/up).
COLUMNS_PER_REPACK = 256


@dataclass
class TernaryTensor:
    """A ternary weight as stored: 2-bit codes in the release layout and its scale(s)."""

    packed: torch.Tensor  # uint8 (out_features // 4, in_features)
    scale: torch.Tensor  # float32 (1,) or (out_features,): y = (int8(x) @ W^T) / (act_scale * scale)
    shape: tuple[int, int]  # (out_features, in_features)


# ---- Layout ----------------------------------------------------------------------------------------

def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """int8 values in {-1, 0, 1}, (out, in) with out a multiple of 4 -> uint8 codes (out / 4, in)."""
    out_features = values.shape[0]
    if values.dim() != 2 or out_features % 4:
        raise ValueError(f"ternary weights need 2-D values with rows a multiple of 4, got {tuple(values.shape)}")
    if values.numel() and (values.min() < -1 or values.max() > 1):
        raise ValueError("ternary values must be -1, 0 or 1")
    return pack_codes((values.to(torch.int16) + 1).to(torch.uint8))


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes w + 1 (out, in), out a multiple of 4 -> the packed layout (out / 4, in)."""
    codes = codes.reshape(4, codes.shape[0] // 4, codes.shape[1])
    return codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The packed layout (R, in) -> uint8 codes w + 1 (4R, in); row i * R + r is bits 2i, 2i + 1 of row r."""
    return torch.cat([(packed >> (2 * i)) & 3 for i in range(4)])


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes (R, in) -> int8 values (4R, in), in the row order of `unpack_codes`."""
    return unpack_codes(packed).to(torch.int8) - 1


def tile_ternary(packed: torch.Tensor) -> torch.Tensor:
    """The native kernel's layout of the same bytes (csrc/ternary.c): 64-byte tiles of 16 packed rows by 4
    columns, (blocks, groups, 16, 4) with byte (16b + l, 4g + j) at [b, g, l, j]; zero-padded to whole tiles.
    Filled a band of blocks at a time: the result is allocated first and kept, the small band copies after
    it come and go, so loading 30 layers leaves no holes in the heap behind the kept tiles."""
    packed_rows, columns = packed.shape
    tiles = torch.zeros(-(-packed_rows // 16), -(-columns // 4), 16, 4, dtype=torch.uint8)
    for first in range(0, tiles.shape[0], BLOCKS_PER_TILING):
        rows = packed[first * 16:(first + BLOCKS_PER_TILING) * 16]
        band = torch.zeros(-(-rows.shape[0] // 16) * 16, tiles.shape[1] * 4, dtype=torch.uint8)
        band[:rows.shape[0], :columns] = rows
        tiles[first:first + band.shape[0] // 16] = band.view(-1, 16, tiles.shape[1], 4).transpose(1, 2)
    return tiles


def first_invalid_code(flat: torch.Tensor) -> int:
    """The index of the first byte of flat uint8 codes that holds a code 3 (binary 11), or -1: one pass of
    the native kernel over a checkpoint's codes."""
    lib = load()
    if lib is None:
        return reference_first_invalid_code(flat)
    return lib.trillm_ternary_find_invalid(flat.data_ptr(), flat.numel())


def reference_first_invalid_code(flat: torch.Tensor) -> int:
    invalid = ((flat & (flat >> 1)) & 0x55).nonzero()
    return int(invalid[0]) if len(invalid) else -1


def check_ternary_codes(packed: torch.Tensor, name: str):
    """Raise CheckpointError naming the tensor if any 2-bit code is 3 (binary 11, no ternary value)."""
    flat = packed.contiguous().view(-1)
    first = first_invalid_code(flat)
    if first >= 0:
        packed_row, column = divmod(first, packed.shape[-1])
        byte = int(flat[first])
        bit_pair = next(i for i in range(4) if (byte >> (2 * i)) & 3 == 3)
        row = packed_row + bit_pair * packed.shape[0]
        raise CheckpointError(f"{name}: invalid ternary code 0b11 for the weight at row {row}, column {column} "
                              f"(codes are w + 1: 00 = -1, 01 = 0, 10 = +1)")


def check_ternary(weight: TernaryTensor):
    """Raise ValueError unless the packed codes, scale and shape agree."""
    out_features, in_features = weight.shape
    if out_features % 4:
        raise ValueError(f"ternary weights pack 4 rows a byte; {out_features} output rows are not a multiple of 4")
    if weight.packed.dtype != torch.uint8 or tuple(weight.packed.shape) != (out_features // 4, in_features):
        raise ValueError(f"ternary weight of shape {weight.shape} needs uint8 codes of shape "
                         f"{(out_features // 4, in_features)}, got {weight.packed.dtype} {tuple(weight.packed.shape)}")
    if weight.scale.numel() not in (1, out_features) or not weight.scale.is_floating_point():
        raise ValueError(f"a ternary weight scale has 1 or {out_features} entries, got {tuple(weight.scale.shape)}")
    if not 0 < in_features <= MAX_IN_FEATURES:
        raise ValueError(f"ternary weights take 1 to {MAX_IN_FEATURES} input features, not {in_features}")


def concat_ternary_rows(weights: list[TernaryTensor]) -> TernaryTensor:
    """One weight whose rows are the given weights' rows, in order, each keeping its scale (as a per-row
    vector). The interleaving of the layout depends on the row count, so the codes are repacked, a band
    of columns at a time: the int8 values of a whole fused gate/up would be 4x its packed size."""
    in_features = weights[0].shape[1]
    for weight in weights:
        check_ternary(weight)
        if weight.shape[1] != in_features:
            raise ValueError(f"cannot concatenate rows of ternary weights with {weight.shape[1]} and {in_features} "
                             "columns")
    out_features = sum(weight.shape[0] for weight in weights)
    packed = torch.empty(out_features // 4, in_features, dtype=torch.uint8)
    for start in range(0, in_features, COLUMNS_PER_REPACK):
        columns = slice(start, start + COLUMNS_PER_REPACK)
        packed[:, columns] = pack_codes(torch.cat([unpack_codes(weight.packed[:, columns]) for weight in weights]))
    scale = torch.cat([weight.scale.float().reshape(-1).expand(weight.shape[0]) for weight in weights])
    return TernaryTensor(packed, scale.contiguous(), (out_features, in_features))


# ---- GGUF's ternary block types, repacked into the layout above at load ------------------------------
#
# llama.cpp's TQ2_0 and TQ1_0 (ggml-common.h block_tq2_0 / block_tq1_0, ggml-quants.c dequantize_row_tq*)
# cut each row into blocks of 256 weights, weight = d * (code - 1) with one fp16 d per block (stored last):
# - TQ2_0, 66 bytes: 64 bytes of 2-bit codes; weight 128j + 32k + m is bits 2k, 2k+1 of byte 32j + m.
# - TQ1_0, 54 bytes: base-3 codes, 5 a byte in bytes 0-47 (weight 32k + m is code k of byte m, weight
#   160 + 16k + m code k of byte 32 + m), 4 a byte in bytes 48-51 (weight 240 + 4k + m, code k of byte
#   48 + m). A byte holds its codes as a fraction of 256 so that code k is the integer part of
#   3 * (byte * 3^k mod 256) / 256: one multiply and one shift, no division.
# llama.cpp's converter writes a BitNet projection as TQ blocks whose every d is the matrix's one weight
# scale (an all-zero block has d = 0); rows that are not whole blocks it writes in F16 (w = ±scale or 0).

TERNARY_BLOCK_SIZE = 256
TERNARY_BLOCK_BYTES = {GGMLQuantizationType.TQ2_0: 66, GGMLQuantizationType.TQ1_0: 54}

# Rows decoded at a time: TQ1_0's int32 arithmetic stays a few MB however large the weight.
ROWS_PER_DECODE = 128


def decode_tq2_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TQ2_0 blocks uint8 (n, 66) -> codes uint8 (n, 256) in weight order (weight = d * (code - 1); code 3
    is invalid, llama.cpp would read it as 2) and the blocks' scales d, float32 (n, 1)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    codes = (blocks[:, :64].reshape(-1, 2, 1, 32) >> shifts) & 3  # (n, half j, k, byte m)
    return codes.reshape(-1, TERNARY_BLOCK_SIZE), fp16_at(blocks, 64)


def base3_codes(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 (n, b) bytes of TQ1_0 -> codes 0..2 (n, count * b), code k of every byte before code k + 1's."""
    powers = torch.tensor([1, 3, 9, 27, 81][:count], dtype=torch.int32).view(1, count, 1)
    fractions = (packed.to(torch.int32).unsqueeze(1) * powers) & 255  # (n, k, byte)
    return ((fractions * 3) >> 8).flatten(1)


def decode_tq1_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TQ1_0 blocks uint8 (n, 54) -> codes uint8 (n, 256) in weight order (weight = d * (code - 1)) and the
    blocks' scales d, float32 (n, 1)."""
    codes = torch.cat([base3_codes(blocks[:, :32], 5), base3_codes(blocks[:, 32:48], 5),
                       base3_codes(blocks[:, 48:52], 4)], dim=1)
    return codes.to(torch.uint8), fp16_at(blocks, 52)


TERNARY_BLOCK_DECODERS = {GGMLQuantizationType.TQ2_0: decode_tq2_0, GGMLQuantizationType.TQ1_0: decode_tq1_0}


def ternary_from_gguf(weight: GGMLTensor | torch.Tensor) -> TernaryTensor:
    """A BitNet projection as a GGUF file stores it (TQ2_0 or TQ1_0 blocks, or the float tensor the
    converter falls back to) -> TernaryTensor, once, at load. Raises ValueError unless every weight is
    -1, 0 or +1 times its row's one scale: trillm multiplies with one scale per row (a per-tensor scale when
    all rows agree, as BitNet's weight_scale does), not one per block."""
    rows, columns = weight.shape
    if rows % 4:
        raise ValueError(f"ternary weights pack 4 rows a byte; {rows} rows are not a multiple of 4")
    if isinstance(weight, GGMLTensor):
        if weight.type not in TERNARY_BLOCK_DECODERS:
            raise ValueError(f"{weight.type.name} does not hold ternary weights (BitNet projections in GGUF are "
                             "TQ2_0, TQ1_0, or F16/BF16/F32 with values -s, 0, +s)")
        block_bytes = TERNARY_BLOCK_BYTES[weight.type]
        if columns % TERNARY_BLOCK_SIZE or weight.data.numel() != rows * columns // TERNARY_BLOCK_SIZE * block_bytes:
            raise ValueError(f"{weight.type.name} data does not fit shape {list(weight.shape)}")
        blocks = weight.data.reshape(rows, -1, block_bytes)
        codes = torch.empty(rows, columns, dtype=torch.uint8)
        group_scales = torch.empty(rows, columns // TERNARY_BLOCK_SIZE)
        for start in range(0, rows, ROWS_PER_DECODE):
            chunk = blocks[start:start + ROWS_PER_DECODE]
            chunk_codes, chunk_scales = TERNARY_BLOCK_DECODERS[weight.type](chunk.reshape(-1, block_bytes))
            codes[start:start + len(chunk)] = chunk_codes.view(len(chunk), columns)
            group_scales[start:start + len(chunk)] = chunk_scales.view(len(chunk), -1)
        if codes.max() > 2:
            row, column = (codes > 2).nonzero()[0].tolist()
            raise ValueError(f"invalid {weight.type.name} code 0b11 for the weight at row {row}, column {column}")
    elif weight.is_floating_point():
        weight = weight.float()
        codes, group_scales = (weight.sign() + 1).to(torch.uint8), weight.abs()  # groups of one weight
    else:
        raise ValueError(f"{weight.dtype} does not hold ternary weights")
    return TernaryTensor(pack_codes(codes), row_divisors(codes, group_scales), (rows, columns))


def row_divisors(codes: torch.Tensor, group_scales: torch.Tensor) -> torch.Tensor:
    """TernaryTensor.scale of weights (codes - 1) * the scale of their group (groups: equal runs of columns):
    1 / the row's scale, (1,) when all rows share it, else (rows,). Raises ValueError naming the first row
    whose nonzero weights have different scales. A group of scale 0 holds zeros, whatever its codes."""
    rows, groups = group_scales.shape
    grouped = codes.view(rows, groups, -1)
    zero_scale = group_scales == 0
    if zero_scale.any():
        grouped[zero_scale] = 1
    used = (grouped != 1).any(dim=-1)  # (rows, groups): the groups whose scale matters
    first_used = used.to(torch.uint8).argmax(dim=1, keepdim=True)
    row_scale = group_scales.gather(1, first_used)  # (rows, 1)
    mismatch = (used & (group_scales != row_scale)).nonzero()
    if len(mismatch):
        row, group = mismatch[0].tolist()
        raise ValueError(f"row {row} has weights of scale {row_scale[row, 0]:g} and, from column "
                         f"{group * grouped.shape[-1]}, {group_scales[row, group]:g}: trillm takes one scale per row")
    has_weights = used.any(dim=1)
    scales = row_scale[has_weights, 0]
    if len(scales) == 0:
        return torch.ones(1)
    if (scales == scales[0]).all():
        return 1 / scales[:1]
    return 1 / torch.where(has_weights, row_scale[:, 0], 1.0)


# ---- Quantization, as transformers computes it --------------------------------------------------------

def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) int8 values and scales: transformers' BitLinear.activation_quant."""
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)  # torch: reciprocal(max) * 127
    return (x * scale).round().clamp(-128, 127).to(torch.int8), scale


def ternarize_absmean(weight: torch.Tensor) -> TernaryTensor:
    """A dense master weight to ternary as transformers' AutoBitLinear does online (WeightQuant): scale =
    1 / mean|w|, values round(w * scale) clamped to [-1, 1]; the weight it stands for is values / scale."""
    weight = weight.float()
    scale = 1.0 / weight.abs().mean().clamp(min=1e-5)
    values = (weight * scale).round().clamp(-1, 1).to(torch.int8)
    return TernaryTensor(pack_ternary(values), scale.reshape(1), tuple(weight.shape))


# ---- Linear layers -----------------------------------------------------------------------------------

class TernaryLinear(NativeLinear):
    """y = x W^T by the native kernel (csrc/ternary.c), from the 2-bit codes retiled once for it; inputs of
    any length (prefill too) go through the kernel."""

    def __init__(self, weight: TernaryTensor, bias: torch.Tensor | None = None):
        check_ternary(weight)
        lib = load()
        if lib is None:
            raise RuntimeError("the native kernels are unavailable; use ReferenceTernaryLinear instead")
        tiles = in_huge_pages(tile_ternary(weight.packed))  # the only copy of the weights this layer keeps
        scale = weight.scale.float().reshape(-1).contiguous()
        matmul = functools.partial(lib.trillm_ternary_matmul, tiles.data_ptr(), *weight.shape, scale.data_ptr(),
                                   scale.numel())
        super().__init__(matmul, weight.shape, bias, tiles.numel() + scale.numel() * 4)
        self.tiles, self.scale = tiles, scale


class ReferenceTernaryLinear(nn.Module):
    """TernaryLinear's reference twin: transformers' BitLinear arithmetic in float32, the codes unpacked on
    every call."""

    def __init__(self, weight: TernaryTensor, bias: torch.Tensor | None = None):
        super().__init__()
        check_ternary(weight)
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.stored_bytes = weight.packed.numel() + weight.scale.numel() * weight.scale.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, act_scale = quantize_activations(x.float())
        y = F.linear(values.float(), unpack_ternary(self.weight.packed).float())  # exact integers
        y = y / (act_scale * self.weight.scale.float())
        return y if self.bias is None else y + self.bias
