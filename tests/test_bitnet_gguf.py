"""BitNet from GGUF files of llama.cpp's "bitnet" architecture (TQ2_0 / TQ1_0 blocks): our block decoding
equals gguf's, `write_bitnet_gguf` writes the converter's layout, a GGUF file gives exactly the logits of
the packed folder holding the same weights, bad files give one clear error, and llama.cpp runs our file."""

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

import trillm
from trillm.checkpoint.gguf_file import GGUFCheckpoint
from trillm.synth.bitnet import bitnet_config, write_bitnet, write_bitnet_gguf
from trillm.synth.vocabulary import has_llama3_vocabulary
from trillm.cli import main
from trillm.errors import CheckpointError
from trillm.models.bitnet import load_bitnet_gguf
from trillm.weights.ggml import GGMLTensor
from trillm.weights.ternary import decode_tq1_0, decode_tq2_0, ternary_from_gguf, unpack_ternary

Q = gguf.GGMLQuantizationType
SMALL = dict(vocab_size=512, num_hidden_layers=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    # name: (config.json overrides on bitnet-tiny, GGUF layout). Rows of 256k columns are TQ blocks.
    "tq2_0-gqa2": (dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
                   "tq2_0"),
    "tq1_0-gqa8-head_dim-64": (dict(hidden_size=512, intermediate_size=768, num_attention_heads=8,
                                    num_key_value_heads=1), "tq1_0"),
    # bitnet-tiny's own sizes (128, 352) are not whole blocks: every projection is the converter's F16.
    "tiny-preset-f16-fallback": ({}, "tq2_0"),
}


