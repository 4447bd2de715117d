"""A trained BitNet written in the release layouts: microsoft/bitnet-b1.58-2B-4T's packed one (uint8, four
2-bit codes w + 1 a byte, and a bf16 weight_scale beside each projection) and microsoft/bitnet-b1.58-2B-4T-
bf16's master one (bf16 weights, ternarized by whoever loads them), with config.json as theirs and the
tokenizer's files, so that trillm, transformers and (converted) llama.cpp and bitnet.cpp load it. A model
started from LLaMA is written as a LlamaForCausalLM with the same quantization_config (transformers swaps
its projections for BitLinears; the head, in modules_to_not_convert, stays bf16)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trillm.synth.bitnet import BITNET_2B4T_CONFIG, MASTER_QUANTIZATION_CONFIG, bitnet_config
from trillm.train.recipe import BitLinear, BitNetModel, quantize_weight
from trillm.weights.ternary import pack_ternary

EXPORT_LAYOUTS = ("packed", "bf16")


def config_json(model: BitNetModel, layout: str) -> dict:
    s = model.shape
    if s.architecture == "llama":
        return llama_config_json(model, layout)
    return bitnet_config("bitnet-b1.58-2b-4t", layout, vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                         intermediate_size=s.intermediate_size, num_hidden_layers=s.num_hidden_layers,
                         num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                         max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps,
                         rope_theta=s.rope_theta, bos_token_id=s.bos_token_id, eos_token_id=s.eos_token_id)


def llama_config_json(model: BitNetModel, layout: str) -> dict:
    s = model.shape
    stored = MASTER_QUANTIZATION_CONFIG if layout == "bf16" else BITNET_2B4T_CONFIG["quantization_config"]
    quantization = {**stored, "modules_to_not_convert": ["lm_head"]}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
            "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim,
            "max_position_embeddings": s.max_position_embeddings, "rms_norm_eps": s.rms_norm_eps,
            "rope_theta": s.rope_theta, "rope_scaling": s.rope_scaling, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": s.tie_word_embeddings, "bos_token_id": s.bos_token_id,
            "eos_token_id": s.eos_token_id, "torch_dtype": "bfloat16", "quantization_config": quantization}


def checkpoint_tensors(model: BitNetModel, layout: str) -> dict[str, torch.Tensor]:
    """The state dict under the release's names: model.embed_tokens.weight, model.layers.N..., model.norm."""
    tensors = {}
    projections = {name for name, module in model.named_modules() if isinstance(module, BitLinear)}
    for name, parameter in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        key = name if module == "lm_head" else f"model.{name}"
        if module in projections and layout == "packed":
            values, scale = quantize_weight(parameter.float())
            tensors[key] = pack_ternary(values.to(torch.int8))
            tensors[key + "_scale"] = scale.reshape(1).to(torch.bfloat16)
        else:
            tensors[key] = parameter.detach().to(torch.bfloat16).contiguous()
    return tensors


def write_tokenizer(tokenizer, folder: Path):
    """tokenizer.json (the backend as trillm runs it) and tokenizer_config.json (special tokens, template)."""
    (folder / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "model_max_length": 1 << 30}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_model(model: BitNetModel, tokenizer, out: str | Path, layout: str = "packed") -> Path:
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"unknown export layout {layout!r} (choose from {', '.join(EXPORT_LAYOUTS)})")
    if not model.ternary:
        raise ValueError("a full-precision model has no ternary layout to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(model, layout), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json(model, layout), indent=2) + "\n")
    generation = {"bos_token_id": model.shape.bos_token_id, "eos_token_id": model.shape.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer(tokenizer, out)
    return out
