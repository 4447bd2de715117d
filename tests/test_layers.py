"""The shared layers' native kernels equal their PyTorch reference twins, on awkward shapes."""

import pytest
import torch
import torch.nn.functional as F

from trillm.models.layers import KVCache, RMSNorm, attention_one_token, rope_inverse_frequencies
from trillm.weights import native

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable (no gcc)")


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 10), (3, 33), (1, 128, 96)])
def test_rms_norm_kernel_matches_reference(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3
    norm = RMSNorm(torch.rand(shape[-1], generator=generator) + 0.5, eps=1e-5)
    torch.testing.assert_close(norm(x), norm.reference(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, length", [
    (1, 9, 3, 64, 1), (1, 9, 3, 64, 37), (2, 6, 6, 10, 300), (1, 4, 1, 24, 2000), (3, 5, 5, 17, 5)])
def test_attention_one_token_matches_sdpa(batch, heads, kv_heads, head_dim, length):
    generator = torch.Generator().manual_seed(1)
    cache = KVCache(num_layers=2, batch=batch, num_kv_heads=kv_heads, head_dim=head_dim, max_length=length + 11)
    keys = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    values = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    k, v = cache.update(1, keys, values, 0)  # strided views into the preallocated cache, as in decoding
    q = torch.randn(batch, heads, 1, head_dim, generator=generator) * 2
    expected = F.scaled_dot_product_attention(q, keys, values, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(attention_one_token(q, k, v), expected, atol=1e-5, rtol=1e-5)


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
