"""Synthetic BitNet b1.58 checkpoints: random weights in the exact layout of the real release.

`write_bitnet` writes a Hugging Face folder as microsoft/bitnet-b1.58-2B-4T ships it: config.json (the
real config, its shape overridable), model.safetensors with the release's tensor names, dtypes and
packing (uint8 [out/4, in] projections + bf16 weight_scale [1], bf16 norms and embedding, no lm_head:
tied), generation_config.json, and, when the `quicktok` package provides the Llama 3 vocabulary,
tokenizer.json + tokenizer_config.json with the model's chat template. `layout="bf16"` writes the bf16
master layout instead (microsoft/bitnet-b1.58-2B-4T-bf16: dense bf16 projections, no weight_scale).
`write_bitnet_gguf` writes the packed folder's weights as one GGUF file, laid out as llama.cpp's converter
writes BitNet in its TQ2_0 or TQ1_0 types (`layout="tq2_0"` / `"tq1_0"` of `write_preset`).

The weights are random but keep activations at a sensible scale through the layers, so the logits are
spread like a trained model's rather than flat or saturated. The safetensors file is written one tensor
(or one slice of the embedding) at a time: a 1.2 GB checkpoint never sits in memory twice.
"""

import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from trillm.models.bitnet import LAYER_NAMES, BitNetConfig
from trillm.models.loading import MODEL_NAMES
from trillm.synth.files import Tensor, add_decoder_gguf_metadata, write_safetensors
from trillm.synth.vocabulary import (
    LLAMA3_VOCAB_SIZE,
    add_gguf_vocabulary,
    has_llama3_vocabulary,
    write_llama3_tokenizer,
)
from trillm.weights.ggml import quantize_q8_0
from trillm.weights.ternary import pack_ternary, unpack_ternary

# microsoft/bitnet-b1.58-2B-4T's config.json (seeds/002); its quantization_config as the packed release
# has it: "offline" packed weights whose weight_scale multiplies the output ("autobitlinear").
BITNET_2B4T_CONFIG = {
    "architectures": ["BitNetForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_bitnet.BitNetConfig",
        "AutoModelForCausalLM": "modeling_bitnet.BitNetForCausalLM",
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "relu2",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 4096,
    "model_type": "bitnet",
    "rms_norm_eps": 1e-05,
    "num_attention_heads": 20,
    "num_hidden_layers": 30,
    "num_key_value_heads": 5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
}
# The bf16 master weights are ternarized on the fly: the quantization_config that seeds/002 lists.
MASTER_QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}

# Folders ("packed", "bf16") and GGUF files of llama.cpp's ternary types (the packed weights).
LAYOUTS = ("packed", "bf16", "tq2_0", "tq1_0")

# Shapes on top of BITNET_2B4T_CONFIG. The small ones keep the real vocabulary so the tokenizer fits.
PRESETS = {
    "bitnet-b1.58-2b-4t": {},  # 30 layers, 2.4B parameters, ~1.2 GB packed (~4.8 GB in bf16)
    "bitnet-small": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=6, num_attention_heads=10,
                         num_key_value_heads=5),  # ~190 MB, the 2B4T's head_dim and GQA ratio
    "bitnet-tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024),  # ~33 MB, for tests
}

# microsoft/bitnet-b1.58-2B-4T's tokenizer: the Llama 3 vocabulary, "Role: " turns ending in <|eot_id|>.
BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|eot_id|>"
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
EMBEDDING_ROWS_PER_SLICE = 8192


