"""gpt-oss: our logits equal transformers' GptOssForCausalLM (which dequantizes the MXFP4 experts) on
random checkpoints written in the release's exact layout; sliding windows through ring caches, GGUF files
of llama.cpp's layout equal to the folder, the shipped vocabulary, bad checkpoints."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import trillm
from trillm.bench import gguf_bytes_per_token
from trillm.checkpoint.pages import file_mapping
from trillm.engine import Session, decode_one_token, prefill
from trillm.errors import CheckpointError, TrillmError
from trillm.synth.gpt_oss import gpt_oss_config, has_vocabulary, write_gpt_oss, write_gpt_oss_gguf
from trillm.weights.ggml import GGMLLinear
from trillm.weights import weight_bytes_per_token
from trillm.weights.mxfp4 import MXFP4Experts, has_bf16_kernel

SMALL = dict(vocab_size=300, max_position_embeddings=512, pad_token_id=None)  # no tokenizer: the real vocabulary is 201088 wide

CONFIGS = {
    # name: config.json overrides on gpt-oss-tiny (hidden 64, 2 layers: sliding then full, window 4)
    "tiny": {},
    "gqa8-top1-window3": dict(num_attention_heads=8, num_key_value_heads=1, num_experts_per_tok=1,
                              experts_per_token=1, sliding_window=3),
    "mha-3-layers-5-experts-head_dim-32": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                               num_hidden_layers=3, num_local_experts=5, num_experts_per_tok=3,
                                               experts_per_token=3, intermediate_size=96,
                                               layer_types=["full_attention", "sliding_attention", "full_attention"]),
}


def config_of(name: str) -> dict:
    return gpt_oss_config("gpt-oss-tiny", **SMALL, **CONFIGS[name])


def load_reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    folder = write_gpt_oss(tmp_path_factory.mktemp(request.param), config_of(request.param), seed=3)
    return folder, load_reference(folder)


def test_logits_match_transformers(checkpoint):
    folder, reference = checkpoint
    ids = torch.randint(0, 300, (3, 13), generator=torch.Generator().manual_seed(0))  # longer than the windows
    with torch.no_grad():
        expected = reference(ids).logits
    assert expected.std() > 1
    exact = trillm.load(folder, expert_activations="float32").forward(ids)
    torch.testing.assert_close(exact, expected, atol=1e-4, rtol=1e-4)
    # the experts' activations rounded to 8 bits (int8 as llama.cpp; bf16 for prompts where the CPU has it,
    # the default): the rounding moves the logits a little
    for activations in (None, "int8", *(["bf16"] if has_bf16_kernel() else [])):
        rounded = trillm.load(folder, expert_activations=activations).forward(ids)
        assert 0 < (rounded - expected).abs().mean() < 0.02 * expected.std(), activations
        assert (rounded.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9, activations


def test_cached_decode_through_ring_caches_matches_transformers(checkpoint):
    folder, reference = checkpoint
    model = trillm.load(folder, expert_activations="float32")
    ids = torch.randint(0, 300, (1, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits[0]
    with torch.inference_mode():
        session = Session(model.network.new_cache(1, 64))
        logits = [prefill(model.network, session, ids[0, :6].tolist())]
        logits += [decode_one_token(model.network, session, token) for token in ids[0, 6:].tolist()]
    torch.testing.assert_close(torch.stack(logits), expected[5:], atol=1e-4, rtol=1e-4)
    windows = model.network.windows
    assert [cache.shape[2] for cache in session.cache.keys] == [w or 64 for w in windows] and None in windows


@pytest.mark.parametrize("dense", ["bf16", "q8_0"])
def test_gguf_equals_the_folder(tmp_path, dense):
    config = config_of("tiny")
    write_gpt_oss(tmp_path / "folder", config, seed=5)
    path = write_gpt_oss_gguf(tmp_path / "model.gguf", config, seed=5, dense_type=dense)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    folder = trillm.load(tmp_path / "folder", expert_activations="float32").forward(ids)
    gguf = trillm.load(path, expert_activations="float32").forward(ids)
    if dense == "bf16":  # the same weights; only the experts' summation order differs (their element order)
        torch.testing.assert_close(gguf, folder, atol=1e-5, rtol=1e-5)
    else:  # the dense matrices rounded to 8 bits
        assert (gguf - folder).abs().max() < 0.1 * folder.std()


def test_dense_parts_re_stored_in_q8_0(tmp_path):
    folder = write_gpt_oss(tmp_path, config_of("tiny"), seed=4)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    as_stored, model = trillm.load(folder), trillm.load(folder, dense="q8_0")
    quantized = [m for m in model.network.modules() if isinstance(m, GGMLLinear) and m.weight.type.name == "Q8_0"]
    assert len(quantized) == 2 * len(model.network.blocks) + 1  # qkv and o a layer, and the head
    expected = as_stored.forward(ids)  # the rounding moves the logits a little (a router's choice, now and then)
    assert 0 < (model.forward(ids) - expected).abs().mean() < 0.02 * expected.std()


@pytest.mark.parametrize("layout", ["release", "gguf"])
def test_the_experts_stay_in_the_files_memory_map(tmp_path, layout):
    if layout == "gguf":
        path = write_gpt_oss_gguf(tmp_path / "model.gguf", config_of("tiny"))
    else:
        path = next(write_gpt_oss(tmp_path, config_of("tiny")).glob("model-*.safetensors"))
    model = trillm.load(path if layout == "gguf" else tmp_path)
    banks = [module.weight for module in model.network.modules() if isinstance(module, MXFP4Experts)]
    assert len(banks) == 2 * (3 if layout == "gguf" else 2)  # per layer: down, and gate/up as one bank or two
    for bank in banks:
        assert file_mapping(path, bank.codes.data_ptr()) is not None  # the file's pages, no copy
    if layout == "gguf":  # what bench counts for llama.cpp on the file: what trillm reads, but norms and biases
        stored = weight_bytes_per_token(model.network)
        assert stored < gguf_bytes_per_token(path) < 1.1 * stored  # counting every expert: about twice


def test_a_config_without_mxfp4_experts_is_refused(tmp_path):
    config = config_of("tiny")
    del config["quantization_config"]
    folder = write_gpt_oss(tmp_path, config_of("tiny"))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="experts in MXFP4"):
        trillm.load(folder)


@pytest.mark.skipif(not has_vocabulary(), reason="quicktok (o200k_harmony) missing")
def test_the_tiny_preset_has_the_real_vocabulary(tmp_path):
    folder = write_gpt_oss(tmp_path / "folder", gpt_oss_config("gpt-oss-tiny"))
    path = write_gpt_oss_gguf(tmp_path / "model.gguf", gpt_oss_config("gpt-oss-tiny"))
    text = "Hello, world! <|start|>user<|message|>Wie geht's? 12345<|end|>"
    folder_ids = trillm.load(folder).tokenizer.encode(text, add_special_tokens=False)
    assert folder_ids[:3] == [13225, 11, 2375] and 200006 in folder_ids and 200008 in folder_ids
    assert trillm.load(path).tokenizer.encode(text, add_special_tokens=False) == folder_ids


def test_bf16_activations_need_a_cpu_that_has_them(tmp_path, monkeypatch):
    from trillm.native import build

    if "avx2" not in build.runnable_levels():
        pytest.skip("this CPU runs no AVX2 kernels")
    folder = write_gpt_oss(tmp_path, config_of("tiny"))
    monkeypatch.setenv("TRILLM_ISA", "avx2")  # a level without the bf16 kernel
    build.load.cache_clear()
    try:
        with pytest.raises(TrillmError, match="AVX512-BF16"):
            trillm.load(folder, expert_activations="bf16")
        trillm.load(folder)  # the default takes int8 there
    finally:
        monkeypatch.undo()
        build.load.cache_clear()
