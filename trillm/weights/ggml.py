"""GGML block formats as GGUF files store them (placeholder: being written)."""
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType


@dataclass
class GGMLTensor:
    """A 2-D weight exactly as a GGUF file stores it: one row of blocks per output row."""

    type: GGMLQuantizationType
    data: torch.Tensor  # uint8 (rows, bytes_per_row), usually a view of the memory-mapped file
    shape: tuple[int, int]  # logical (rows, cols) = (out_features, in_features)
