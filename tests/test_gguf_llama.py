"""GGUF llama files written here the way llama.cpp's converter writes them (q/k rows permuted for its
rope, block-quantized projections): our logits equal transformers' loading the same file."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import trillm
from trillm.weights.ggml import quantize_q6_k

from test_llama import save_random_llama

Q = gguf.GGMLQuantizationType


def llama_cpp_rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf order for q/k rows: each head's two halves interleaved."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(path, model, types: dict, tied: bool):
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}

    def add(name, array, qtype):
        if qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.Q6_K:  # the gguf package has no Q6_K quantizer
            writer.add_tensor(name, quantize_q6_k(torch.from_numpy(array)).data.numpy(), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"], types["embedding"])
    add("output_norm.weight", state["model.norm.weight"], Q.F32)
    if not tied:
        add("output.weight", state["lm_head.weight"], types["embedding"])
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}"
        q = llama_cpp_rope_permute(state[f"{hf}.self_attn.q_proj.weight"], config.num_attention_heads)
        k = llama_cpp_rope_permute(state[f"{hf}.self_attn.k_proj.weight"], config.num_key_value_heads)
        add(f"blk.{i}.attn_norm.weight", state[f"{hf}.input_layernorm.weight"], Q.F32)
        add(f"blk.{i}.attn_q.weight", q, types["attention"])
        add(f"blk.{i}.attn_k.weight", k, types["attention"])
        add(f"blk.{i}.attn_v.weight", state[f"{hf}.self_attn.v_proj.weight"], types.get("value", types["attention"]))
        add(f"blk.{i}.attn_output.weight", state[f"{hf}.self_attn.o_proj.weight"], types["attention"])
        add(f"blk.{i}.ffn_norm.weight", state[f"{hf}.post_attention_layernorm.weight"], Q.F32)
        add(f"blk.{i}.ffn_gate.weight", state[f"{hf}.mlp.gate_proj.weight"], types["ffn"])
        add(f"blk.{i}.ffn_up.weight", state[f"{hf}.mlp.up_proj.weight"], types.get("up", types["ffn"]))
        add(f"blk.{i}.ffn_down.weight", state[f"{hf}.mlp.down_proj.weight"], types["ffn"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CASES = {
    "q8_0-q4_0-q4_1-gqa2-untied": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=96, tie_word_embeddings=False),
                                   {"embedding": Q.Q8_0, "attention": Q.Q4_0, "ffn": Q.Q4_1}),
    "f32-q8_0-gqa1-tied": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6,
                                intermediate_size=160, tie_word_embeddings=True),
                           {"embedding": Q.F32, "attention": Q.Q8_0, "ffn": Q.Q8_0}),
    "q6_k-gqa2-untied": (dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=512, tie_word_embeddings=False),
                         {"embedding": Q.Q6_K, "attention": Q.Q6_K, "ffn": Q.Q6_K}),
    # Mixed types within a layer, as llama.cpp's Q4_K_M writes them (its value and some up projections in
    # a larger type): q/k/v and gate/up cannot share one matrix.
    "mixed-types-gqa2-tied": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, tie_word_embeddings=True),
                              {"embedding": Q.Q8_0, "attention": Q.Q4_0, "value": Q.Q8_0, "ffn": Q.Q4_1,
                               "up": Q.Q5_0}),
}


def write_case(tmp_path, name):
    """The case's GGUF file, and transformers' model loading it."""
    overrides, types = CASES[name]
    model = save_random_llama(tmp_path / "hf", overrides)
    write_llama_gguf(tmp_path / "model.gguf", model, types, overrides["tie_word_embeddings"])
    return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_logits_match_transformers(tmp_path, name):
    reference = write_case(tmp_path, name)
    ids = torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(trillm.load(tmp_path / "model.gguf").forward(ids), expected, atol=1e-4, rtol=1e-4)


def test_q6_k_keeps_float_activations_unless_the_head_asks(tmp_path):
    """Q6_K tensors of a GGUF file run the float-activation kernel, so that logits stay equal to
    transformers'; --head q6_k moves the file's own Q6_K head to the int8 kernel (no requantization)."""
    reference = write_case(tmp_path, "q6_k-gqa2-untied")
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(3))  # few enough for the kernels
    with torch.no_grad():
        expected = reference(ids).logits
    stored, int8_head = trillm.load(tmp_path / "model.gguf"), trillm.load(tmp_path / "model.gguf", head="q6_k")
    assert not stored.network.head.int8_activations and int8_head.network.head.int8_activations
    assert torch.equal(int8_head.network.head.weight.data, stored.network.head.weight.data)
    torch.testing.assert_close(stored.forward(ids), expected, atol=1e-4, rtol=1e-4)
    difference = int8_head.forward(ids) - expected
    # Measured: max 0.013, rms 0.0029 for logits of std 0.36 (only the activations' rounding: same weights).
    assert 0 < difference.abs().max() < 0.06 * expected.std()
    assert difference.pow(2).mean().sqrt() < 0.015 * expected.std()


def test_header_reader_agrees_with_gguf_package():
    """Our one-pass header parser gives what gguf.GGUFReader gives, on the real SmolLM2 file."""
    from trillm.checkpoint import default_model_path
    from trillm.checkpoint.gguf_file import GGUFCheckpoint
    from trillm.weights.ggml import GGMLTensor

    path = default_model_path()
    ours, reference = GGUFCheckpoint(path), gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    assert {key: value.tolist() if isinstance(value, np.ndarray) else value
            for key, value in ours.metadata.items()} == expected
    assert isinstance(ours.metadata["tokenizer.ggml.token_type"], np.ndarray)  # compact, not a list of ints
    assert ours.names() == [tensor.name for tensor in reference.tensors]
    for tensor in reference.tensors[:12]:
        stored = ours.get(tensor.name)
        data = stored.data if isinstance(stored, GGMLTensor) else stored
        assert np.array_equal(data.contiguous().view(torch.uint8).numpy().ravel(),
                              np.asarray(tensor.data).view(np.uint8).ravel()), tensor.name
        if isinstance(stored, GGMLTensor):
            assert stored.type == tensor.tensor_type
