"""Building a LLaMA-style decoder from a checkpoint: the names Hugging Face and llama.cpp give its tensors,
the shapes the config implies, and the loading steps the families share (embedding, output head and norm;
the layer loop that lets go of what it copied; the RoPE frequencies). A family passes its own reading of
a layer's tensors and its own block (models/llama.py, models/bitnet.py).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from trillm.checkpoint.pages import trim_heap
from trillm.checkpoint.fields import Fields
from trillm.errors import CheckpointError
from trillm.models.layers import DecoderConfig, RMSNorm, rope_inverse_frequencies
from trillm.weights import GGMLTensor, TernaryTensor, make_embedding
from trillm.weights.ggml import check_layout
from trillm.weights.head import make_output_head
from trillm.weights.huge_pages import weights_copied
from trillm.weights.ternary import check_ternary_codes, ternarize_absmean

# A layer's tensors are named "model.layers.{i}." (Hugging Face) or "blk.{i}." (GGUF).
LAYER_INDEX = re.compile(r"^(?:model\.layers|blk)\.(\d+)\.")

# Our name for a tensor -> (its name in a Hugging Face folder, in a GGUF file); {i} is the layer.
MODEL_NAMES = {
    "embedding": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "head": ("lm_head.weight", "output.weight"),
}
DECODER_LAYER_NAMES = {
    "attention_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}


def checkpoint_names(table: dict, kind: str, layer: int | None = None) -> dict[str, str]:
    """Our key -> the tensor's name in a checkpoint of this kind ("safetensors" or "gguf"); a key without a
    name in that kind (None) is left out."""
    column = 1 if kind == "gguf" else 0
    return {key: names[column].format(i=layer) for key, names in table.items() if names[column] is not None}


def decoder_layer_shapes(c: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """The logical shape of each tensor of DECODER_LAYER_NAMES: (out_features, in_features), or a norm's length."""
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "attention_norm": (c.hidden_size,),
        "q": (q_rows, c.hidden_size),
        "k": (kv_rows, c.hidden_size),
        "v": (kv_rows, c.hidden_size),
        "o": (c.hidden_size, q_rows),
        "mlp_norm": (c.hidden_size,),
        "gate": (c.intermediate_size, c.hidden_size),
        "up": (c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }


def load_ends(checkpoint, config: DecoderConfig, head_format: str | None,
              int8_activations: bool = False) -> tuple[nn.Module, nn.Module, RMSNorm]:
    """The embedding, the output head (the embedding's own rows when tied; `int8_activations`: see
    make_output_head) and the final norm.

    A head re-stored in `head_format` (weights/head.py) is a copy: the stored rows' pages are let go as they
    are done, so that the stored and the re-stored head are never both resident. A head copied into huge
    pages lets go of them as it copies, and a tied embedding then looks its rows up in that copy (read back
    from the file, each lookup would map the page cache's large folios around its row: 140 MB of 2B4T's
    Q8_0 embedding for a 128-token prompt).
    """
    names = checkpoint_names(MODEL_NAMES, checkpoint.kind)
    vocab_shape = (config.vocab_size, config.hidden_size)
    embedding_weight = read_weight(checkpoint, names["embedding"], vocab_shape)
    # A GGUF file says "tied" by having no output.weight (llama.cpp reads token_embd then); config.json says it.
    head_name = names["embedding" if config.tie_word_embeddings else "head"]
    head = make_output_head(read_weight(checkpoint, head_name, vocab_shape), head_format,
                            lambda start, end: checkpoint.release(head_name, (start, end)), int8_activations)
    if weights_copied() and config.tie_word_embeddings:
        embedding_weight = rows_as_stored(head, embedding_weight)
    embedding = make_embedding(embedding_weight)  # lookups read single rows
    norm = RMSNorm(read_norm(checkpoint, names["norm"], (config.hidden_size,)), config.rms_norm_eps)
    return embedding, head, norm


