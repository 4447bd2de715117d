"""The shared layers' native kernels equal their PyTorch reference twins, on awkward shapes."""

import pytest
import torch
import torch.nn.functional as F

from trillm.models.layers import (
    KVCache,
    RMSNorm,
    attend,
    attend_one_token,
    gated_activation,
    rope_cos_sin,
    rope_inverse_frequencies,
    squared_relu,
)
from trillm.weights import native

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable (no gcc)")


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 10), (3, 33), (1, 128, 96)])
def test_rms_norm_kernel_matches_reference(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3
    norm = RMSNorm(torch.rand(shape[-1], generator=generator) + 0.5, eps=1e-5)
    torch.testing.assert_close(norm(x), norm.reference(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 2 * 6912), (2, 3, 2 * 37), (5, 2)])
def test_squared_relu_glu_kernel_equals_reference(shape):
    generator = torch.Generator().manual_seed(2)
    gate_up = torch.randn(shape, generator=generator) * 3
    gate_up.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(gated_activation(gate_up, squared_relu), squared_relu(gate) * up)
    norm = RMSNorm(torch.rand(shape[-1] // 2, generator=generator) + 0.5, eps=1e-5)  # fused: BitNet's subln
    assert torch.equal(gated_activation(gate_up, squared_relu, norm), norm(squared_relu(gate) * up))


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, position", [
    (1, 9, 3, 64, 0), (1, 9, 3, 64, 37), (2, 6, 6, 10, 300), (1, 4, 1, 24, 2000), (3, 5, 5, 18, 5),
    (1, 20, 5, 128, 90), (2, 4, 2, 80, 33)])
def test_attend_one_token_matches_reference(batch, heads, kv_heads, head_dim, position):
    generator = torch.Generator().manual_seed(1)
    caches = [KVCache(num_layers=2, batch=batch, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_length=position + 11) for _ in range(2)]
    earlier = torch.randn(2, batch, kv_heads, position, head_dim, generator=generator)
    for cache in caches:  # the positions before this token, as a prefill leaves them
        cache.update(1, earlier[0], earlier[1], 0)
    qkv = torch.randn(batch, 1, heads + 2 * kv_heads, head_dim, generator=generator) * 2
    cos, sin = rope_cos_sin(rope_inverse_frequencies(head_dim, 10000.0), torch.tensor([position]))
    norm = RMSNorm(torch.rand(heads * head_dim, generator=generator) + 0.5, eps=1e-5) if batch > 1 else None
    out = attend_one_token(qkv, cos, sin, caches[0], 1, position, heads, norm)
    expected = attend(qkv, cos, sin, caches[1], 1, position, heads, norm)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    end = position + 1
    torch.testing.assert_close(caches[0].keys[1, :, :, :end], caches[1].keys[1, :, :, :end], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[0].values[1, :, :, :end], caches[1].values[1, :, :, :end], atol=0, rtol=0)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain = rope_inverse_frequencies(128, 500000.0)
    scaled = rope_inverse_frequencies(128, 500000.0, scaling)
    wavelength = 2 * torch.pi / plain
    assert torch.equal(scaled[wavelength < 8192 / 4], plain[wavelength < 8192 / 4])
    torch.testing.assert_close(scaled[wavelength > 8192], plain[wavelength > 8192] / 8)
    band = (wavelength >= 8192 / 4) & (wavelength <= 8192)
    assert band.any() and torch.all(scaled[band] < plain[band]) and torch.all(scaled[band] > plain[band] / 8)
