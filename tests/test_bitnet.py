"""BitNet b1.58: our logits and greedy tokens equal transformers' BitNetForCausalLM on synthetic checkpoints
written in the release's exact layouts (packed, and the bf16 master weights); the synth presets, the
output head formats, bad checkpoints and the chat command."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import trillm
from trillm.synth.bitnet import BITNET_2B4T_CONFIG, PRESETS, bitnet_config, write_bitnet, write_preset
from trillm.synth.vocabulary import has_llama3_vocabulary
from trillm.engine import Sampling
from trillm.errors import CheckpointError, TrillmError
from trillm.weights.ggml import GGMLTensor, quantize_q8_0

from test_errors import assert_one_line_error, run_cli

needs_vocabulary = pytest.mark.skipif(not has_llama3_vocabulary(), reason="quicktok (Llama 3 vocabulary) missing")

SMALL = dict(vocab_size=101, num_hidden_layers=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
AUTOBITLINEAR_OFFLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
BITLINEAR = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}

CONFIGS = {
    # name: config.json overrides (layout from the quantization_config)
    "mha-autobitlinear-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                                   tie_word_embeddings=True, quantization_config=AUTOBITLINEAR_OFFLINE),
    "gqa3-odd-heads-head_dim-12": dict(hidden_size=108, num_attention_heads=9, num_key_value_heads=3,
                                       intermediate_size=136, tie_word_embeddings=True,
                                       quantization_config=AUTOBITLINEAR_OFFLINE),
    "gqa5-bitlinear-untied": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=1, intermediate_size=120,
                                  tie_word_embeddings=False, quantization_config=BITLINEAR),
}


@pytest.fixture(autouse=True)
def eager_transformers():
    """transformers wraps BitNet's quantizers in torch.compile: the same values eagerly, but seconds of
    compiling for every new shape."""
    with torch._dynamo.config.patch(disable=True):
        yield


def load_reference(folder):
    """transformers' model in float32. With a quantizer active it keeps the unquantized tensors (norms,
    embedding) in their stored bf16 and refuses .float(), so those are cast one by one."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return model


def random_ids(vocab_size: int, shape=(2, 23), seed=1) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def assert_sequences_match(ours: torch.Tensor, expected: torch.Tensor, min_fraction: float = 0.75):
    """Logits (B, T, vocab) equal to ~1e-5, sequence by sequence, for nearly all sequences.

    W1.58A8 rounds every activation to int8 before each projection: a 1e-7 difference upstream (our RMSNorm
    kernel, scaled_dot_product_attention) moves a value across a rounding boundary about once in 10^5
    roundings, which shifts that token's later activations by one int8 step and, through attention, the rest
    of its sequence (~0.1 in the logits). So many short sequences are compared: a wrong layer spoils every
    one of them, a flip one (here 0 to 3 of 16).
    """
    assert ours.shape == expected.shape
    assert expected.std() > 1  # spread logits: a wrong layer cannot hide in a flat output
    close = [torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4) for mine, theirs in zip(ours, expected)]
    assert sum(close) >= min_fraction * len(close), f"{len(close) - sum(close)} of {len(close)} sequences differ"
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(ours, expected, atol=1.0, rtol=0)  # a flip moves logits by ~0.1, not more