def bitnet_config(preset: str = "bitnet-b1.58-2b-4t", layout: str = "packed", **overrides) -> dict:
    """The config.json of a preset (see PRESETS) in a layout, with any key overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    config = copy.deepcopy(BITNET_2B4T_CONFIG)
    if layout == "bf16":
        config["quantization_config"] = dict(MASTER_QUANTIZATION_CONFIG)
    config.update(PRESETS[preset])
    config.update(copy.deepcopy(overrides))
    return config


def write_bitnet(folder: str | Path, config: dict, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a random-weight BitNet folder for this config.json; its quantization_config picks the layout
    (packed unless "online"). The tokenizer is written when asked, the vocabulary is Llama 3's size and
    quicktok is installed; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", bitnet_tensors(config, seed))
    llama3_vocabulary = config["vocab_size"] == LLAMA3_VOCAB_SIZE
    # A chat turn ends with <|eot_id|> (128009), text with <|end_of_text|> (config.json's eos, 128001).
    eos_ids = [config["eos_token_id"], 128009] if llama3_vocabulary else [config["eos_token_id"]]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": list(dict.fromkeys(eos_ids))}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer and llama3_vocabulary and has_llama3_vocabulary():
        write_llama3_tokenizer(folder, config.get("max_position_embeddings", 4096), CHAT_TEMPLATE, BOS_TOKEN, EOS_TOKEN)
    return folder


def write_preset(preset: str, out: Path, layout: str = "packed", seed: int = 0, gguf_embedding: str = "f16") -> Path:
    """A preset's folder, or with a GGUF layout ("tq2_0", "tq1_0") its .gguf file with the embedding (also
    the output head) in `gguf_embedding` ("f16" or "q8_0"); the same seed gives the same weights in every
    layout but "bf16"."""
    if layout in GGUF_LAYOUTS:
        return write_bitnet_gguf(out, bitnet_config(preset), layout, seed,
                                 embedding_type=GGMLQuantizationType[gguf_embedding.upper()])
    return write_bitnet(out, bitnet_config(preset, layout), seed)


# ---- Tensors: names, shapes and dtypes of the release; random values at a sensible scale ----------------

def bitnet_tensors(config: dict, seed: int) -> list[Tensor]:
    """(name, dtype, shape, slices) of every tensor; `slices()` generates the values, in row order."""
    c = BitNetConfig.from_hf(config)  # layout and sizes exactly as the loader will read them
    hidden, intermediate, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    generator = torch.Generator().manual_seed(seed)

    def norm(length: int) -> Callable:
        return lambda: iter([(torch.rand(length, generator=generator) + 0.5).bfloat16()])

    def embedding() -> Iterator[torch.Tensor]:
        # Logits = final hidden state (rms ~1) . embedding row: a std of 4 / sqrt(hidden) spreads them ~±15.
        for start in range(0, vocab, EMBEDDING_ROWS_PER_SLICE):
            rows = min(EMBEDDING_ROWS_PER_SLICE, vocab - start)
            yield (torch.randn(rows, hidden, generator=generator) * (4 / math.sqrt(hidden))).bfloat16()

    def ternary_codes(shape: tuple[int, int]) -> Callable:
        def codes():
            # -1, 0, +1 with probabilities 0.3, 0.4, 0.3, as the release's weights (seeds/003).
            draw = torch.randint(0, 10, shape, generator=generator, dtype=torch.uint8)
            yield pack_ternary((draw >= 3).to(torch.int8) + (draw >= 7).to(torch.int8) - 1)
        return codes

    def weight_scale(in_features: int) -> Callable:
        # Keeps a projection's output at its input's scale: 60% of the in_features codes are nonzero.
        def scale():
            multiplier = (0.6 * in_features) ** -0.5 * (0.8 + 0.45 * torch.rand(1, generator=generator))
            yield (1 / multiplier if c.ternary.scale_divides else multiplier).bfloat16()
        return scale

    def master_weight(shape: tuple[int, int]) -> Callable:
        # Absmean ternarization of N(0, s) zeroes |w| < 0.4 s (31%) and scales by mean|w| = 0.8 s.
        std = 1 / (0.8 * math.sqrt(0.69 * shape[1]))
        return lambda: iter([(torch.randn(shape, generator=generator) * std).bfloat16()])

    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    projections = {
        "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden, "self_attn.attn_sub_norm": q_rows,
             "mlp.ffn_sub_norm": intermediate}

    tensors = [("model.embed_tokens.weight", torch.bfloat16, (vocab, hidden), embedding),
               ("model.norm.weight", torch.bfloat16, (hidden,), norm(hidden))]
    if not c.tie_word_embeddings:
        tensors.append(("lm_head.weight", torch.bfloat16, (vocab, hidden), embedding))
    for i in range(c.num_layers):
        prefix = f"model.layers.{i}"
        for name, length in norms.items():
            tensors.append((f"{prefix}.{name}.weight", torch.bfloat16, (length,), norm(length)))
        for name, (out_features, in_features) in projections.items():
            if c.ternary.packed:
                tensors.append((f"{prefix}.{name}.weight", torch.uint8, (out_features // 4, in_features),
                                ternary_codes((out_features, in_features))))
                tensors.append((f"{prefix}.{name}.weight_scale", torch.bfloat16, (1,), weight_scale(in_features)))
            else:
                tensors.append((f"{prefix}.{name}.weight", torch.bfloat16, (out_features, in_features),
                                master_weight((out_features, in_features))))
    return sorted(tensors, key=lambda tensor: tensor[0])  # the release's order: by name


# ---- GGUF: the same weights, as llama.cpp's converter writes a BitNet checkpoint --------------------------

GGUF_LAYOUTS = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0}
GGUF_FILE_TYPES = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}
GGUF_EMBEDDING_TYPES = (GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0)


def write_bitnet_gguf(path: str | Path, config: dict, layout: str = "tq2_0", seed: int = 0, tokenizer: bool = True,
                      embedding_type: GGMLQuantizationType = GGMLQuantizationType.F16) -> Path:
    """Write the weights `write_bitnet` writes for this packed config.json and seed as one GGUF file, laid out
    as llama.cpp's converter (convert_hf_to_gguf.py, BitnetModel, --outtype tq2_0 or tq1_0) writes them (see
    `load_bitnet_gguf`): each projection as its ternary values times weight_scale in TQ2_0 / TQ1_0 blocks
    (F16 where a row is not whole 256-weight blocks, the converter's fallback), norms F32, token_embd F16 (or
    Q8_0: llama.cpp's quantizer would pick Q6_K, which gguf cannot write), the tokenizer when `write_bitnet`
    would write one. `bitnet.hidden_activation` says "relu2", which llama.cpp does not know (its bitnet
    graph then runs SiLU). Tensors are converted one at a time, in the order they are generated."""
    c = BitNetConfig.from_hf(config)
    if not c.ternary.packed or c.ternary.scale_divides:
        raise ValueError("GGUF layouts hold the packed release's weights: the config needs quantization_config "
                         "linear_class 'autobitlinear', quantization_mode 'offline'")
    if layout not in GGUF_LAYOUTS or embedding_type not in GGUF_EMBEDDING_TYPES:
        raise ValueError(f"unknown GGUF layout {layout!r} or embedding type {embedding_type!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "bitnet")
    add_gguf_metadata(writer, config, c, GGUF_FILE_TYPES[layout])
    if tokenizer and c.vocab_size == LLAMA3_VOCAB_SIZE and has_llama3_vocabulary():
        with tempfile.TemporaryDirectory() as scratch:
            write_llama3_tokenizer(Path(scratch), c.max_position_embeddings, CHAT_TEMPLATE, BOS_TOKEN, EOS_TOKEN)
            add_gguf_vocabulary(writer, Path(scratch), c.vocab_size)

    # The weights come in name order, each projection's codes right before its weight_scale: the GGUF tensor
    # infos list them in that order, without the scales (folded into the blocks), then the data follows.
    tensors = bitnet_tensors(config, seed)
    names = gguf_tensor_names(c.num_layers)
    plan = []  # (type, logical shape) of each tensor written
    for name, dtype, shape, slices in tensors:
        if name.endswith(".weight_scale"):
            continue
        if dtype == torch.uint8:  # a projection: rows that are not whole blocks fall back to F16
            shape = (shape[0] * 4, shape[1])
            ggml_type = GGUF_LAYOUTS[layout] if shape[1] % 256 == 0 else GGMLQuantizationType.F16
        else:
            ggml_type = embedding_type if len(shape) == 2 else GGMLQuantizationType.F32
        plan.append((ggml_type, shape))
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        writer.add_tensor_info(names[name], shape, np.dtype(np.float32), math.prod(shape) // block_size * block_bytes,
                               raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    plan = iter(plan)
    for name, dtype, shape, slices in tensors:
        if dtype == torch.uint8:
            (codes,) = slices()  # written with its weight_scale, next
            continue
        if name.endswith(".weight_scale"):
            (weight_scale,) = slices()
            weights = unpack_ternary(codes).float() * weight_scale.float()  # exact: w = code * weight_scale
            pieces = [weights]
        else:
            pieces = slices()
        ggml_type, shape = next(plan)
        done = 0  # rows converted: the embedding arrives in slices, into one array (not two)
        for piece in pieces:
            converted = gguf_data(piece, ggml_type)
            if done == 0:
                data = np.empty((shape[0], *converted.shape[1:]), dtype=converted.dtype)
            data[done:done + len(converted)] = converted
            done += len(converted)
        writer.write_tensor_data(data)
    writer.close()
    return path


def gguf_data(weights: torch.Tensor, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Weights (rows, cols) or (n,) as a GGUF tensor's data, quantized as the converter does."""
    if ggml_type == GGMLQuantizationType.Q8_0:
        return quantize_q8_0(weights).data.numpy()  # byte for byte gguf's, 10x faster
    return gguf.quants.quantize(weights.float().numpy(), ggml_type)


def gguf_tensor_names(num_layers: int) -> dict:
    """Hugging Face tensor name -> llama.cpp's (gguf's TensorNameMap for MODEL_ARCH.BITNET)."""
    names = {hf: gguf_name for hf, gguf_name in MODEL_NAMES.values()}
    for i in range(num_layers):
        names.update({hf.format(i=i): gguf_name.format(i=i) for hf, gguf_name in LAYER_NAMES.values()})
    return names


def add_gguf_metadata(writer: gguf.GGUFWriter, config: dict, c: BitNetConfig, file_type: gguf.LlamaFileType):
    """The keys llama.cpp's converter writes for BitNet (TextModel.set_gguf_parameters + BitnetModel's linear
    rope scaling of 1), plus bitnet.vocab_size (so that a file without a vocabulary still says its size) and
    bitnet.hidden_activation."""
    writer.add_name("BitNet b1.58 (random weights)")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    add_decoder_gguf_metadata(writer, c)
    if "head_dim" in config:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(1.0)
    writer.add_vocab_size(c.vocab_size)
    writer.add_string("bitnet.hidden_activation", config.get("hidden_act", "relu2"))


