"""A Hugging Face model folder: config.json, a single or sharded safetensors checkpoint, tokenizer files.

Tensors are memory-mapped by `safetensors` and returned as stored (dtype and shape untouched).
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from trillm.checkpoint.fields import Fields
from trillm.checkpoint.pages import drop_pages, file_mapping
from trillm.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def find_tensor_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = Fields(json.loads(index.read_text()), index).get("weight_map")
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{index}: invalid JSON ({error})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            # A name, not a path: the index must not reach files outside the folder ("../x", "/etc/passwd").
            # (The shard itself may be a link, as in the Hugging Face cache, where links point to blobs.)
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside the model folder")
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder / shard}: shard listed in {INDEX_FILE} is missing")
        return {name: folder / shard for name, shard in weight_map.items()}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        hint = f" (found {', '.join(pickles)}: trillm never unpickles; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors checkpoint{hint}")
    files = {}
    for shard in shards:
        for name in open_safetensors(shard).keys():
            files[name] = shard
    return files


def open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # SafetensorError carries the reason (e.g. a truncated file)
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def check_shape(path: Path, name: str, stored: tuple[int, ...], expected: tuple[int, ...] | None):
    if expected is not None and tuple(stored) != tuple(expected):
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {list(stored)}, expected {list(expected)} from the model config"
        )


class HFCheckpoint:
    """Tensors of a model folder, read lazily through memory maps."""

    kind = "safetensors"

    def __init__(self, folder: Path, config: dict):
        self.path = folder
        self.config = config
        self.tensor_files = find_tensor_files(folder)
        self._open_files = {}
        self._mappings = {}  # file -> the address range safetensors maps it at

    def names(self) -> list[str]:
        return list(self.tensor_files)

    def file_of(self, name: str) -> Path:
        if name not in self.tensor_files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self.tensor_files[name]

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The stored tensor; with `shape`, a mismatch is an error naming file, tensor and both shapes."""
        path = self.file_of(name)
        if path not in self._open_files:
            self._open_files[path] = open_safetensors(path)
        try:
            tensor = self._open_files[path].get_tensor(name)
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({error})") from None
        check_shape(path, name, tuple(tensor.shape), shape)
        return tensor

    def release(self, name: str, rows: tuple[int, int] | None = None):
        """Drop a tensor's file pages (or those of rows [start, end)) from resident memory, once the model
        holds its own copy (see pages.py). Anything not inside the file's memory map is left alone."""
        tensor = self.get(name)
        row_bytes = tensor[0].numel() * tensor.element_size() if tensor.dim() else tensor.element_size()
        first, end = rows or (0, len(tensor) if tensor.dim() else 1)
        address = tensor.data_ptr() + first * row_bytes
        path = self.file_of(name)
        mapping = self._mappings.get(path)
        if mapping is None or not mapping[0] <= address < mapping[1]:
            mapping = self._mappings[path] = file_mapping(path, address)
        if mapping is not None:
            drop_pages(mapping, address, (end - first) * row_bytes)

    def generation_config(self) -> dict:
        path = self.path / "generation_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def tokenizer(self):
        from trillm.tokenizer import load_tokenizer

        return load_tokenizer(self.path)