def assert_logits_match(folder, vocab_size: int):
    ids = random_ids(vocab_size, (16, 8))
    with torch.no_grad():
        expected = load_reference(folder)(ids).logits
    assert_sequences_match(trillm.load(folder, head="bf16").forward(ids), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_logits_match_transformers(tmp_path, name):
    write_bitnet(tmp_path, bitnet_config(**SMALL, **CONFIGS[name]), tokenizer=False)
    assert_logits_match(tmp_path, SMALL["vocab_size"])


def test_bf16_master_logits_match_transformers(tmp_path):
    """Dense bf16 projections, ternarized at load as transformers does on every forward."""
    shape = {key: value for key, value in CONFIGS["gqa3-odd-heads-head_dim-12"].items() if key != "quantization_config"}
    write_bitnet(tmp_path, bitnet_config(layout="bf16", **SMALL, **shape), tokenizer=False)
    with safe_open(tmp_path / "model.safetensors", "pt") as file:
        assert file.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
        assert "model.layers.0.self_attn.q_proj.weight_scale" not in file.keys()
    assert_logits_match(tmp_path, SMALL["vocab_size"])


def test_cached_decode_matches_full_forward(tmp_path):
    write_bitnet(tmp_path, bitnet_config(**SMALL, **CONFIGS["gqa3-odd-heads-head_dim-12"]), tokenizer=False)
    network = trillm.load(tmp_path, head="bf16").network
    ids = random_ids(101, (12, 10), seed=2)
    with torch.no_grad():
        full = network(ids)
        cache = network.new_cache(12, 64)
        steps = [network(ids[:, :5], cache, 0)]
        steps += [network(ids[:, i : i + 1], cache, i) for i in range(5, 8)]
        steps.append(network(ids[:, 8:], cache, 8))  # a multi-token chunk after cached positions
    assert_sequences_match(torch.cat(steps, dim=1), full)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The bitnet-tiny preset as `trillm synth` writes it, tokenizer included."""
    folder = tmp_path_factory.mktemp("bitnet-tiny")
    result = subprocess.run([sys.executable, "-m", "trillm.cli", "synth", "bitnet-tiny", str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return folder


@needs_vocabulary
def test_greedy_tokens_match_transformers(tiny_folder):
    model = trillm.load(tiny_folder, head="bf16")
    reference = load_reference(tiny_folder)
    for prompt in ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3,"]:
        ids = model.tokenizer.encode(prompt)
        assert ids[0] == 128000  # <|begin_of_text|>, as the release's tokenizer adds it
        ours = list(model.generate_ids(ids, max_new_tokens=8, sampling=Sampling(temperature=0)))
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        assert ours == theirs, prompt


@needs_vocabulary
def test_tiny_preset_tokenizer_matches_transformers(tiny_folder):
    ours = trillm.load(tiny_folder).tokenizer
    theirs = AutoTokenizer.from_pretrained(tiny_folder)
    text = "Hello world, Café naïve 日本語 😀 12345\n  def f(x): return x"
    assert ours.encode(text) == theirs(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert trillm.load(tiny_folder).chat_prompt(messages) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_bf16_layout_preset_loads_in_both(tmp_path):
    result = run_cli("synth", "bitnet-tiny", str(tmp_path), "--layout", "bf16", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quantization_mode"] == "online"
    assert_logits_match(tmp_path, 128256)


def test_presets_have_the_release_layout(tmp_path):
    """Names, shapes and dtypes as the 2B4T release lists them (seeds/003), here in bitnet-tiny's sizes."""
    write_preset("bitnet-tiny", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    hidden, intermediate, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv_rows = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    with safe_open(tmp_path / "model.safetensors", "pt") as file:
        stored = {name: (file.get_slice(name).get_dtype(), file.get_slice(name).get_shape()) for name in file.keys()}
    assert len(stored) == 2 + 18 * layers  # 542 for 30 layers
    assert stored["model.embed_tokens.weight"] == ("BF16", [128256, hidden])
    assert "lm_head.weight" not in stored  # tied
    layer = {name.removeprefix("model.layers.0."): value for name, value in stored.items()
             if name.startswith("model.layers.0.")}
    assert layer == {
        "input_layernorm.weight": ("BF16", [hidden]),
        "mlp.down_proj.weight": ("U8", [hidden // 4, intermediate]), "mlp.down_proj.weight_scale": ("BF16", [1]),
        "mlp.ffn_sub_norm.weight": ("BF16", [intermediate]),
        "mlp.gate_proj.weight": ("U8", [intermediate // 4, hidden]), "mlp.gate_proj.weight_scale": ("BF16", [1]),
        "mlp.up_proj.weight": ("U8", [intermediate // 4, hidden]), "mlp.up_proj.weight_scale": ("BF16", [1]),
        "post_attention_layernorm.weight": ("BF16", [hidden]),
        "self_attn.attn_sub_norm.weight": ("BF16", [hidden]),
        "self_attn.k_proj.weight": ("U8", [kv_rows // 4, hidden]), "self_attn.k_proj.weight_scale": ("BF16", [1]),
        "self_attn.o_proj.weight": ("U8", [hidden // 4, hidden]), "self_attn.o_proj.weight_scale": ("BF16", [1]),
        "self_attn.q_proj.weight": ("U8", [hidden // 4, hidden]), "self_attn.q_proj.weight_scale": ("BF16", [1]),
        "self_attn.v_proj.weight": ("U8", [kv_rows // 4, hidden]), "self_attn.v_proj.weight_scale": ("BF16", [1]),
    }
    # The release's config.json, its shape keys aside.
    shape_keys = set(PRESETS["bitnet-tiny"])
    assert {k: v for k, v in config.items() if k not in shape_keys} == {
        k: v for k, v in BITNET_2B4T_CONFIG.items() if k not in shape_keys}


@pytest.mark.slow
def test_2b4t_preset_loads_and_decodes(bitnet_2b4t_folder):
    with safe_open(bitnet_2b4t_folder / "model.safetensors", "pt") as file:
        names = list(file.keys())
        assert len(names) == 542
        assert file.get_slice("model.layers.29.mlp.down_proj.weight").get_shape() == [640, 6912]
        assert file.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [160, 2560]
    model = trillm.load(bitnet_2b4t_folder)
    assert isinstance(model.network.head.weight, GGMLTensor)  # the default Q6_K head
    reply = list(model.generate_ids(model.chat_prompt([{"role": "user", "content": "Hi"}]), max_new_tokens=3,
                                    sampling=Sampling(temperature=0)))
    assert len(reply) == 3


# ---- The output head: bf16, or quantized to Q8_0 or Q6_K at load -----------------------------------------

def test_q8_0_quantizer_equals_gguf():
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 96, generator=generator) * torch.rand(300, 1, generator=generator) * 3).bfloat16()
    weight[0, :32] = 0  # an all-zero block: d = 0
    weight[1, :32] = torch.tensor([127.0, 0.5, 1.5, -0.5, -1.5, 2.5, 63.5, -63.5] * 4)  # halves round away from 0
    ours = quantize_q8_0(weight)
    expected = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert ours.type == gguf.GGMLQuantizationType.Q8_0 and ours.shape == (300, 96)
    np.testing.assert_array_equal(ours.data.numpy(), expected)
    assert ours.data[1, 2:10].view(torch.int8).tolist() == [127, 1, 2, -1, -2, 3, 64, -64]


def test_q8_0_head_is_close_to_bf16(tmp_path):
    write_bitnet(tmp_path, bitnet_config(**SMALL, **CONFIGS["mha-autobitlinear-tied"]), tokenizer=False)
    quantized, exact = trillm.load(tmp_path), trillm.load(tmp_path, head="bf16")
    # 64 columns do not split in Q6_K's blocks of 256: the default head is Q8_0
    assert quantized.network.head.weight.type == gguf.GGMLQuantizationType.Q8_0
    assert quantized.network.head.stored_bytes == 101 * 64 // 32 * 34  # vs 101 * 64 * 2 in bf16
    ids = random_ids(101)
    expected = exact.forward(ids)
    difference = quantized.forward(ids) - expected
    # Measured: max 0.108 and rms 0.03 for logits of std 4.3 (2B4T's shape: 0.13 and 0.02 for std 4.2).
    assert 0 < difference.abs().max() < 0.05 * expected.std()
    assert difference.pow(2).mean().sqrt() < 0.01 * expected.std()


def test_q6_k_head_is_the_bitnet_default_and_close_to_bf16(tmp_path):
    shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384,
                 tie_word_embeddings=True, quantization_config=AUTOBITLINEAR_OFFLINE)
    write_bitnet(tmp_path, bitnet_config(**SMALL, **shape), tokenizer=False)
    default, exact = trillm.load(tmp_path), trillm.load(tmp_path, head="bf16")
    head = default.network.head
    assert head.weight.type == gguf.GGMLQuantizationType.Q6_K and head.int8_activations
    assert head.stored_bytes == 101 * 210  # vs 101 * 256 * 2 in bf16
    # 20 tokens and 46 (a prefill) go through the int8 kernel (Q6_K's takes prompts too: ggml.INT8_PROMPT_TYPES)
    for ids in (random_ids(101, (1, 20)), random_ids(101)):
        expected = exact.forward(ids)
        difference = default.forward(ids) - expected
        # Measured: max 0.39, rms 0.089 for logits of std 4.2 (2B4T's shape: 0.51 and 0.086).
        assert 0 < difference.abs().max() < 0.15 * expected.std()
        assert difference.pow(2).mean().sqrt() < 0.03 * expected.std()


def test_head_option(tmp_path):
    write_bitnet(tmp_path, bitnet_config(**SMALL, **CONFIGS["gqa3-odd-heads-head_dim-12"]), tokenizer=False)
    with pytest.raises(TrillmError, match="invalid output head format 'q4'"):
        trillm.load(tmp_path, head="q4")
    # 108 columns do not split in blocks of 32 (or 256): the head stays bf16, with a warning.
    for head in ("q8_0", "q6_k", None):
        assert not isinstance(trillm.load(tmp_path, head=head).network.head.weight, GGMLTensor)


def test_llama_takes_a_q8_0_head(tmp_path):
    from test_llama import CONFIGS as LLAMA_CONFIGS
    from test_llama import save_random_llama

    save_random_llama(tmp_path, LLAMA_CONFIGS["mha-untied"][0])
    stored, quantized = trillm.load(tmp_path), trillm.load(tmp_path, head="q8_0")
    assert quantized.network.head.weight.type == gguf.GGMLQuantizationType.Q8_0
    ids = random_ids(101)
    torch.testing.assert_close(quantized.forward(ids), stored.forward(ids), atol=0.05, rtol=0)


# ---- Bad checkpoints: one error naming the file and the tensor -------------------------------------------

@pytest.fixture
def packed_folder(tmp_path):
    write_bitnet(tmp_path, bitnet_config(**SMALL, **CONFIGS["mha-autobitlinear-tied"]), tokenizer=False)
    return tmp_path


def rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_packed_tensor_of_wrong_shape(packed_folder):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite(packed_folder, lambda tensors: tensors.__setitem__(name, torch.zeros(64, 64, dtype=torch.uint8)))
    with pytest.raises(CheckpointError) as error:
        trillm.load(packed_folder)
    message = str(error.value)
    assert "model.safetensors" in message and name in message and "[64, 64]" in message and "[16, 64]" in message


def test_missing_weight_scale(packed_folder):
    name = "model.layers.0.mlp.up_proj.weight_scale"
    rewrite(packed_folder, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError) as error:
        trillm.load(packed_folder)
    assert "model.safetensors" in str(error.value) and name in str(error.value) and "missing" in str(error.value)
    assert_one_line_error(run_cli("generate", "-m", str(packed_folder), "-p", "x"), name)


def test_invalid_ternary_code(packed_folder):
    name = "model.layers.1.mlp.gate_proj.weight"

    def corrupt(tensors):
        tensors[name][5, 7] |= 0b11 << 4  # rows 5, 5 + 24, 5 + 48, 5 + 72 share this byte: row 53 gets code 11

    rewrite(packed_folder, corrupt)
    with pytest.raises(CheckpointError, match=f"{name}.*0b11") as error:
        trillm.load(packed_folder)
    assert "model.safetensors" in str(error.value)


def test_packed_config_with_dense_weights(packed_folder):
    """A bf16 master checkpoint under the packed release's config: the shape check catches it."""
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite(packed_folder, lambda tensors: tensors.__setitem__(name, torch.zeros(64, 64, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=f"{name}.*\\[64, 64\\], expected \\[16, 64\\]"):
        trillm.load(packed_folder)


def test_config_without_bitnet_quantization(packed_folder):
    config = json.loads((packed_folder / "config.json").read_text())
    del config["quantization_config"]
    (packed_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: .*quant_method 'bitnet'"):
        trillm.load(packed_folder)


def test_config_with_model_type_and_no_architectures(packed_folder):
    """transformers picks the class from model_type when config.json lists no architectures: so do we."""
    ids = random_ids(101, (2, 9))
    expected = trillm.load(packed_folder).forward(ids)
    config = json.loads((packed_folder / "config.json").read_text())
    del config["architectures"]
    (packed_folder / "config.json").write_text(json.dumps(config))
    assert config["model_type"] == "bitnet"
    assert torch.equal(trillm.load(packed_folder).forward(ids), expected)


# ---- The chat command ----------------------------------------------------------------------------------

@needs_vocabulary
def test_chat_cli_replies_and_stops_at_eot(tmp_path):
    """bitnet-tiny with an untied head whose <|eot_id|> row is doctored so that the greedy reply ends with
    <|eot_id|> after a few tokens; `trillm chat` must print exactly that reply."""
    eot = 128009
    folder = write_bitnet(tmp_path, bitnet_config("bitnet-tiny", tie_word_embeddings=False))
    model = trillm.load(folder, head="bf16")
    prompt = model.chat_prompt([{"role": "user", "content": "Hi there"}])
    assert model.tokenizer.decode(prompt) == "User: Hi there<|eot_id|>Assistant: "
    greedy = list(model.generate_ids(prompt, max_new_tokens=8, sampling=Sampling(temperature=0)))
    with torch.no_grad():
        logits = model.forward(torch.tensor([prompt + greedy]))[0, len(prompt) - 1:]  # (steps + 1, vocab)
    # The eot row becomes alpha * (the row of the token chosen at step s): its logit at step i is alpha times
    # that token's. alpha > 1 wins at step s, where that token is the argmax (positive); alpha below
    # top / logit at every earlier step loses there: the reply is then the first s tokens.
    top = logits.max(dim=-1).values
    for stop_step in range(2, 7):
        token_logits = logits[:stop_step, greedy[stop_step]]
        ceiling = torch.where(token_logits > 0, top[:stop_step] / token_logits, torch.inf).min().item()
        if ceiling > 1.1:
            alpha = (1 + min(ceiling, 2.0)) / 2
            break
    else:
        pytest.fail("no step to stop at")

    rewrite(folder, lambda tensors: tensors["lm_head.weight"].__setitem__(
        eot, (tensors["lm_head.weight"][greedy[stop_step]].float() * alpha).bfloat16()))
    model = trillm.load(folder, head="bf16")
    reply = list(model.generate_ids(prompt, max_new_tokens=8, sampling=Sampling(temperature=0)))
    assert reply == greedy[:stop_step]
    with torch.no_grad():
        assert model.forward(torch.tensor([prompt + reply]))[0, -1].argmax() == eot

    result = run_cli("chat", "-m", str(folder), "--head", "bf16", "--temperature", "0", "-n", "8", stdin="Hi there\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == model.tokenizer.decode(reply, skip_special_tokens=True) + "\n"
