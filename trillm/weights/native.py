"""The native kernels (C sources in csrc/): compiled with gcc on first use, cached, loaded with ctypes.

`-march=native` makes gcc choose the widest vector instructions this machine has (see csrc/kernels.h).
The shared library is cached per user, keyed by a hash of the sources, the flags, and what the compiler
reports about itself and this CPU, so an edit, a new compiler or a different machine rebuilds it. Without
gcc, or when it fails, `load()` warns once and returns None and the weights fall back to their
pure-PyTorch reference twins; TRILLM_NATIVE=0 asks for that fallback.
"""

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_DIR = Path(__file__).parent / "csrc"
COMPILER = "gcc"
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]

# Up to this many tokens (decoding, short prompts) a matmul runs the kernel, which takes 8 tokens a pass
# over the weights; longer inputs (prefill) decode the weights to float32 once and use torch's matmul.
# Measured on 2 cores (AVX-512) for SmolLM2's shapes: the kernel is 1.5-3x faster up to 32 tokens, even
# with 64 and slower at 128, where MKL's blocking pays off.
KERNEL_MAX_TOKENS = 32

# Error codes of the C entry points (csrc/matmul.c).
ERRORS = {-1: "no native kernel for this weight type", -2: "row index out of range", -4: "out of memory"}

log = logging.getLogger("trillm")


def cache_dir() -> Path:
    if "TRILLM_CACHE" in os.environ:
        return Path(os.environ["TRILLM_CACHE"]) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trillm" / "native"


