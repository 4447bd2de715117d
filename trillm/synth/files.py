"""Writing safetensors files a tensor (or a slice of one) at a time, so that a checkpoint of several GB never
sits in memory whole (safetensors' own writer takes every tensor at once)."""

import json
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# (name, dtype, shape, slices): `slices()` generates the tensor's values in row order.
Tensor = tuple[str, torch.dtype, tuple[int, ...], Callable[[], Iterator[torch.Tensor]]]

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.uint8: "U8", torch.float32: "F32"}


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict | None = None):
    """A .safetensors file (8-byte header length, JSON header, raw little-endian data), written as each
    tensor's slices are generated: only one slice is in memory at a time."""
    header, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata or {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the safetensors writer pads it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape, slices in tensors:
            written = 0
            for piece in slices():
                assert piece.dtype == dtype, (name, piece.dtype)
                data = piece.contiguous().view(torch.uint8).numpy()
                file.write(data.tobytes())
                written += data.size
            assert written == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
