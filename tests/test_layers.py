"""The shared layers' math: RoPE's frequency scaling."""

import torch

from trillm.models.layers import rope_inverse_frequencies


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
