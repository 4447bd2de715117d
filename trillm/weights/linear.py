"""The native modules the weight formats build on: `NativeLinear`, a linear layer around a matmul kernel
bound to a stored weight (ternary.py's), and for weights stored as rows, one row of `type_code` data per
output row (csrc/kernels.h: dense float types and GGML blocks), `RowLinear` and `RowEmbedding` over the
kernels of csrc/matmul.c (dense.py's and ggml.py's). Each format file keeps its reference twins.
"""

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from trillm.native.build import check, load
from trillm.native.plan import call
from trillm.weights.huge_pages import in_huge_pages

# Up to this many tokens (decoding, short prompts) a matmul runs the kernel, which takes 8 tokens a pass
# over the weights; longer inputs (prefill) decode the weights to float32 once and use torch's matmul.
# Measured on 2 cores (AVX-512) for SmolLM2's shapes: the kernel is 1.5-3x faster up to 32 tokens, even
# with 64 and slower at 128, where MKL's blocking pays off.
KERNEL_MAX_TOKENS = 32


def bind_kernel(name: str, type_code: int, data: torch.Tensor, shape: tuple[int, int]) -> functools.partial:
    """An entry point of csrc/matmul.c with the arguments describing a stored weight already given: type,
    address, bytes between rows, rows, cols. `data` must have unit stride along its rows and outlive the result."""
    lib = load()
    if lib is None:
        raise RuntimeError("the native kernels are unavailable; use the reference module instead")
    return functools.partial(getattr(lib, name), type_code, data.data_ptr(), data.stride(0) * data.element_size(),
                             *shape)


class PrefillScratch(threading.local):
    """One float32 buffer per thread that every prefill matmul decodes its weight into, in turn (a thread's
    matmuls run one after another; a fresh allocation per call would fault its pages in each time and grow
    the heap). Per thread, so that sequences run from several threads never share it."""

    buffer = torch.empty(0)

    def get(self, rows: int, cols: int) -> torch.Tensor:
        if self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols)
        return self.buffer[: rows * cols].view(rows, cols)


PREFILL_SCRATCH = PrefillScratch()


