"""Synthetic gpt-oss checkpoints: random weights in the exact layout of the release, and of llama.cpp's GGUF.

`write_gpt_oss` writes a Hugging Face folder as openai/gpt-oss-20b ships it: its config.json (shape
overridable), safetensors shards with an index (the release's 00000-of-0000N names, ~4.8 GB each for 20b),
the release's tensor names and dtypes (bf16 dense parts, experts as MXFP4 `*_blocks` uint8 [E, rows, cols/32,
16] and `*_scales` uint8 [E, rows, cols/32], gate and up rows interleaved), generation_config.json, and, with
quicktok installed, the real o200k_harmony tokenizer. `write_gpt_oss_gguf` writes the same weights as
llama.cpp's converter would (conversion/gpt_oss.py): gate and up split, MXFP4 repacked into 17-byte blocks
with elements j and j + 16 in one byte, sinks as `attn_sinks.weight`, norms and biases F32, the dense parts
BF16 or Q8_0. Tensors are generated and written one at a time: memory stays far below the file's size.
"""

import copy
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from trillm.models.gpt_oss import LAYER_NAMES, GptOssConfig
from trillm.models.loading import MODEL_NAMES
from trillm.synth.files import add_decoder_gguf_metadata, write_safetensors
from trillm.synth.vocabulary import (
    O200K_HARMONY_VOCAB_SIZE,
    has_llama3_vocabulary,
    quicktok_ranks,
    quicktok_special_tokens,
    write_o200k_harmony_tokenizer,
)
from trillm.weights.ggml import quantize_q8_0

# openai/gpt-oss-20b's config.json.
GPT_OSS_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 201088,
}

