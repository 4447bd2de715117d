"""Our LLaMA logits equal transformers' LlamaForCausalLM on small random configs saved with save_pretrained."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import trillm

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CONFIGS = {
    # name: (config overrides, dtype the checkpoint is saved in)
    "mha-untied": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                        tie_word_embeddings=False), torch.float32),
    "gqa3-odd-heads-head_dim-10-tied": (dict(hidden_size=90, num_attention_heads=9, num_key_value_heads=3,
                                             intermediate_size=130, tie_word_embeddings=True), torch.float32),
    "gqa4-head_dim-24-llama3-rope": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                          intermediate_size=80, rope_parameters=LLAMA3_ROPE, max_position_embeddings=256,
                                          tie_word_embeddings=False), torch.float32),
    "bf16-checkpoint": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                             tie_word_embeddings=True), torch.bfloat16),
}


def save_random_llama(folder, overrides: dict, dtype=torch.float32, seed=0, **save_options):
    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": 101, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
                            "max_position_embeddings": 128, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1; random norms test that we read them
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(folder, **save_options)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    overrides, dtype = CONFIGS[name]
    reference = save_random_llama(tmp_path, overrides, dtype)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    ours = trillm.load(tmp_path).forward(ids)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_cached_decode_matches_full_forward(tmp_path):
    """Prefill + one-token decode steps through the KV cache give the full forward's logits."""
    save_random_llama(tmp_path, CONFIGS["gqa3-odd-heads-head_dim-10-tied"][0])
    network = trillm.load(tmp_path).network
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = network(ids)
        cache = network.new_cache(1, 64)
        steps = [network(ids[:, :12], cache, 0)]
        steps += [network(ids[:, i : i + 1], cache, i) for i in range(12, 16)]
        steps.append(network(ids[:, 16:], cache, 16))  # a multi-token chunk after cached positions
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    reference = save_random_llama(tmp_path, CONFIGS["mha-untied"][0], max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.arange(0, 100, 7)[None]
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(trillm.load(tmp_path).forward(ids), expected, atol=1e-4, rtol=1e-4)


def test_folder_without_tokenizer_runs_forward_only(tmp_path):
    save_random_llama(tmp_path, CONFIGS["mha-untied"][0])
    model = trillm.load(tmp_path)
    assert model.tokenizer is None
    assert model.forward(torch.tensor([[1, 2, 3]])).shape == (1, 3, 101)
    with pytest.raises(trillm.errors.TrillmError, match="no tokenizer"):
        model.generate("hello")