def random_blocks(block_bytes: int, count: int = 4096, seed: int = 0) -> np.ndarray:
    """Random bytes, every code and byte value included, with finite fp16 scales in the last two bytes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, block_bytes), dtype=np.uint8)
    blocks[:, -2:] = rng.standard_normal((count, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype, decode", [(Q.TQ2_0, decode_tq2_0), (Q.TQ1_0, decode_tq1_0)])
def test_block_decoding_equals_gguf(qtype, decode):
    blocks = random_blocks(gguf.GGML_QUANT_SIZES[qtype][1])
    codes, scales = decode(torch.from_numpy(blocks))
    expected = gguf.quants.dequantize(blocks, qtype).reshape(len(blocks), 256)
    assert np.array_equal(((codes.float() - 1) * scales).numpy(), expected)


@pytest.mark.parametrize("qtype", [Q.TQ2_0, Q.TQ1_0])
def test_ternary_from_blocks_keeps_values_and_scale(qtype):
    """gguf's quantizer (the converter's) on ternary weights times a scale, read back: the same values, one
    per-tensor scale, or per-row scales when the rows differ; all-zero blocks (d = 0) do not count."""
    rng = np.random.default_rng(1)
    values = rng.integers(-1, 2, (8, 768)).astype(np.float32)
    values[2, 256:512] = 0  # an all-zero block
    for row_scales in (np.full((8, 1), 0.0234375, np.float32), rng.uniform(0.01, 0.1, (8, 1)).astype(np.float16)):
        weights = values * row_scales.astype(np.float32)
        weight = ternary_from_gguf(GGMLTensor(qtype, torch.from_numpy(gguf.quants.quantize(weights, qtype)), (8, 768)))
        assert torch.equal(unpack_ternary(weight.packed), torch.from_numpy(values).to(torch.int8))
        expected = 1 / torch.from_numpy(row_scales.astype(np.float32)).reshape(-1)
        assert torch.equal(weight.scale, expected[:1] if len(set(row_scales.ravel())) == 1 else expected)


def config_of(name: str) -> dict:
    return bitnet_config("bitnet-tiny", **SMALL, **CONFIGS[name][0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gguf_logits_equal_the_folders(tmp_path, name):
    """The same weights from the packed folder and from the GGUF file: equal logits, not merely close."""
    config, layout = config_of(name), CONFIGS[name][1]
    write_bitnet(tmp_path / "folder", config, seed=2)
    path = write_bitnet_gguf(tmp_path / "model.gguf", config, layout, seed=2)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 19), generator=torch.Generator().manual_seed(0))
    assert torch.equal(trillm.load(path).forward(ids), trillm.load(tmp_path / "folder").forward(ids))


def test_gguf_has_the_converters_layout(tmp_path):
    """llama.cpp's names, no scale tensors, TQ2_0 projections in Hugging Face's row order (the converter
    permutes no q/k rows for bitnet: llama.cpp ropes it in the halves layout), F32 norms, F16 token_embd."""
    config = config_of("tq2_0-gqa2")
    write_bitnet(tmp_path / "folder", config, seed=2)
    reader = gguf.GGUFReader(write_bitnet_gguf(tmp_path / "model.gguf", config, "tq2_0", seed=2))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    layer = {name.removeprefix("blk.0."): tensor.tensor_type.name for name, tensor in tensors.items()
             if name.startswith("blk.0.")}
    assert layer == {"attn_norm.weight": "F32", "attn_sub_norm.weight": "F32", "ffn_norm.weight": "F32",
                     "ffn_sub_norm.weight": "F32", **{f"{name}.weight": "TQ2_0" for name in (
                         "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}}
    assert len(tensors) == 2 + 11 * config["num_hidden_layers"]
    assert tensors["token_embd.weight"].tensor_type == Q.F16 and tensors["output_norm.weight"].tensor_type == Q.F32
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    assert metadata["general.architecture"] == "bitnet" and metadata["general.file_type"] == 37  # MOSTLY_TQ2_0
    assert metadata["bitnet.attention.head_count"] == 4 and metadata["bitnet.attention.head_count_kv"] == 2
    assert metadata["bitnet.rope.scaling.type"] == "linear" and metadata["bitnet.rope.scaling.factor"] == 1.0
    assert metadata["bitnet.hidden_activation"] == "relu2"
    with safe_open(tmp_path / "folder" / "model.safetensors", "pt") as folder:
        for hf, name in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k")]:
            codes, scale = (folder.get_tensor(f"model.layers.1.{hf}.{key}") for key in ("weight", "weight_scale"))
            stored = gguf.quants.dequantize(tensors[f"blk.1.{name}.weight"].data, Q.TQ2_0)
            assert np.array_equal(stored, (unpack_ternary(codes).float() * scale.float()).numpy())


# ---- Bad files: one CheckpointError naming the file, the tensor and the reason ----------------------------

@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_bitnet_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf", config_of("tq2_0-gqa2"), "tq2_0")


def rewrite_gguf(source, target, tensors: dict = {}, metadata: dict = {}):
    """A copy of a GGUF file with some tensors (name -> (data, type)) and metadata values replaced or added
    (a value of another type than the key's is written with its own type)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "bitnet")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture" and key not in metadata:
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for key, value in metadata.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for tensor in reader.tensors:
        data, qtype = tensors.get(tensor.name, (np.asarray(tensor.data), tensor.tensor_type))
        writer.add_tensor(tensor.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def ternary_weights(rows: int, columns: int) -> np.ndarray:
    return np.random.default_rng(0).integers(-1, 2, (rows, columns)).astype(np.float32) * np.float32(0.03125)


def test_projection_of_a_non_ternary_type(good_gguf, tmp_path):
    q8_0 = gguf.quants.quantize(ternary_weights(256, 256), Q.Q8_0)
    path = rewrite_gguf(good_gguf, tmp_path / "bad.gguf", {"blk.1.attn_q.weight": (q8_0, Q.Q8_0)})
    with pytest.raises(CheckpointError, match=r"bad.gguf: tensor 'blk.1.attn_q.weight' \(Q8_0 \[256, 256\]\): "
                                              r"Q8_0 does not hold ternary weights"):
        trillm.load(path)


def test_projection_of_the_wrong_shape(good_gguf, tmp_path):
    blocks = gguf.quants.quantize(ternary_weights(64, 256), Q.TQ2_0)
    path = rewrite_gguf(good_gguf, tmp_path / "bad.gguf", {"blk.0.attn_k.weight": (blocks, Q.TQ2_0)})
    with pytest.raises(CheckpointError, match=r"bad.gguf: tensor 'blk.0.attn_k.weight' has shape \[64, 256\], "
                                              r"expected \[128, 256\]"):
        trillm.load(path)


def test_blocks_of_one_row_with_different_scales(good_gguf, tmp_path):
    weights = ternary_weights(512, 256)
    weights[5] *= 2  # row 5 differs from the others: per-row scales, fine
    fine = gguf.quants.quantize(weights, Q.TQ2_0)
    weights = ternary_weights(256, 512)
    weights[3, 256:] *= 2  # row 3's second block has another scale than its first
    bad = gguf.quants.quantize(weights, Q.TQ2_0)
    path = rewrite_gguf(good_gguf, tmp_path / "bad.gguf",
                        {"blk.0.ffn_up.weight": (fine, Q.TQ2_0), "blk.1.ffn_down.weight": (bad, Q.TQ2_0)})
    with pytest.raises(CheckpointError, match=r"tensor 'blk.1.ffn_down.weight' \(TQ2_0 \[256, 512\]\): row 3 has "
                                              r"weights of scale 0.03125 and, from column 256, 0.0625"):
        trillm.load(path)


def test_invalid_tq2_0_code(good_gguf, tmp_path):
    blocks = gguf.quants.quantize(ternary_weights(128, 256), Q.TQ2_0)
    blocks[7, 3] |= 0b11 << 4  # byte 3, bits 4-5: the weight at column 32 * 2 + 3
    path = rewrite_gguf(good_gguf, tmp_path / "bad.gguf", {"blk.0.attn_v.weight": (blocks, Q.TQ2_0)})
    with pytest.raises(CheckpointError, match=r"invalid TQ2_0 code 0b11 for the weight at row 7, column 67"):
        trillm.load(path)


def test_unknown_activation(good_gguf, tmp_path):
    path = rewrite_gguf(good_gguf, tmp_path / "bad.gguf", metadata={"bitnet.hidden_activation": "gelu"})
    with pytest.raises(CheckpointError, match="bad.gguf: bitnet.hidden_activation must be one of 'relu2', .*got 'gelu'"):
        trillm.load(path)


def test_synth_gguf_needs_a_gguf_path(tmp_path, capsys):
    assert main(["synth", "bitnet-tiny", str(tmp_path / "out"), "--layout", "tq1_0"]) == 1
    assert capsys.readouterr().err == (f"trillm: error: with --layout tq1_0, OUT is the .gguf file to write, "
                                       f"not {str(tmp_path / 'out')!r}\n")


def test_synth_gguf_embedding_type(tmp_path):
    """--gguf-embedding q8_0 stores token_embd (the head llama.cpp reads) in Q8_0; trillm keeps it so."""
    path = tmp_path / "tiny.gguf"
    assert main(["synth", "bitnet-tiny", str(path), "--layout", "tq2_0", "--gguf-embedding", "q8_0"]) == 0
    checkpoint = GGUFCheckpoint(path)
    assert checkpoint.get("token_embd.weight").type == gguf.GGMLQuantizationType.Q8_0
    assert trillm.load(path).network.head.weight.type == gguf.GGMLQuantizationType.Q8_0


# ---- llama.cpp runs our file ----------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
@pytest.mark.skipif(not has_llama3_vocabulary(), reason="quicktok (Llama 3 vocabulary) missing")
def test_llama_cpp_runs_our_file(tmp_path):
    """llama.cpp loads our file and computes nearly our logits. Its bitnet graph runs SiLU whatever
    bitnet.hidden_activation says ("relu2" is not a name it knows), so this file asks for SiLU and so do
    we. It quantizes activations per 256 weights (we per token, as transformers) and keeps the F16 head (we
    Q6_K): close logits, not equal ones; permuted q/k rows or a wrong scale would decorrelate them."""
    from llama_cpp import Llama

    config = bitnet_config("bitnet-tiny", num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, hidden_act="silu")
    path = write_bitnet_gguf(tmp_path / "model.gguf", config, "tq2_0", seed=4)
    llama = Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    text = "Once upon a time there was a little girl who lived in a village near the forest."
    ids = llama.tokenize(text.encode(), add_bos=True)
    assert GGUFCheckpoint(path).tokenizer().encode(text) == ids  # the vocabulary reads alike
    llama.eval(ids)
    theirs = np.asarray(llama.scores[:len(ids)])
    with torch.inference_mode():
        ours = load_bitnet_gguf(GGUFCheckpoint(path))(torch.tensor([ids]))[0].numpy()
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
