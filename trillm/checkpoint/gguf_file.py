"""A GGUF file (llama.cpp's format, spec: ggml/docs/gguf.md), with the `gguf` package's type tables.

The header is parsed here in one pass rather than with `gguf.GGUFReader`, which builds a numpy object
for every vocabulary entry: on the 98 MB SmolLM2 file it costs ~350 MB of memory, more than the model.
Metadata becomes a plain dict (arrays as lists, as `ReaderField.contents()` gives them); tensors stay
memory-mapped in their GGML block format (`GGMLTensor`), or become dense torch tensors for the float
types. Shapes are given the PyTorch way: (rows, cols).
"""

import math
import mmap
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from trillm.checkpoint.fields import Fields
from trillm.checkpoint.pages import drop_pages
from trillm.errors import CheckpointError
from trillm.weights.ggml import GGMLTensor

DENSE_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}
GGML_TYPE_NUMBERS = {int(ggml_type) for ggml_type in GGML_QUANT_SIZES}
SCALARS = {  # GGUF value type -> struct format (little-endian)
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def row_bytes(ggml_type: GGMLQuantizationType, dims: list[int]) -> int:
    """Bytes of one row (dims[0] elements, GGUF's fastest-varying dimension) of a tensor of this type."""
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return dims[0] // block_size * block_bytes


class HeaderReader:
    """Reads GGUF header values from a bytes-like buffer, front to back."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.offset = 0

    def scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self.buffer):
            raise struct.error("string runs past the end of the file")
        return bytes(self.buffer[start:self.offset]).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        value_type = GGUFValueType(value_type)
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type != GGUFValueType.ARRAY:
            return self.scalar(SCALARS[value_type])
        item_type, count = GGUFValueType(self.scalar("<I")), self.scalar("<Q")
        if item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            return [self.value(item_type) for _ in range(count)]
        # Numeric arrays (token types, scores) in one read, kept as a numpy view of the file: as a list, a
        # 105 MB array took 1.35 GB.
        dtype = np.dtype(SCALARS[item_type])
        items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
        self.offset += count * dtype.itemsize
        return items


def read_entries(path: Path, buffer) -> tuple[dict, list[tuple[str, list[int], int, int]], int]:
    """(metadata, the tensor list as stored: (name, dims, type number, offset), where the header ends), with
    nothing checked beyond the magic and the version (bench.py reads files of types no gguf package knows)."""
    header = HeaderReader(buffer)
    if header.scalar("<I") != 0x46554747:  # b"GGUF" read little-endian
        raise CheckpointError(f"{path}: not a GGUF file")
    version = header.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = header.scalar("<Q"), header.scalar("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = header.string()
        metadata[key] = header.value(header.scalar("<I"))
    entries = []
    for _ in range(tensor_count):
        name = header.string()
        dims = [header.scalar("<Q") for _ in range(header.scalar("<I"))]
        entries.append((name, dims, header.scalar("<I"), header.scalar("<Q")))
    return metadata, entries, header.offset


def data_start_of(metadata: dict, header_end: int) -> int:
    """Where the tensor data starts: the header's end rounded up to general.alignment."""
    alignment = metadata.get("general.alignment", 32)
    return -(-header_end // alignment) * alignment


def read_header(path: Path, buffer) -> tuple[dict, dict, int]:
    """(metadata, tensor infos name -> (type, dims, offset), start of the tensor data), every entry checked."""
    metadata, entries, header_end = read_entries(path, buffer)
    alignment = Fields(metadata, path).integer("general.alignment", 32)
    if alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment must be a power of two, got {alignment}")
    infos, spans = {}, []
    for name, dims, type_number, offset in entries:
        if name in infos:
            raise CheckpointError(f"{path}: tensor {name!r} is listed twice")
        if type_number not in GGML_TYPE_NUMBERS:
            raise CheckpointError(f"{path}: tensor {name!r} has GGML type number {type_number}, which no GGUF "
                                  f"reader knows")
        ggml_type = GGMLQuantizationType(type_number)
        block_size = GGML_QUANT_SIZES[ggml_type][0]
        if not 1 <= len(dims) <= 4 or dims[0] % block_size:
            raise CheckpointError(f"{path}: tensor {name!r} has dimensions {dims}, not whole {ggml_type.name} "
                                  f"blocks of {block_size} (1 to 4 dimensions)")
        if offset % alignment:
            raise CheckpointError(f"{path}: tensor {name!r} starts at offset {offset}, not a multiple of "
                                  f"general.alignment {alignment}")
        infos[name] = (ggml_type, dims, offset)
        spans.append((offset, offset + math.prod(dims[1:]) * row_bytes(ggml_type, dims), name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the file")
    return metadata, infos, data_start_of(metadata, header_end)


class GGUFCheckpoint:
    """Tensors and metadata of one GGUF file, memory-mapped."""

    kind = "gguf"

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as file:
            # Copy-on-write: a tensor edited in Python changes this process's copy of its pages, never the file
            # (a read-only map would crash the process on the first write).
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        self.file = np.frombuffer(self.map, dtype=np.uint8)
        try:
            self.metadata, self.infos, self.data_start = read_header(path, self.file)
        except (struct.error, ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({error})") from None

    def names(self) -> list[str]:
        return list(self.infos)

    def file_of(self, name: str) -> Path:
        return self.path

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> "torch.Tensor | GGMLTensor":
        if name not in self.infos:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        ggml_type, dims, offset = self.infos[name]
        stored_shape = tuple(reversed(dims))  # GGUF lists dimensions fastest-varying first
        if shape is not None and stored_shape != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {list(stored_shape)}, "
                f"expected {list(shape)} from the model metadata"
            )
        stride = row_bytes(ggml_type, dims)
        rows = int(np.prod(dims[1:], dtype=np.int64))
        start = self.data_start + offset
        if start + rows * stride > len(self.file):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({ggml_type.name} {list(stored_shape)}) ends past the end "
                f"of the file: it is truncated"
            )
        data = torch.from_numpy(self.file[start:start + rows * stride]).view(rows, stride)
        if ggml_type in DENSE_TYPES:
            return data.view(DENSE_TYPES[ggml_type]).reshape(stored_shape)
        return GGMLTensor(ggml_type, data, stored_shape)

    def release(self, name: str, rows: tuple[int, int] | None = None):
        """Drop a tensor's pages (or those of rows [start, end)) from resident memory, once the model holds
        its own copy (fused or reordered weights), so the file's copy stops counting (see pages.py)."""
        ggml_type, dims, offset = self.infos[name]
        stride = row_bytes(ggml_type, dims)
        first, end = rows or (0, int(np.prod(dims[1:], dtype=np.int64)))
        base = self.file.ctypes.data
        drop_pages((base, base + len(self.file)), base + self.data_start + offset + first * stride,
                   (end - first) * stride)

    def generation_config(self) -> dict:
        return {}

    def tokenizer(self):
        from trillm.tokenizer import tokenizer_from_gguf

        if "tokenizer.ggml.tokens" not in self.metadata:
            return None
        return tokenizer_from_gguf(self.metadata, self.path)