def round_to_int8(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (..., cols) quantized to int8 per `block_size`, as the native kernels do (csrc/ggml.c:
    quantize_q8_32 and quantize_q8_k, csrc/mxfp4.c: quantize_q8_row), operation for operation:
    q = round_half_even(x * (127 / max|x|)), d = max|x| / 127. Returns q (..., cols / block_size, block_size)
    as float32 integers and d (..., cols / block_size, 1); x ~ q d."""
    blocks = x.float().unflatten(-1, (-1, block_size))
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.tensor(127.0) / absmax  # a division, as in C (torch computes 127 / absmax as 127 * (1 / absmax))
    return (blocks * torch.where(absmax > 0, scale, 0.0)).round(), absmax / 127


def prompt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bf16: bool) -> torch.Tensor:
    """A prompt's x W^T + bias by torch's matmul over the whole weight: in float32, or with `bf16` in bfloat16
    (x, the weight and the product rounded to it, 2.5-3x float32's speed on CPUs with AVX512-BF16), float32
    out."""
    if not bf16:
        return F.linear(x, weight.float(), bias)
    y = F.linear(x.bfloat16(), weight.bfloat16()).float()
    return y if bias is None else y + bias


class NativeLinear(nn.Module):
    """y = x W^T + bias by a native kernel bound to a stored weight, `matmul(x address, tokens, y address)`
    returning an error code: float32 in and out, so a call costs one ctypes call and the output's
    allocation. Inputs of more than `kernel_max_tokens` tokens (None: no limit) go through torch's matmul
    over the subclass's `prompt_weight()` instead (prompt_linear; in bfloat16 with `prompt_bf16`)."""

    kernel_max_tokens: int | None = None
    prompt_bf16 = False

    def __init__(self, matmul: functools.partial, shape: tuple[int, int], bias: torch.Tensor | None,
                 stored_bytes: int):
        super().__init__()
        self._matmul = matmul
        self.out_features, self.in_features = shape
        self.bias = bias
        self.stored_bytes = stored_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the kernel would read past x
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        tokens = x.numel() // self.in_features
        if self.kernel_max_tokens is not None and tokens > self.kernel_max_tokens:
            return prompt_linear(x, self.prompt_weight(), self.bias, self.prompt_bf16)
        y = torch.empty((*x.shape[:-1], self.out_features))
        code = call(self._matmul, x.data_ptr(), tokens, y.data_ptr())
        if code:
            check(code)
        if self.bias is not None:
            y += self.bias
        return y


class RowLinear(NativeLinear):
    """A NativeLinear over weights as stored in rows of `type_code` data (see csrc/kernels.h); `data` is 2-D
    with one stored row per output row. With `int8_activations` the kernel quantizes x to int8 first
    (csrc/matmul.c: trillm_matmul_int8), for the types that have such a kernel."""

    kernel_max_tokens = KERNEL_MAX_TOKENS

    def __init__(self, type_code: int, data: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None,
                 int8_activations: bool = False):
        stored = in_huge_pages(data if data.stride(-1) == 1 else data.contiguous())  # the kernels read this memory
        kernel = "trillm_matmul_int8" if int8_activations else "trillm_matmul"
        super().__init__(bind_kernel(kernel, type_code, stored, shape), shape, bias,
                         stored.numel() * stored.element_size())
        self.stored = stored
        self._decode_all = functools.partial(bind_kernel("trillm_decode_rows", type_code, stored, shape),
                                             None, shape[0])

    def float_weight(self) -> torch.Tensor:
        """The whole weight decoded to float32 (out_features, in_features), valid until this thread's next
        prefill matmul of any layer (it lives in the thread's PrefillScratch)."""
        weight = PREFILL_SCRATCH.get(self.out_features, self.in_features)
        check(self._decode_all(weight.data_ptr()))
        return weight

    def prompt_weight(self) -> torch.Tensor:
        """The whole weight for a prompt's matmul: float32 (float_weight), or as stored where that serves."""
        return self.float_weight()


# Rows a file-mapped embedding looks up before it lets their pages go: at most 8 folios (16 MB) at once.
RELEASE_CHUNK_ROWS = 8


class RowEmbedding(nn.Module):
    """Rows of a stored matrix looked up by id and decoded to float32; only the looked-up rows are read."""

    def __init__(self, type_code: int, data: torch.Tensor, shape: tuple[int, int]):
        super().__init__()
        self.stored = data if data.stride(-1) == 1 else data.contiguous()  # the kernels read this memory
        self.num_embeddings, self.embedding_dim = shape
        self._decode_rows = bind_kernel("trillm_decode_rows", type_code, self.stored, shape)
        # Read from a file's map (a tied embedding whose head was re-stored), each lookup would leave the
        # page cache's folio around its row mapped, up to 2 MB a token: they are let go after each lookup.
        from trillm.checkpoint.pages import in_file_mapping  # (trillm.checkpoint imports this module)

        self._release_rows = None
        if in_file_mapping(self.stored.data_ptr()):
            self._release_rows = functools.partial(load().trillm_release_rows, self.stored.data_ptr(),
                                                   self.stored.stride(0) * self.stored.element_size(), shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), self.embedding_dim)
        if self._release_rows is None:
            check(call(self._decode_rows, flat.data_ptr(), flat.numel(), out.data_ptr()))
        else:  # a prompt's rows in chunks, so that its folios never pile up (128 tokens: 130 MB on 2B4T)
            for start in range(0, flat.numel(), RELEASE_CHUNK_ROWS):
                chunk, rows = flat[start:start + RELEASE_CHUNK_ROWS], out[start:start + RELEASE_CHUNK_ROWS]
                check(call(self._decode_rows, chunk.data_ptr(), chunk.numel(), rows.data_ptr()))
                check(call(self._release_rows, chunk.data_ptr(), chunk.numel()))
        return out.view(*ids.shape, self.embedding_dim)
