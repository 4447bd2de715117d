"""The shared layers' math: RoPE's frequency scaling; attention with sinks over a sliding window gives the
same outputs whether the sequence comes at once or in pieces through a ring cache."""

import pytest
import torch

from trillm.models.layers import KVCache, rope_cos_sin, rope_inverse_frequencies, self_attention


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


@pytest.mark.parametrize("window, pieces", [(6, [7, 5, 1, 1, 1, 1, 1, 1, 1, 1]), (6, [1] * 20), (6, [20]),
                                            (None, [7, 5, 8]), (3, [2, 9, 9])])
def test_windowed_attention_in_pieces_equals_at_once(window, pieces):
    batch, heads, kv_heads, head_dim, length = 2, 4, 2, 8, sum(pieces)
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, length, heads + 2 * kv_heads, head_dim, generator=generator)
    sinks = torch.randn(heads, generator=generator)
    inv_freq = rope_inverse_frequencies(head_dim, 10000.0)
    at_once = self_attention(qkv, rope_cos_sin(inv_freq, torch.arange(length)), None, 0, 0, heads, sinks, window)
    cache, outputs, start = KVCache(1, batch, kv_heads, head_dim, length + 3, [window]), [], 0
    for piece in pieces:
        rope = rope_cos_sin(inv_freq, torch.arange(start, start + piece))
        outputs.append(self_attention(qkv[:, start:start + piece].contiguous(), rope, cache, 0, start, heads, sinks,
                                      window))
        start += piece
    if window is not None:
        assert cache.keys[0].shape[2] == window  # a ring, not the whole context
    torch.testing.assert_close(torch.cat(outputs, dim=1), at_once, atol=1e-5, rtol=1e-5)