def rows_as_stored(head: nn.Module, weight):
    """The head's own copy of `weight` where it keeps it as stored (same GGML type or dtype), else `weight`."""
    kept = getattr(head, "weight", None)
    if isinstance(weight, GGMLTensor):
        return kept if isinstance(kept, GGMLTensor) and kept.type == weight.type else weight
    return kept if isinstance(kept, torch.Tensor) and kept.dtype == weight.dtype and kept.shape == weight.shape else weight


def read_weight(checkpoint, name: str, shape: tuple):
    """A stored matrix, its GGML block layout (if any) checked: the error names the tensor."""
    weight = checkpoint.get(name, shape)
    if isinstance(weight, GGMLTensor):
        try:
            check_layout(weight)
        except ValueError as error:
            raise CheckpointError(f"{checkpoint.file_of(name)}: tensor {name!r}: {error}") from None
    return weight


def read_norm(checkpoint, name: str, shape: tuple) -> torch.Tensor:
    """A norm's weight: floating point and finite, or an error naming it. (The large matrices are not
    scanned for NaN at load, as llama.cpp does not without --check-tensors.)"""
    weight = checkpoint.get(name, shape)
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        problem = f"is {weight.dtype}" if not weight.is_floating_point() else "holds NaN or infinite values"
        raise CheckpointError(f"{checkpoint.file_of(name)}: norm weight {name!r} {problem}")
    return weight


def read_tensor(checkpoint, name: str, shape: tuple):
    """A layer tensor of either kind, checked as read_norm or read_weight checks it."""
    return (read_norm if len(shape) == 1 else read_weight)(checkpoint, name, shape)


def check_layer_count(checkpoint, config: DecoderConfig):
    """Raise CheckpointError if the file holds layers past the config's count (they would be ignored)."""
    layers = [int(match[1]) for name in checkpoint.names() if (match := LAYER_INDEX.match(name))]
    if layers and max(layers) >= config.num_layers:
        raise CheckpointError(f"{checkpoint.path}: the checkpoint holds layers up to {max(layers)}, but its config "
                              f"says {config.num_layers} layers")


def load_layers(checkpoint, config: DecoderConfig, table: dict, shapes: dict,
                read: Callable[[str, str, tuple], object], make_block: Callable[[dict, int], nn.Module],
                copied: tuple[str, ...]) -> list[nn.Module]:
    """The blocks, one layer at a time: `read(key, name, shape)` gives each of the layer's tensors (of
    `table`, e.g. DECODER_LAYER_NAMES, with their `shapes`; read_tensor checks one as stored),
    `make_block(tensors, layer)` its block.

    Then the file pages of the tensors the block holds copies of (`copied`: fused, retiled or converted)
    are let go, and so is the allocator's scratch of building them: left in place between the kept
    copies, 30 layers' worth of it added ~55 MB to the peak of loading BitNet 2B4T.
    """
    check_layer_count(checkpoint, config)
    blocks = []
    for i in tqdm(range(config.num_layers), desc="loading", unit="layer", leave=False, disable=None):
        names = checkpoint_names(table, checkpoint.kind, i)
        blocks.append(make_block({key: read(key, name, shapes[key]) for key, name in names.items()}, i))
        for key in copied:
            checkpoint.release(names[key])
        trim_heap()
    return blocks


