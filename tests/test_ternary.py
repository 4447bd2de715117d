"""Ternary (BitNet b1.58) weights: our packing equals transformers' pack_weights / unpack_weights and the
release layout; activation and weight quantization equal transformers'; the native kernel, in each
instruction set this CPU runs, equals its reference twin exactly, and both equal transformers' BitLinear
exactly; fused rows, bad codes, bad shapes and the fallback without native kernels."""

import pytest
import torch
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, WeightQuant, pack_weights, unpack_weights

from trillm.errors import CheckpointError
from trillm.native import build
from trillm.weights import can_concat_rows, concat_rows, make_linear, ternary
from trillm.weights.ternary import (
    ReferenceTernaryLinear,
    TernaryLinear,
    TernaryTensor,
    check_ternary_codes,
    pack_ternary,
    quantize_activations,
    ternarize_absmean,
    tile_ternary,
    unpack_ternary,
)

requires_native = pytest.mark.skipif(build.load() is None, reason="the native kernels could not be built")


@pytest.fixture(autouse=True)
def eager_transformers():
    """transformers wraps its BitNet helpers in torch.compile: the same values eagerly, without seconds of
    compiling for every new shape."""
    with torch._dynamo.config.patch(disable=True):
        yield


def random_ternary(out_features: int, in_features: int, scale=None, seed: int = 0) -> TernaryTensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-1, 2, (out_features, in_features), generator=generator, dtype=torch.int8)
    scale = torch.rand(1, generator=generator) + 0.5 if scale is None else torch.as_tensor(scale).float()
    return TernaryTensor(pack_ternary(values), scale.reshape(-1), (out_features, in_features))


def tie_row(length: int) -> torch.Tensor:
    """Activations whose products with their quantization scale are exactly k + 0.5 for even k, where
    rounding half to even (torch.round) and half away from zero differ."""
    absmax = torch.tensor(3.0)
    scale = (1 / absmax) * 127  # as torch computes it
    row = torch.zeros(length)
    row[0] = absmax
    infinity = torch.tensor(float("inf"))
    for i, target in enumerate((0.5, -2.5, 10.5, -64.5, 100.5, 4.5)[: length - 1]):
        up = down = torch.tensor(target) / scale  # that quotient or one of its float32 neighbours
        candidates = [up]
        for _ in range(6):
            up, down = torch.nextafter(up, infinity), torch.nextafter(down, -infinity)
            candidates += [up, down]
        row[i + 1] = next(x for x in candidates if (x * scale).item() == target)
    return row


