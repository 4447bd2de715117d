"""A GGUF file (llama.cpp's format), read with the `gguf` package.

Metadata becomes a plain dict; tensors stay memory-mapped in their GGML block format (`GGMLTensor`),
or become dense torch tensors for the float types. Shapes are given the PyTorch way: (rows, cols).
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from trillm.errors import CheckpointError
from trillm.weights.ggml import GGMLTensor

DENSE_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def read_metadata(reader: GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


class GGUFCheckpoint:
    """Tensors and metadata of one GGUF file."""

    kind = "gguf"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as error:  # the reader fails with ValueError/struct errors on a cut file
            raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({error})") from None
        self.metadata = read_metadata(self.reader)
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "unknown")

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> "torch.Tensor | GGMLTensor":
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        tensor = self.tensors[name]
        stored_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest first
        if shape is not None and stored_shape != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {list(stored_shape)}, "
                f"expected {list(shape)} from the model metadata"
            )
        with warnings.catch_warnings():  # the memory map is read-only, and we never write to it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.asarray(tensor.data))
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            return data.view(torch.bfloat16).reshape(stored_shape)
        if tensor.tensor_type in DENSE_TYPES:
            return data.reshape(stored_shape)
        return GGMLTensor(tensor.tensor_type, data.reshape(stored_shape[0], -1) if len(stored_shape) == 2 else data, stored_shape)

    def generation_config(self) -> dict:
        return {}

    def tokenizer(self):
        from trillm.tokenizer import tokenizer_from_gguf

        if "tokenizer.ggml.tokens" not in self.metadata:
            return None
        return tokenizer_from_gguf(self.metadata)
