"""Writing checkpoints: whole or not at all (`write_whole`), and safetensors files a tensor (or a slice of one)
at a time, so that a checkpoint of several GB never sits in memory whole (safetensors' own writer takes
every tensor at once)."""

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import torch

from trillm.errors import TrillmError

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


def write_whole(out: str | Path, write: Callable[[Path], Path], force: bool = False) -> Path:
    """Run write(path) on a temporary name beside `out`, then move the result to `out`: a failure (a full
    disk, Ctrl-C) leaves nothing behind, and a process still reading an old checkpoint there keeps its
    files (they are replaced, not rewritten). An existing non-empty `out` is refused unless `force`."""
    out = Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise TrillmError(f"{out} exists and is not empty: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("partial", "old"))
    try:
        write(partial)
        if out.exists():
            out.rename(old)
            try:
                partial.rename(out)
            except BaseException:
                old.rename(out)  # the old one back in place
                raise
        else:
            partial.rename(out)
    finally:
        for leftover in (partial, old):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists() or leftover.is_symlink():
                leftover.unlink()
    return out


def add_decoder_gguf_metadata(writer: gguf.GGUFWriter, c):
    """The shape keys llama.cpp's converter writes for every decoder (TextModel.set_gguf_parameters), from a
    models.layers.DecoderConfig."""
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