def activations(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random activations with the rows that stress quantization: ties, all zeros (the 1e-5 floor), tiny,
    huge, one outlier."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    rows = x.view(-1, shape[-1])
    specials = [tie_row(shape[-1]), torch.zeros(shape[-1]), torch.full((shape[-1],), 3e-6),
                torch.full((shape[-1],), -4e5), torch.eye(1, shape[-1]).squeeze(0) * 7]
    for row, special in zip(rows[1:], specials):  # the first row stays random
        row.copy_(special)
    return x


# ---- Layout -------------------------------------------------------------------------------------------

def test_release_layout_bits():
    """The example in transformers' unpack_weights docstring: byte 0b10100001 holds, from bit 0, the codes
    of rows 0, 2, 4, 6 (R = 2) as w + 1."""
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor([[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8)
    assert torch.equal(unpack_ternary(packed), expected)
    assert torch.equal(pack_ternary(expected), packed)


@pytest.mark.parametrize("shape", [(4, 1), (12, 100), (36, 2576), (256, 64)])
def test_pack_unpack_equal_transformers(shape):
    values = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(values)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(unpack_ternary(packed), values)
    assert torch.equal(packed, pack_weights(values.clone()))  # pack_weights adds 1 to its argument in place
    assert torch.equal(unpack_ternary(packed), unpack_weights(packed, dtype=torch.int8))


def test_pack_refuses_bad_values_and_shapes():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(6, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        pack_ternary(torch.full((4, 8), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        make_linear(TernaryTensor(torch.zeros(1, 8, dtype=torch.uint8), torch.ones(1), (6, 8)))
    with pytest.raises(ValueError, match="needs uint8 codes of shape"):
        make_linear(TernaryTensor(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(1), (4, 8)))
    with pytest.raises(ValueError, match="1 or 4 entries"):
        make_linear(TernaryTensor(torch.zeros(1, 8, dtype=torch.uint8), torch.ones(2), (4, 8)))


def test_tiles_are_the_same_bytes_reordered():
    packed = torch.randint(0, 256, (37, 10), dtype=torch.uint8)  # 37 packed rows, 10 columns: both padded
    tiles = tile_ternary(packed)
    assert tiles.shape == (3, 3, 16, 4)
    for b, g, row, column in [(0, 0, 0, 0), (1, 2, 5, 1), (2, 1, 4, 3), (0, 2, 15, 1)]:
        assert tiles[b, g, row, column] == packed[16 * b + row, 4 * g + column]
    assert tiles[2, 0, 5:].eq(0).all() and tiles[:, 2, :, 2:].eq(0).all()  # the padding


@pytest.mark.parametrize("use_native", [True, False])
def test_code_11_is_a_checkpoint_error_naming_the_tensor(use_native, monkeypatch):
    if use_native and build.load() is None:
        pytest.skip("the native kernels could not be built")
    if not use_native:
        monkeypatch.setattr(ternary, "load", lambda: None)
    valid = pack_ternary(torch.randint(-1, 2, (12, 30), dtype=torch.int8))
    check_ternary_codes(valid, "model.layers.0.mlp.down_proj.weight")  # valid codes pass
    for bit_pair in range(4):
        packed = valid.clone()
        packed[1, 7] |= 0b11 << (2 * bit_pair)  # packed row 1 holds rows 1, 4, 7, 10
        with pytest.raises(CheckpointError, match=rf"model\.layers\.0\.mlp\.down_proj\.weight: .*0b11.* "
                                                  rf"row {1 + 3 * bit_pair}, column 7"):
            check_ternary_codes(packed, "model.layers.0.mlp.down_proj.weight")


# ---- Quantization, as transformers does it ----------------------------------------------------------------

def test_quantize_activations_equals_transformers():
    x = activations(4, 3, 200)
    values, scale = quantize_activations(x)
    expected_values, expected_scale = BitLinear(200, 8, bias=False, dtype=torch.float32).activation_quant(x)
    assert values.dtype == torch.int8 and torch.equal(values, expected_values)
    assert torch.equal(scale, expected_scale)


def test_native_quantizer_equals_reference(native_level):
    x = activations(12, 2576 + 3, seed=1)
    values, scales = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0])
    build.load().trillm_ternary_quantize(x.data_ptr(), x.shape[0], x.shape[1], values.data_ptr(), scales.data_ptr())
    expected_values, expected_scales = quantize_activations(x)
    assert torch.equal(values, expected_values) and torch.equal(scales, expected_scales.squeeze(-1))


def test_ternarize_absmean_equals_transformers_online_quantization():
    weight = torch.randn(36, 100, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[3, 5] = 1.0  # an outlier: clamped to 1
    ternary_weight = ternarize_absmean(weight.to(torch.bfloat16))
    assert ternary_weight.shape == (36, 100) and ternary_weight.scale.shape == (1,)
    values = unpack_ternary(ternary_weight.packed)
    assert set(values.unique().tolist()) == {-1, 0, 1}
    # WeightQuant gives values / scale: the same ternary values and scale, dequantized
    expected = WeightQuant.apply(weight.to(torch.bfloat16).float())
    assert torch.equal(values.float() / ternary_weight.scale, expected)


# ---- Linear layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 3, 8, 33, 128])
def test_kernel_equals_reference_exactly(native_level, tokens):
    # rows: one packed row, a partial tile, more than one tile; columns: below and off any vector width
    for out_features, in_features in [(4, 100), (12, 3), (36, 2560 + 16), (68, 257), (132, 64)]:
        weight = random_ternary(out_features, in_features, seed=out_features + in_features)
        x = activations(tokens, in_features, seed=tokens)
        layer = TernaryLinear(weight)
        assert (layer.out_features, layer.in_features) == (out_features, in_features)
        assert torch.equal(layer(x), ReferenceTernaryLinear(weight)(x)), (out_features, in_features)


@requires_native
def test_threads_and_token_blocks_do_not_change_results():
    weight = random_ternary(256, 6000, scale=torch.rand(256) + 0.5)  # large enough to split over threads
    x = activations(2, 50, 6000)  # 100 tokens of 6000 columns: two blocks of tokens
    layer, expected = make_linear(weight), ReferenceTernaryLinear(weight)(x)
    assert isinstance(layer, TernaryLinear)
    for threads in (1, 2, 3):
        build.set_num_threads(threads)
        y = layer(x)
        assert y.shape == (2, 50, 256) and torch.equal(y, expected)
    build.set_num_threads(0)


@pytest.mark.parametrize("use_native", [True, False])
def test_linear_equals_transformers_bitlinear(use_native):
    if use_native and build.load() is None:
        pytest.skip("the native kernels could not be built")
    weight = random_ternary(48, 320, scale=[0.37])
    reference = BitLinear(320, 48, bias=False, dtype=torch.float32)
    reference.weight.copy_(weight.packed)
    reference.weight_scale.copy_(weight.scale)
    layer = (TernaryLinear if use_native else ReferenceTernaryLinear)(weight)
    x = activations(2, 5, 320)
    assert torch.equal(layer(x), reference(x))


@requires_native
def test_linear_equals_transformers_autobitlinear_online():
    """AutoBitLinear quantizes a master weight on the fly and multiplies dequantized floats: the same
    products, summed with float rounding, so equal up to float32 error."""
    reference = AutoBitLinear(256, 64, bias=False, dtype=torch.float32, online_quant=True)
    torch.nn.init.normal_(reference.weight, std=0.02)
    x = activations(7, 256)
    expected = reference(x).detach()
    actual = make_linear(ternarize_absmean(reference.weight.detach()))(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@requires_native
def test_concat_rows_keeps_each_scale():
    q, k, v = (random_ternary(rows, 100, scale=[scale], seed=rows) for rows, scale in ((12, 0.5), (4, 2.0), (8, 3.25)))
    fused = concat_rows([q, k, v])
    assert isinstance(fused, TernaryTensor) and fused.shape == (24, 100) and fused.scale.shape == (24,)
    assert torch.equal(unpack_ternary(fused.packed), torch.cat([unpack_ternary(w.packed) for w in (q, k, v)]))
    x = activations(5, 100)
    separate = torch.cat([ReferenceTernaryLinear(w)(x) for w in (q, k, v)], dim=-1)
    assert torch.equal(make_linear(fused)(x), separate)
    assert torch.equal(ReferenceTernaryLinear(fused)(x), separate)
    assert torch.equal(make_linear(concat_rows([fused, q]))(x), torch.cat([separate, separate[:, :12]], dim=-1))

    assert not can_concat_rows([q, torch.zeros(4, 100)])
    with pytest.raises(ValueError, match="formats and columns must match"):
        concat_rows([q, random_ternary(4, 96)])


@requires_native
def test_layer_refuses_wrong_input_width():
    with pytest.raises(ValueError, match="this layer takes 100"):
        make_linear(random_ternary(4, 100))(torch.zeros(2, 99))


@requires_native
def test_factory_falls_back_to_reference_twin(fresh_native, monkeypatch):
    weight, x = random_ternary(36, 130), activations(3, 130)
    expected = make_linear(weight)(x)
    monkeypatch.setenv("TRILLM_ISA", "reference")
    build.load.cache_clear()
    layer = make_linear(weight)
    assert isinstance(layer, ReferenceTernaryLinear) and torch.equal(layer(x), expected)
    with pytest.raises(RuntimeError, match="unavailable"):
        ternary.TernaryLinear(weight)
