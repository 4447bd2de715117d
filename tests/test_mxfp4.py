"""MXFP4 experts: our decode of both stored layouts equals transformers' convert_moe_packed_tensors, and the
native kernel equals its reference twin on every instruction-set level this machine runs."""

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from trillm.weights import make_experts, weight_bytes_per_token
from trillm.weights.mxfp4 import (
    ACTIVATIONS,
    GGUF_BLOCK_BYTES,
    MXFP4Experts,
    MXFP4Tensor,
    ReferenceMXFP4Experts,
    check_mxfp4,
    has_bf16_kernel,
    mxfp4_to_float,
    round_activations,
)


def random_bank(experts: int, rows: int, cols: int, seed: int = 0, scales=(110, 135)) -> MXFP4Tensor:
    """Random codes (every nibble value) and scales in a given range, in the Hugging Face layout."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=generator, dtype=torch.uint8)
    scale = torch.randint(*scales, (experts, rows, cols // 32), generator=generator, dtype=torch.uint8)
    return MXFP4Tensor(codes, scale, (experts, rows, cols))


def as_gguf(bank: MXFP4Tensor) -> MXFP4Tensor:
    """The same weights as llama.cpp's converter stores them: the scale byte then the codes with elements j
    and j + 16 in one byte (the release has 2j and 2j + 1)."""
    codes = bank.codes
    low, high = codes & 15, codes >> 4  # elements 2j and 2j + 1
    elements = torch.stack([low, high], dim=-1).flatten(-2)  # (..., 32) in element order
    gguf_codes = elements[..., :16] | (elements[..., 16:] << 4)
    blocks = torch.cat([bank.scales.unsqueeze(-1), gguf_codes], dim=-1)
    experts, rows, cols = bank.shape
    return MXFP4Tensor(blocks.reshape(experts, rows, cols // 32 * GGUF_BLOCK_BYTES).contiguous(), None, bank.shape)


def test_decode_equals_transformers():
    bank = random_bank(3, 10, 96, scales=(0, 255))  # every scale but 255 (NaN in the spec), 2^-127 included
    expected = convert_moe_packed_tensors(bank.codes, bank.scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(mxfp4_to_float(bank), expected)
    assert torch.equal(mxfp4_to_float(as_gguf(bank)), expected)
    assert torch.equal(mxfp4_to_float(bank, 2), expected[2])


def test_bad_banks_are_refused():
    bank = random_bank(2, 4, 64)
    check_mxfp4(bank)
    for broken in (MXFP4Tensor(bank.codes, bank.scales, (2, 4, 96)), MXFP4Tensor(bank.codes[:, :3], bank.scales, bank.shape),
                   MXFP4Tensor(bank.codes.to(torch.int16), bank.scales, bank.shape)):
        with pytest.raises(ValueError, match="MXFP4"):
            check_mxfp4(broken)


@pytest.mark.parametrize("activations", list(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["hf", "gguf"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 11])
def test_kernel_equals_reference(native_level, layout, tokens, activations):
    if activations == "bf16" and not has_bf16_kernel():
        pytest.skip(f"no bf16 kernel at the {native_level} level on this CPU")
    for experts, rows, cols in [(2, 7, 32), (4, 33, 96), (3, 64, 2880), (2, 230, 256)]:  # 230: several row tiles
        bank = random_bank(experts, rows, cols, seed=rows)
        bank = as_gguf(bank) if layout == "gguf" else bank
        bias = torch.randn(experts, rows)
        native = MXFP4Experts(bank, bias, 2, activations)
        reference = ReferenceMXFP4Experts(bank, bias, 2, activations)
        x = torch.randn(tokens, cols)
        # a block whose int8 scale is 1 and whose values are halves: they round to even, as the twin does
        x[0, :32] = torch.arange(32) - 15.5
        x[0, 31] = 127.0
        for expert in range(experts):
            one = torch.tensor([[expert, tokens]])
            expected = reference(x, one)
            scale = (x.abs() @ mxfp4_to_float(bank, expert).abs().T).max().item()
            torch.testing.assert_close(native(x, one), expected, rtol=0, atol=1e-5 * scale)
        # several experts in one call, one of them with no rows, the order the caller's
        counts = [tokens, 0, 2, 9][:experts]
        groups = torch.tensor([[experts - 1 - i, count] for i, count in enumerate(counts)])
        rows = torch.randn(sum(counts), cols)
        expected = reference(rows, groups)
        scale = (rows.abs() @ mxfp4_to_float(bank).abs().amax(0).T).max().item()
        torch.testing.assert_close(native(rows, groups), expected, rtol=0, atol=1e-5 * scale)


def test_prompts_take_the_prompt_activations(native_level):
    """A call of 4 rows or more an expert (a prompt's) takes prompt_activations, a decode step's the others."""
    bank = random_bank(3, 16, 64)
    exact, int8 = ReferenceMXFP4Experts(bank, None, 2, "float32"), ReferenceMXFP4Experts(bank, None, 2, "int8")
    for module in (MXFP4Experts(bank, None, 2, "float32", "int8"), ReferenceMXFP4Experts(bank, None, 2, "float32", "int8")):
        for x, groups, expected in [(torch.randn(2, 64), [[0, 1], [2, 1]], exact),
                                    (torch.randn(3, 64), [[1, 3]], exact),
                                    (torch.randn(9, 64), [[0, 4], [1, 5]], int8)]:
            groups = torch.tensor(groups)
            torch.testing.assert_close(module(x, groups), expected(x, groups), rtol=1e-5, atol=1e-3)
    x = torch.randn(3, 64)
    assert not torch.equal(round_activations(x, "int8"), x) and not torch.equal(round_activations(x, "bf16"), x)
    assert torch.equal(round_activations(x, "bf16"), x.bfloat16().float())


def test_bf16_is_refused_where_there_is_no_kernel(native_level):
    if has_bf16_kernel():
        pytest.skip(f"this CPU has the bf16 kernel at the {native_level} level")
    with pytest.raises(ValueError, match="AVX512-BF16"):
        MXFP4Experts(random_bank(2, 4, 32), None, 1, "int8", "bf16")


def test_every_other_row_of_a_bank_is_a_bank(native_level):
    """The release interleaves gate and up rows in one bank: each half is a view, multiplied as stored."""
    bank, x = random_bank(3, 20, 64), torch.randn(5, 64)
    for half in (0, 1):
        view = MXFP4Tensor(bank.codes[:, half::2], bank.scales[:, half::2], (3, 10, 64))
        for expert in range(3):
            one = torch.tensor([[expert, 5]])
            expected = ReferenceMXFP4Experts(bank, None, 1)(x, one)[:, half::2]
            scale = (x.abs() @ mxfp4_to_float(bank, expert).abs().T).max().item()
            torch.testing.assert_close(MXFP4Experts(view, None, 1)(x, one), expected, rtol=0, atol=1e-5 * scale)
            assert torch.equal(mxfp4_to_float(view, expert), mxfp4_to_float(bank, expert)[half::2])


def test_factory_and_bytes_per_token(native_level):
    bank = random_bank(8, 16, 64)
    experts = make_experts(bank, None, 2)
    assert isinstance(experts, MXFP4Experts)
    assert experts.stored_bytes == 8 * 16 * (2 * 16 + 2) and experts.bytes_per_token == 2 * 16 * (2 * 16 + 2)
    assert weight_bytes_per_token(torch.nn.ModuleList([experts])) == experts.bytes_per_token
    for bad in ([[8, 1]], [[-1, 1]], [[0, 2]], [[0, -1], [1, 2]]):  # no such expert; counts that miss the rows
        for module in (experts, ReferenceMXFP4Experts(bank, None, 2)):
            with pytest.raises(ValueError, match="expert"):
                module(torch.zeros(1, 64), torch.tensor(bad))