PRESETS = {
    "gpt-oss-20b": {},  # 24 layers of 32 experts, 21B parameters, ~13 GB
    "gpt-oss-tiny": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, layer_types=["sliding_attention",
                         "full_attention"], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, sliding_window=4,
                         max_position_embeddings=4096),  # ~30 MB, most of it the real vocabulary's embedding
}
LAYOUTS = ("release", "gguf")
DENSE_TYPES = {"bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
SHARD_BYTES = 5 * 10**9  # the release's shards hold 4-5 GB each
EMBEDDING_ROWS_PER_SLICE = 8192


def gpt_oss_config(preset: str = "gpt-oss-20b", **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    config = copy.deepcopy(GPT_OSS_20B_CONFIG)
    config.update(copy.deepcopy(PRESETS[preset]))
    config.update(copy.deepcopy(overrides))
    return config


def has_vocabulary() -> bool:
    return has_llama3_vocabulary()  # quicktok ships o200k_harmony beside Llama 3's


# ---- Tensors: the release's names, shapes and dtypes; random values at a sensible scale ---------------------

def gpt_oss_tensors(config: dict, seed: int) -> list:
    """(name, dtype, shape, slices) of every tensor of the release layout, in name order; `slices()`
    generates the values in row order (the same ones on every call)."""
    c = GptOssConfig.from_hf(config)
    hidden, inner, experts, vocab = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def generated(seed_offset: int, make):
        return lambda: make(torch.Generator().manual_seed(seed * 100_003 + seed_offset))

    def dense(shape, std):
        return lambda generator: iter([(torch.randn(shape, generator=generator) * std).bfloat16()])

    def rows_of(shape, std):  # the embedding and head, a slice at a time
        def slices(generator):
            for start in range(0, shape[0], EMBEDDING_ROWS_PER_SLICE):
                rows = min(EMBEDDING_ROWS_PER_SLICE, shape[0] - start)
                yield (torch.randn(rows, shape[1], generator=generator) * std).bfloat16()
        return slices

    def norm(length):
        return lambda generator: iter([(torch.rand(length, generator=generator) + 0.5).bfloat16()])

    def codes(shape):  # uniform codes: every FP4 value, signs even
        def slices(generator):
            for expert in range(shape[0]):
                yield torch.randint(0, 256, shape[1:], generator=generator, dtype=torch.uint8)[None]
        return slices

    def scales(shape, cols):
        # FP4 values have an rms of 2.93: a scale 2^(s - 127) near 1 / (2.93 sqrt(cols)) keeps outputs at the
        # inputs' scale.
        center = 127 + round(math.log2(1 / (2.93 * math.sqrt(cols))))
        return lambda generator: iter([torch.randint(center - 1, center + 2, shape, generator=generator,
                                                     dtype=torch.uint8)])

    tensors = [("model.embed_tokens.weight", torch.bfloat16, (vocab, hidden), rows_of((vocab, hidden), 1.0)),
               ("lm_head.weight", torch.bfloat16, (vocab, hidden), rows_of((vocab, hidden), 2 / math.sqrt(hidden))),
               ("model.norm.weight", torch.bfloat16, (hidden,), norm(hidden))]
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        tensors += [
            (f"{p}.input_layernorm.weight", torch.bfloat16, (hidden,), norm(hidden)),
            (f"{p}.post_attention_layernorm.weight", torch.bfloat16, (hidden,), norm(hidden)),
            (f"{p}.self_attn.sinks", torch.float32, (c.num_heads,),
             lambda generator, n=c.num_heads: iter([torch.randn(n, generator=generator)])),
            (f"{p}.mlp.router.weight", torch.bfloat16, (experts, hidden), dense((experts, hidden), 1 / math.sqrt(hidden))),
            (f"{p}.mlp.router.bias", torch.bfloat16, (experts,), dense((experts,), 0.1)),
            (f"{p}.mlp.experts.gate_up_proj_blocks", torch.uint8, (experts, 2 * inner, hidden // 32, 16),
             codes((experts, 2 * inner, hidden // 32, 16))),
            (f"{p}.mlp.experts.gate_up_proj_scales", torch.uint8, (experts, 2 * inner, hidden // 32),
             scales((experts, 2 * inner, hidden // 32), hidden)),
            (f"{p}.mlp.experts.gate_up_proj_bias", torch.bfloat16, (experts, 2 * inner), dense((experts, 2 * inner), 0.1)),
            (f"{p}.mlp.experts.down_proj_blocks", torch.uint8, (experts, hidden, inner // 32, 16),
             codes((experts, hidden, inner // 32, 16))),
            (f"{p}.mlp.experts.down_proj_scales", torch.uint8, (experts, hidden, inner // 32),
             scales((experts, hidden, inner // 32), inner)),
            (f"{p}.mlp.experts.down_proj_bias", torch.bfloat16, (experts, hidden), dense((experts, hidden), 0.1)),
        ]
        for name, rows, cols in (("q", q_rows, hidden), ("k", kv_rows, hidden), ("v", kv_rows, hidden),
                                 ("o", hidden, q_rows)):
            tensors += [(f"{p}.self_attn.{name}_proj.weight", torch.bfloat16, (rows, cols), dense((rows, cols), 1 / math.sqrt(cols))),
                        (f"{p}.self_attn.{name}_proj.bias", torch.bfloat16, (rows,), dense((rows,), 0.1))]
    tensors.sort(key=lambda tensor: tensor[0])
    return [(name, dtype, shape, generated(index, make)) for index, (name, dtype, shape, make) in enumerate(tensors)]


def write_gpt_oss(folder: str | Path, config: dict, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a random-weight release folder for this config.json; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = gpt_oss_tensors(config, seed)
    shards, size = [[]], 0
    for tensor in tensors:
        nbytes = math.prod(tensor[2]) * tensor[1].itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards):
        name = f"model-{index:05d}-of-{len(shards) - 1:05d}.safetensors"
        write_safetensors(folder / name, shard)
        weight_map.update({tensor[0]: name for tensor in shard})
    total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape, _ in tensors)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    generation = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
                  "pad_token_id": 199999}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer and config["vocab_size"] == O200K_HARMONY_VOCAB_SIZE and has_vocabulary():
        write_o200k_harmony_tokenizer(folder, config["max_position_embeddings"])
    return folder


# ---- GGUF: the same weights as llama.cpp's converter writes them ---------------------------------------------

def write_gpt_oss_gguf(path: str | Path, config: dict, seed: int = 0, tokenizer: bool = True,
                       dense_type: str = "bf16") -> Path:
    """The weights `write_gpt_oss` writes for this config and seed, as one GGUF file of llama.cpp's `gpt-oss`
    architecture, its dense matrices (projections, router, embedding, head) in `dense_type`."""
    c = GptOssConfig.from_hf(config)
    path = Path(path)
    writer = gguf.GGUFWriter(path, "gpt-oss")
    add_gguf_metadata(writer, config, c, dense_type)
    if tokenizer and c.vocab_size == O200K_HARMONY_VOCAB_SIZE and has_vocabulary():
        add_o200k_harmony_vocabulary(writer)
    names = gguf_tensor_names(c.num_layers)
    tensors = {name: (dtype, shape, slices) for name, dtype, shape, slices in gpt_oss_tensors(config, seed)}
    plan = []  # (GGUF name, ggml type, logical shape, data maker), in the converter's order
    for name, (dtype, shape, slices) in tensors.items():
        if name.endswith("_scales") or name.endswith("gate_up_proj_bias"):
            continue  # written with their blocks, and gate/up split below
        if name.endswith("gate_up_proj_blocks"):
            layer = name[: -len(".mlp.experts.gate_up_proj_blocks")].replace("model.layers.", "blk.")
            scales, bias = tensors[name.replace("_blocks", "_scales")], tensors[name.replace("_blocks", "_bias")]
            for half, kind in ((0, "gate"), (1, "up")):
                plan.append((f"{layer}.ffn_{kind}_exps.weight", GGMLQuantizationType.MXFP4, (shape[0], shape[1] // 2, shape[2] * 32),
                             lambda s=slices, sc=scales, h=half: gguf_mxfp4(s, sc, h)))
                plan.append((f"{layer}.ffn_{kind}_exps.bias", GGMLQuantizationType.F32, (shape[0], shape[1] // 2),
                             lambda b=bias, h=half: only(b[2])[:, h::2].float().numpy()))
        elif name.endswith("down_proj_blocks"):
            layer = name[: -len(".mlp.experts.down_proj_blocks")].replace("model.layers.", "blk.")
            plan.append((f"{layer}.ffn_down_exps.weight", GGMLQuantizationType.MXFP4, (shape[0], shape[1], shape[2] * 32),
                         lambda s=slices, sc=tensors[name.replace("_blocks", "_scales")]: gguf_mxfp4(s, sc, None)))
        elif len(shape) == 1 or name.endswith("_bias"):
            plan.append((names[name], GGMLQuantizationType.F32, shape, lambda s=slices: only(s).float().numpy()))
        else:
            plan.append((names[name], DENSE_TYPES[dense_type], shape, lambda s=slices, t=dense_type: dense_data(s, t)))
    for name, ggml_type, shape, _ in plan:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) // block_size * block_bytes,
                               raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, _, data in plan:
        writer.write_tensor_data(data())
    writer.close()
    return path


def only(slices) -> torch.Tensor:
    (tensor,) = slices()
    return tensor


def dense_data(slices, dense_type: str) -> np.ndarray:
    weights = torch.cat(list(slices()))
    if dense_type == "q8_0":
        return quantize_q8_0(weights).data.numpy()
    return weights.view(torch.uint16).numpy()  # bf16 bits as the writer takes them


def gguf_mxfp4(code_slices, scales, half: int | None) -> np.ndarray:
    """The release's blocks (E, rows, cols/32, 16) and scales as llama.cpp's 17-byte blocks, the rows of one
    half of an interleaved gate/up bank when `half` is given."""
    codes = torch.cat(list(code_slices()))
    scale = only(scales[2])
    if half is not None:
        codes, scale = codes[:, half::2], scale[:, half::2]
    low, high = codes & 15, codes >> 4  # elements 2j, 2j + 1
    elements = torch.stack([low, high], dim=-1).flatten(-2)
    repacked = elements[..., :16] | (elements[..., 16:] << 4)  # byte j: elements j, j + 16
    blocks = torch.cat([scale.unsqueeze(-1), repacked], dim=-1)
    return blocks.reshape(codes.shape[0], codes.shape[1], -1).numpy()


def gguf_tensor_names(num_layers: int) -> dict:
    """Hugging Face tensor name -> llama.cpp's, for the tensors that keep a name of their own."""
    names = {hf: gguf_name for hf, gguf_name in MODEL_NAMES.values()}
    for i in range(num_layers):
        names.update({hf.format(i=i): gguf_name.format(i=i) for hf, gguf_name in LAYER_NAMES.values()
                      if hf is not None and gguf_name is not None})
    return names


def add_gguf_metadata(writer: gguf.GGUFWriter, config: dict, c: GptOssConfig, dense_type: str):
    """The keys llama.cpp's converter writes for gpt-oss (TextModel.set_gguf_parameters and GptOssModel's)."""
    writer.add_name("gpt-oss (random weights)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dense_type == "bf16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    add_decoder_gguf_metadata(writer, c)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.experts_per_token)
    rope = config["rope_scaling"]
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    writer.add_sliding_window(c.sliding_window)
    writer.add_expert_feed_forward_length(c.intermediate_size)
    writer.add_vocab_size(c.vocab_size)


def add_o200k_harmony_vocabulary(writer: gguf.GGUFWriter):
    """tokenizer.ggml.* as the converter's _set_vocab_gpt2 writes gpt-oss's: byte-level pieces by id, the
    special tokens CONTROL, the reserved ids up to the embedding's size padding, pre-tokenizer "gpt-4o"."""
    from trillm.tokenizer import _gpt2_byte_spelling

    spelling = _gpt2_byte_spelling()
    tokens = [f"[PAD{i}]" for i in range(O200K_HARMONY_VOCAB_SIZE)]
    types = [gguf.TokenType.UNUSED] * O200K_HARMONY_VOCAB_SIZE
    ranks = quicktok_ranks("o200k")
    for token, rank in ranks.items():
        tokens[rank], types[rank] = "".join(spelling[byte] for byte in token), gguf.TokenType.NORMAL
    for token_id, name in quicktok_special_tokens("o200k_harmony").items():
        tokens[token_id], types[token_id] = name, gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    from trillm.tokenizer import _tiktoken_merges

    spelled = {token: "".join(spelling[byte] for byte in token) for token in ranks}
    writer.add_token_merges([f"{spelled[left]} {spelled[right]}" for left, right in _tiktoken_merges(ranks)])
    writer.add_bos_token_id(199998)
    writer.add_eos_token_id(200002)
    writer.add_pad_token_id(199999)
    writer.add_add_bos_token(False)


def write_preset(preset: str, out: Path, layout: str = "release", seed: int = 0, dense_type: str = "bf16") -> Path:
    """A preset's release folder, or with layout "gguf" its .gguf file with the dense parts in `dense_type`."""
    if layout == "gguf":
        return write_gpt_oss_gguf(out, gpt_oss_config(preset), seed, dense_type=dense_type)
    return write_gpt_oss(out, gpt_oss_config(preset), seed)
