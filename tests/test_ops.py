"""The named native ops equal their PyTorch twins on awkward shapes, on every instruction-set level this
machine runs, and fall back to them where the kernel cannot take the input."""

import pytest
import torch

from trillm.models.layers import KVCache, rope_cos_sin, rope_inverse_frequencies
from trillm.native import build, ops


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 10), (3, 33), (1, 128, 96)])
def test_rms_norm_equals_reference(native_level, shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3
    weight = torch.rand(shape[-1], generator=generator) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), ops.reference_rms_norm(x, weight, 1e-5),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 2 * 6912), (2, 3, 2 * 37), (5, 2)])
def test_squared_relu_glu_equals_reference(native_level, shape):
    generator = torch.Generator().manual_seed(2)
    gate_up = torch.randn(shape, generator=generator) * 3
    gate_up.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    assert torch.equal(ops.squared_relu_glu(gate_up), ops.reference_squared_relu_glu(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(ops.reference_squared_relu_glu(gate_up), torch.relu(gate) ** 2 * up)


@pytest.mark.parametrize("shape", [(1, 2), (3, 7, 66), (1, 1, 3072)])
def test_swiglu_equals_reference(native_level, shape):
    generator = torch.Generator().manual_seed(4)
    gate_up = torch.randn(shape, generator=generator) * 8
    gate_up.view(-1)[:2] = torch.tensor([-100.0, 100.0])[:gate_up.numel()]  # exp overflows and underflows
    out, expected = ops.swiglu(gate_up), ops.reference_swiglu(gate_up)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    gate, up = gate_up.chunk(2, dim=-1)  # the formula, written out
    torch.testing.assert_close(expected, gate / (1 + torch.exp(-gate)) * up)


@pytest.mark.parametrize("tokens, experts, k", [(1, 32, 4), (7, 8, 2), (40, 5, 5), (3, 16, 1)])
def test_routing_equals_reference(native_level, tokens, experts, k):
    generator = torch.Generator().manual_seed(tokens)
    x, logits = torch.randn(tokens, 24, generator=generator), torch.randn(tokens, experts, generator=generator)
    rows, groups, weights, token_of_row = ops.route_to_experts(x, logits, k)
    expected = ops.reference_route_to_experts(x, logits, k)
    assert torch.equal(rows, expected[0]) and torch.equal(groups, expected[1])
    assert torch.equal(token_of_row, expected[3])
    torch.testing.assert_close(weights, expected[2], rtol=1e-6, atol=1e-7)
    y = torch.randn(tokens * k, 24, generator=generator)
    torch.testing.assert_close(ops.combine_experts(y, weights, token_of_row, tokens),
                               ops.reference_combine_experts(y, weights, token_of_row, tokens), rtol=1e-6, atol=1e-6)
    a, b = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    assert torch.equal(ops.interleave(a, b), ops.reference_interleave(a, b))
    assert torch.equal(ops.reference_interleave(a, b)[:, 1::2], b)


def test_add_is_torch_s(native_level):
    """The step a decode plan runs for a residual connection or a bias: the same floats as torch's."""
    a, b = torch.randn(1000), torch.randn(1000)
    out = torch.empty(1000)
    build.load().trillm_add(a.data_ptr(), b.data_ptr(), 1000, out.data_ptr())
    assert torch.equal(out, a + b)


@pytest.mark.parametrize("shape", [(1, 2), (3, 7, 64), (5760,)])
def test_clamped_swiglu_equals_reference(native_level, shape):
    generator = torch.Generator().manual_seed(3)
    gate_up = torch.randn(shape, generator=generator) * 6  # past the limit of 7 now and then
    gate_up.view(-1)[:6] = torch.tensor([float("nan"), 100.0, -100.0, float("nan"), 0.0, -0.0])[:gate_up.numel()]
    out, expected = ops.clamped_swiglu(gate_up, 1.702, 7.0), ops.reference_clamped_swiglu(gate_up, 1.702, 7.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    gate, up = gate_up[..., 0::2].clamp(max=7.0), gate_up[..., 1::2].clamp(-7.0, 7.0)  # the formula, written out
    torch.testing.assert_close(expected, (up + 1) * gate / (1 + torch.exp(-1.702 * gate)), equal_nan=True)


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, position", [
    (1, 9, 3, 64, 0), (1, 9, 3, 64, 37), (2, 6, 6, 10, 300), (1, 4, 1, 24, 2000), (3, 5, 5, 18, 5),
    (1, 20, 5, 128, 90), (2, 4, 2, 80, 33)])
def test_attend_one_token_equals_reference(native_level, batch, heads, kv_heads, head_dim, position):
    generator = torch.Generator().manual_seed(1)
    caches = [KVCache(num_layers=2, batch=batch, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_length=position + 11) for _ in range(2)]
    earlier = torch.randn(2, batch, kv_heads, position, head_dim, generator=generator)
    for cache in caches:  # the positions before this token, as a prefill leaves them
        cache.update(1, earlier[0], earlier[1], 0)
    qkv = torch.randn(batch, 1, heads + 2 * kv_heads, head_dim, generator=generator) * 2
    cos, sin = rope_cos_sin(rope_inverse_frequencies(head_dim, 10000.0), torch.tensor([position]))
    out = ops.attend_one_token(qkv, cos, sin, caches[0].keys[1], caches[0].values[1], position, heads)
    expected = ops.reference_attend_one_token(qkv, cos, sin, caches[1].keys[1], caches[1].values[1], position, heads)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    end = position + 1
    torch.testing.assert_close(caches[0].keys[1][:, :, :end], caches[1].keys[1][:, :, :end], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[0].values[1][:, :, :end], caches[1].values[1][:, :, :end], atol=0, rtol=0)


@pytest.mark.parametrize("window, position", [(4, 2), (4, 3), (4, 9), (128, 300), (None, 40)])
def test_attend_one_token_with_sinks_and_rings_equals_reference(native_level, window, position):
    """gpt-oss: a sink logit per head, and sliding-window layers whose cache is a ring of `window` slots."""
    batch, heads, kv_heads, head_dim = 2, 8, 2, 16
    generator = torch.Generator().manual_seed(3)
    slots = window or position + 5
    caches = [KVCache(1, batch, kv_heads, head_dim, position + 5, [window]) for _ in range(2)]
    for cache in caches:
        filled = torch.randn(2, batch, kv_heads, slots, head_dim, generator=torch.Generator().manual_seed(4))
        cache.keys[0][:], cache.values[0][:] = filled[0][:, :, :cache.keys[0].shape[2]], filled[1][:, :, :cache.keys[0].shape[2]]
    qkv = torch.randn(batch, 1, heads + 2 * kv_heads, head_dim, generator=generator)
    sinks = torch.randn(heads, generator=generator) * 2
    cos, sin = rope_cos_sin(rope_inverse_frequencies(head_dim, 150000.0), torch.tensor([position]), 1.35)
    out = ops.attend_one_token(qkv, cos, sin, caches[0].keys[0], caches[0].values[0], position, heads, sinks, window)
    expected = ops.reference_attend_one_token(qkv, cos, sin, caches[1].keys[0], caches[1].values[0], position, heads,
                                              sinks, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].keys[0], caches[1].keys[0], atol=1e-6, rtol=1e-6)


def test_ops_take_inputs_the_kernels_cannot(native_level):
    """Half precision, and views the kernels cannot read, go to the twins."""
    x = torch.randn(3, 2, 40)[:, 0]  # rows 80 floats apart
    weight = torch.rand(40) + 0.5
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), ops.reference_rms_norm(x, weight, 1e-6))
    gate_up = torch.randn(2, 8).half()
    assert torch.equal(ops.squared_relu_glu(gate_up), ops.reference_squared_relu_glu(gate_up))
