"""The native kernels (csrc/): compiled with gcc on first use, one library per instruction-set level, cached,
loaded with ctypes.

The kernels are written once (csrc/kernels.h gives them their vector primitives); a level is the same
sources compiled with its flags (LEVELS). `load()` returns the library of the widest level this CPU runs,
or of the level TRILLM_ISA names: a narrower one (avxvnni, avx2, c) to measure or test it on a wider machine, or
`reference` for the pure-PyTorch twins alone. A library is cached per user, keyed by a hash of the sources,
the flags, and what the compiler reports about itself and this CPU, so an edit, a new compiler or a
different machine rebuilds it. Without gcc, or when it fails, `load()` warns once and returns None, and
every op and weight falls back to its twin.

This file is the library's interface to Python: the signatures of its entry points (`open_library`) and
what their error codes mean (`ERRORS`).
"""

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from trillm.errors import TrillmError

SOURCE_DIR = Path(__file__).parent / "csrc"
COMPILER = "gcc"
FLAGS = ["-O3", "-shared", "-fPIC", "-pthread"]

# Instruction-set levels, widest first: the compiler flags of each, and the /proc/cpuinfo flags a CPU needs
# to run its library. "avxvnni" is AVX2 with AVX-VNNI's 256-bit integer dot products (Intel's cores since
# Alder Lake, which lack AVX-512). "c" is portable C, which gcc still vectorizes where it can.
LEVELS = {
    "avx512": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
               {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
    "avxvnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "c": ([], set()),
}
REFERENCE = "reference"  # TRILLM_ISA's value for no native code at all

# The entry points' error codes (csrc/kernels.h).
ERRORS = {-1: "no native kernel for this weight type", -2: "row index out of range",
          -3: "shape not supported by the kernel", -4: "out of memory"}

log = logging.getLogger("trillm")


def check(code: int):
    """Raise for a nonzero return code of an entry point."""
    if code:
        raise (IndexError if code == -2 else ValueError)(ERRORS.get(code, f"native kernel error {code}"))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags Linux reports for this CPU (none where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable_levels() -> list[str]:
    """The levels whose library this CPU runs, widest first."""
    return [level for level, (_, needs) in LEVELS.items() if needs <= cpu_flags()]


def chosen_level() -> str | None:
    """The level to load: TRILLM_ISA's, else the widest this CPU runs; None for the PyTorch twins alone."""
    forced = os.environ.get("TRILLM_ISA", "")
    if not forced:
        return runnable_levels()[0]
    if forced == REFERENCE:
        return None
    if forced not in LEVELS:
        raise TrillmError(f"TRILLM_ISA={forced!r}: choose one of {', '.join([*LEVELS, REFERENCE])}")
    if forced not in runnable_levels():
        raise TrillmError(f"TRILLM_ISA={forced}: this CPU cannot run it (it runs {', '.join(runnable_levels())})")
    return forced


def cache_dir() -> Path:
    """Where built libraries are kept: $TRILLM_CACHE/native, else $XDG_CACHE_HOME/trillm/native, else
    ~/.cache/trillm/native (an empty variable counts as unset)."""
    if os.environ.get("TRILLM_CACHE"):
        return Path(os.environ["TRILLM_CACHE"]) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trillm" / "native"


def build(level: str) -> Path:
    """The library for a level: the cached one if it is this exact build and intact, else compiled anew.

    The cache key is a hash of the sources, the flags and what the compiler reports of itself and the CPU;
    beside each library a record of its size and sha256 is kept, and a library that does not match its
    record (truncated, emptied, replaced) is built again, since loading a damaged one can crash the process.
    """
    flags = [*FLAGS, *LEVELS[level][0]]
    # The predefined macros name the compiler version and every instruction set the flags enable.
    target = subprocess.run([COMPILER, *flags, "-E", "-dM", "-x", "c", "-"], input="", capture_output=True,
                            text=True, check=True).stdout
    key = hashlib.sha256((" ".join(flags) + target).encode())
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        key.update(path.name.encode() + path.read_bytes())
    library = cache_dir() / f"trillm-{level}-{key.hexdigest()[:16]}.so"
    record = library.with_suffix(".so.sha256")
    if intact(library, record):
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(library.parent)
    # Build beside the target and rename: another process may be building or loading it right now. The
    # partial file's name holds our pid, so that one a killed build left behind can be told and removed.
    handle, partial = tempfile.mkstemp(prefix=f"{library.name}.{os.getpid()}.", suffix=".partial", dir=library.parent)
    os.close(handle)
    try:
        sources = [str(path) for path in sorted(SOURCE_DIR.glob("*.c"))]
        subprocess.run([COMPILER, *flags, *sources, "-o", partial, "-lm"], capture_output=True, text=True,
                       check=True)
        data = Path(partial).read_bytes()
        Path(partial + ".sha256").write_text(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n")
        os.replace(partial + ".sha256", record)
        os.replace(partial, library)
    finally:
        for leftover in (partial, partial + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return library


def intact(library: Path, record: Path) -> bool:
    """Whether the library exists and matches its recorded size and sha256."""
    try:
        size, digest = record.read_text().split()
        if library.stat().st_size != int(size):
            return False
        return hashlib.sha256(library.read_bytes()).hexdigest() == digest
    except (OSError, ValueError):
        return False


def remove_abandoned_builds(folder: Path):
    """Delete the partial files of builds whose process no longer runs (killed mid-compile)."""
    for partial in folder.glob("*.partial*"):
        try:
            pid = int(partial.name.split(".so.", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            continue  # not one of ours
        if not process_running(pid):
            try:
                partial.unlink()
            except OSError:
                pass  # gone already, or not ours to remove


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, as another user's
    return True


def open_library(path: Path) -> ctypes.CDLL:
    """The library with the signatures of its entry points declared (see each one's comment in csrc/)."""
    lib = ctypes.CDLL(str(path))
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        # matmul.c: weights stored as rows (dense dtypes, GGML blocks)
        "trillm_matmul": ([ctypes.c_int, pointer, size, size, size, pointer, size, pointer], ctypes.c_int),
        "trillm_matmul_int8": ([ctypes.c_int, pointer, size, size, size, pointer, size, pointer], ctypes.c_int),
        "trillm_decode_rows": ([ctypes.c_int, pointer, size, size, size, pointer, size, pointer], ctypes.c_int),
        "trillm_release_rows": ([pointer, size, size, pointer, size], ctypes.c_int),
        "trillm_vector_floats": ([], ctypes.c_int),
        "trillm_vnni": ([], ctypes.c_int),
        # mxfp4.c
        "trillm_mxfp4_has_bf16": ([], ctypes.c_int),
        "trillm_mxfp4_experts": ([ctypes.c_int, ctypes.c_int, pointer, size, size, size, pointer, size, size, size,
                                  size, size, size, pointer, pointer, size, pointer, size, pointer], ctypes.c_int),
        # ternary.c
        "trillm_ternary_matmul": ([pointer, size, size, pointer, size, pointer, size, pointer], ctypes.c_int),
        "trillm_ternary_quantize": ([pointer, size, size, pointer, pointer], None),
        "trillm_ternary_find_invalid": ([pointer, size], ctypes.c_int64),
        # layers.c
        "trillm_rms_norm": ([pointer, pointer, size, size, real, pointer], None),
        "trillm_squared_relu_glu": ([pointer, size, size, pointer], None),
        "trillm_swiglu": ([pointer, size, size, pointer], None),
        "trillm_add": ([pointer, pointer, size, pointer], None),
        "trillm_route_to_experts": ([pointer, pointer, size, size, size, size, pointer, pointer, pointer, pointer,
                                     pointer], ctypes.c_int),
        "trillm_combine_experts": ([pointer, pointer, pointer, size, size, size, pointer], None),
        "trillm_interleave": ([pointer, pointer, size, pointer], None),
        "trillm_copy": ([pointer, size, pointer], None),
        "trillm_clamped_swiglu": ([pointer, size, size, real, real, pointer], None),
        "trillm_attention_one_token": ([pointer] * 6 + [size] * 8 + [real, pointer], ctypes.c_int),
        # plan.c
        "trillm_plan_new": ([], pointer),
        "trillm_plan_free": ([pointer], None),
        "trillm_plan_add": ([pointer, ctypes.c_char_p, pointer, size, pointer, size], ctypes.c_int),
        "trillm_plan_run": ([pointer, size], ctypes.c_int),
        # pool.c
        "trillm_set_num_threads": ([ctypes.c_int], None),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


@functools.cache
def library(level: str) -> ctypes.CDLL | None:
    """The library of one level, built if need be, or None (after one warning) when it cannot be."""
    try:
        return open_library(build(level))
    except subprocess.CalledProcessError as error:
        first_error = next((line for line in error.stderr.splitlines() if "error" in line.lower()),
                           error.stderr.strip())
        log.warning("trillm: could not compile the native kernels (%s); using the slow PyTorch reference",
                    first_error[:200])
    except OSError as error:  # no gcc, an unwritable cache, or a library that does not load
        log.warning("trillm: native kernels unavailable (%s); using the slow PyTorch reference", error)
    return None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library of the chosen level, or None: the callers then run the PyTorch twins."""
    level = chosen_level()
    return None if level is None else library(level)


def set_num_threads(n: int):
    """Threads the kernels split large matmuls over (csrc/pool.c); torch keeps its own setting."""
    lib = load()
    if lib is not None:
        lib.trillm_set_num_threads(int(n))
