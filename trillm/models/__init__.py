"""The model families, one file each, and which checkpoints each one reads.

A Hugging Face folder names its family in config.json: `architectures` (the class transformers builds)
or, without one, `model_type` (which transformers then goes by); a GGUF file in `general.architecture`.
Adding a family is adding its file and its lines here.
"""

from collections.abc import Callable

from trillm.errors import CheckpointError
from trillm.models.bitnet import load_bitnet, load_bitnet_gguf
from trillm.models.gpt_oss import load_gpt_oss
from trillm.models.llama import load_llama

# Each loader: (checkpoint, head format or None) -> the network (models/layers.py: Transformer).
HF_ARCHITECTURES = {"LlamaForCausalLM": load_llama, "BitNetForCausalLM": load_bitnet,
                    "GptOssForCausalLM": load_gpt_oss}
HF_MODEL_TYPES = {"llama": load_llama, "bitnet": load_bitnet, "gpt_oss": load_gpt_oss}
GGUF_ARCHITECTURES = {"llama": load_llama, "bitnet": load_bitnet_gguf, "gpt-oss": load_gpt_oss}


def family_loader(checkpoint) -> Callable:
    """The loader of the family this checkpoint belongs to; CheckpointError naming what it says otherwise."""
    if checkpoint.kind == "gguf":
        architecture = checkpoint.metadata.get("general.architecture")
        if architecture not in GGUF_ARCHITECTURES:
            raise CheckpointError(f"{checkpoint.path}: unsupported GGUF architecture {architecture!r} "
                                  f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        return GGUF_ARCHITECTURES[architecture]
    architectures = checkpoint.config.get("architectures") or []
    if architectures:
        if architectures[0] not in HF_ARCHITECTURES:
            raise CheckpointError(f"{checkpoint.path}: unsupported architecture {architectures[0]!r} "
                                  f"(supported: {', '.join(HF_ARCHITECTURES)})")
        return HF_ARCHITECTURES[architectures[0]]
    model_type = checkpoint.config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{checkpoint.path}: config.json names no supported architecture or model_type "
                              f"(model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)})")
    return HF_MODEL_TYPES[model_type]