def build(flags: list[str] = FLAGS) -> Path:
    """Compile the sources unless the cache already holds this exact build; return the library's path."""
    # The predefined macros name the compiler version and every instruction set the flags enable.
    target = subprocess.run([COMPILER, *flags, "-E", "-dM", "-x", "c", "-"], input="", capture_output=True,
                            text=True, check=True).stdout
    key = hashlib.sha256((" ".join(flags) + target).encode())
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        key.update(path.name.encode() + path.read_bytes())
    library = cache_dir() / f"trillm-{key.hexdigest()[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: another process may be building or loading it right now.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(handle)
        try:
            sources = [str(path) for path in sorted(SOURCE_DIR.glob("*.c"))]
            subprocess.run([COMPILER, *flags, *sources, "-o", partial, "-lm"], capture_output=True, text=True,
                           check=True)
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return library


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.trillm_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.trillm_matmul_int8.argtypes = lib.trillm_matmul.argtypes
    lib.trillm_decode_rows.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.trillm_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                    ctypes.c_void_p]
    lib.trillm_rms_norm.restype = None
    lib.trillm_attention_one_token.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [
        ctypes.c_float, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p]
    lib.trillm_attention_one_token.restype = None
    lib.trillm_squared_relu_glu.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_float, ctypes.c_void_p]
    lib.trillm_squared_relu_glu.restype = None
    lib.trillm_set_num_threads.argtypes = [ctypes.c_int]
    lib.trillm_set_num_threads.restype = None
    lib.trillm_ternary_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_void_p]
    lib.trillm_ternary_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p, ctypes.c_void_p]
    lib.trillm_ternary_isa.argtypes = [ctypes.c_int]
    lib.trillm_ternary_find_invalid.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.trillm_ternary_find_invalid.restype = ctypes.c_int64
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (after one warning) when it cannot be built or TRILLM_NATIVE=0."""
    if os.environ.get("TRILLM_NATIVE", "1") == "0":
        return None
    try:
        return open_library(build())
    except subprocess.CalledProcessError as error:
        first_error = next((line for line in error.stderr.splitlines() if "error" in line), error.stderr.strip())
        log.warning("trillm: could not compile the native kernels (%s); using the slow PyTorch reference",
                    first_error[:200])
    except OSError as error:  # no gcc, an unwritable cache, or a library that does not load
        log.warning("trillm: native kernels unavailable (%s); using the slow PyTorch reference", error)
    return None


def check_return_code(code: int):
    """Raise for a nonzero return code of a kernel entry point."""
    if code:
        raise (IndexError if code == -2 else ValueError)(ERRORS.get(code, f"native kernel error {code}"))


def set_num_threads(n: int):
    """Threads the kernels split large matmuls over (csrc/pool.c); torch keeps its own setting."""
    lib = load()
    if lib is not None:
        lib.trillm_set_num_threads(int(n))


def bind_kernel(name: str, type_code: int, data: torch.Tensor, shape: tuple[int, int]) -> functools.partial:
    """A kernel entry point with the arguments describing a stored weight already given: type, address,
    bytes between rows, rows, cols. `data` must have unit stride along its rows and outlive the result."""
    lib = load()
    if lib is None:
        raise RuntimeError("the native kernels are unavailable; use the reference module instead")
    return functools.partial(getattr(lib, name), type_code, data.data_ptr(), data.stride(0) * data.element_size(),
                             *shape)


class PrefillScratch:
    """One float32 buffer that every prefill matmul decodes its weight into, in turn (they run one after
    another). A fresh allocation per call would fault its pages in each time and grow the heap."""

    buffer = torch.empty(0)

    @classmethod
    def get(cls, rows: int, cols: int) -> torch.Tensor:
        if cls.buffer.numel() < rows * cols:
            cls.buffer = torch.empty(rows * cols)
        return cls.buffer[: rows * cols].view(rows, cols)


class NativeLinear(nn.Module):
    """y = x W^T + bias from weights as stored (rows of `type_code` data, see csrc/kernels.h).

    Float32 in and out; `data` is 2-D with one stored row per output row. The kernel arguments that never
    change are bound once here, so a call costs one ctypes call and the output's allocation. With
    `int8_activations` the kernel quantizes x to int8 first (csrc/matmul.c: trillm_matmul_int8), for the
    types that have such a kernel.
    """

    def __init__(self, type_code: int, data: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None,
                 int8_activations: bool = False):
        super().__init__()
        self.stored = data if data.stride(-1) == 1 else data.contiguous()  # the kernels read this memory
        self.out_features, self.in_features = shape
        self.stored_bytes = self.stored.numel() * self.stored.element_size()
        self.bias = bias
        kernel = "trillm_matmul_int8" if int8_activations else "trillm_matmul"
        self._matmul = bind_kernel(kernel, type_code, self.stored, shape)
        self._decode_all = functools.partial(bind_kernel("trillm_decode_rows", type_code, self.stored, shape),
                                             None, shape[0])

    def float_weight(self) -> torch.Tensor:
        """The whole weight decoded to float32 (out_features, in_features), valid until the next prefill
        matmul of any layer (it lives in the shared PrefillScratch)."""
        weight = PrefillScratch.get(self.out_features, self.in_features)
        check_return_code(self._decode_all(weight.data_ptr()))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the kernel would read past x
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        tokens = x.numel() // self.in_features
        if tokens > KERNEL_MAX_TOKENS:
            return F.linear(x, self.float_weight(), self.bias)
        y = torch.empty((*x.shape[:-1], self.out_features))
        code = self._matmul(x.data_ptr(), tokens, y.data_ptr())
        if code:
            check_return_code(code)
        if self.bias is not None:
            y += self.bias
        return y


class NativeEmbedding(nn.Module):
    """Rows of a stored matrix looked up by id and decoded to float32; only the looked-up rows are read."""

    def __init__(self, type_code: int, data: torch.Tensor, shape: tuple[int, int]):
        super().__init__()
        self.stored = data if data.stride(-1) == 1 else data.contiguous()  # the kernels read this memory
        self.num_embeddings, self.embedding_dim = shape
        self._decode_rows = bind_kernel("trillm_decode_rows", type_code, self.stored, shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), self.embedding_dim)
        check_return_code(self._decode_rows(flat.data_ptr(), flat.numel(), out.data_ptr()))
        return out.view(*ids.shape, self.embedding_dim)