def rope_frequencies(checkpoint, config: DecoderConfig) -> torch.Tensor:
    """RoPE's inverse frequencies from the config; in a GGUF file, divided by `rope_freqs.weight` where
    there is one (llama.cpp stores Llama 3.1's frequency scaling as per-pair divisors)."""
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    if checkpoint.kind == "gguf" and "rope_freqs.weight" in checkpoint.names():
        inv_freq = inv_freq / checkpoint.get("rope_freqs.weight", (config.head_dim // 2,)).float()
    return inv_freq


# ---- Ternary projections: how config.json's quantization_config (quant_method "bitnet") stores them -------
#
# BitNetForCausalLM always has one; a LlamaForCausalLM has one when its projections were trained to 1.58
# bits (Hugging Face's "Fine-tuning LLMs to 1.58bit", `trillm train --init-from`). As transformers reads it
# (integrations/bitnet.py):
# - packed, "quantization_mode": "offline" (the release, microsoft/bitnet-b1.58-2B-4T): uint8 [out/4, in],
#   four 2-bit codes a byte, and a bf16 `weight_scale` [1] beside each weight. With "linear_class":
#   "autobitlinear" (the release's) transformers multiplies the output by weight_scale; with "bitlinear"
#   it divides by it.
# - dense, "autobitlinear" + "online" (the bf16 master weights, microsoft/bitnet-b1.58-2B-4T-bf16): bf16
#   [out, in], which transformers ternarizes by absmean on every forward; here once, at load.

# Ternary codes per stored byte of a packed projection (rows r, r + R, r + 2R, r + 3R share byte row r).
CODES_PER_BYTE = 4


@dataclass(frozen=True)
class TernaryStorage:
    packed: bool  # uint8 codes + weight_scale ("offline"); False: dense master weights ("online")
    scale_divides: bool  # linear_class "bitlinear": y / weight_scale; "autobitlinear": y * weight_scale


def ternary_storage(config: Fields, source) -> TernaryStorage | None:
    """The storage config.json's quantization_config names, or None where it has no bitnet one."""
    quantization = config.table("quantization_config")
    if quantization.get("quant_method", None) != "bitnet":
        return None
    linear_class = quantization.text("linear_class", "bitlinear", choices=("bitlinear", "autobitlinear"))
    mode = quantization.text("quantization_mode", "offline", choices=("offline", "online"))
    if quantization.flag("use_rms_norm", False):
        raise CheckpointError(f"{source}: BitNet with use_rms_norm (a norm inside every BitLinear) is not supported")
    return TernaryStorage(packed=not (linear_class == "autobitlinear" and mode == "online"),
                          scale_divides=linear_class == "bitlinear")


# The projections that are BitLinears (keys of DECODER_LAYER_NAMES).
TERNARY_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def check_packed_shapes(c: DecoderConfig, storage: TernaryStorage | None, source):
    """Raise CheckpointError where packed projections would not fill whole bytes (4 rows share one)."""
    if storage is None or not storage.packed:
        return
    shapes = decoder_layer_shapes(c)
    for key in TERNARY_PROJECTIONS:
        if shapes[key][0] % CODES_PER_BYTE:
            raise CheckpointError(f"{source}: packed ternary projections need output sizes that are multiples "
                                  f"of {CODES_PER_BYTE}; {key} has {shapes[key][0]}")


def read_ternary(checkpoint, name: str, shape: tuple[int, int], storage: TernaryStorage) -> TernaryTensor:
    """One BitLinear weight as ternary codes and the scale that `y = (int8(x) @ W^T) / (act_scale * scale)`
    needs, from either storage (the shapes checked by check_packed_shapes), every code and the scale checked."""
    if not storage.packed:
        return ternarize_absmean(checkpoint.get(name, shape))  # as transformers' online AutoBitLinear does
    out_features, in_features = shape
    packed = checkpoint.get(name, (out_features // CODES_PER_BYTE, in_features))
    file = checkpoint.file_of(name)
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"{file}: tensor {name!r} is {packed.dtype}, expected uint8 packed ternary codes "
                              f"(config.json's quantization_config says the projections are packed)")
    try:
        check_ternary_codes(packed, name)
    except CheckpointError as error:
        raise CheckpointError(f"{file}: {error}") from None
    scale_name = f"{name}_scale"
    if scale_name not in checkpoint.names():
        raise CheckpointError(f"{file}: tensor {scale_name!r} is missing: each packed BitNet projection needs "
                              f"its weight_scale beside it")
    weight_scale = checkpoint.get(scale_name, (1,)).float()
    if not torch.isfinite(weight_scale).all() or weight_scale.item() == 0:
        raise CheckpointError(f"{file}: {scale_name!r} is {weight_scale.item()}: a weight scale must be finite "
                              f"and nonzero")
    # autobitlinear multiplies the output by weight_scale, bitlinear divides it: fold both into a divisor.
    return TernaryTensor(packed, weight_scale if storage.scale_divides else 1 / weight_scale, shape)
