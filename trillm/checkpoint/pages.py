"""Letting go of a memory-mapped tensor's pages once the model holds its own copy of it.

Both checkpoint kinds map their files into memory, and every page a loader reads counts as this
process's resident memory until it is dropped. A loader that fuses, retiles or quantizes a tensor calls
`release` on the original: MADV_DONTNEED drops the pages, the mapping stays valid, and the kernel reads
them back from the file if they are ever touched again. On anonymous memory the same call would zero
the data, so only addresses inside a mapping of the checkpoint's own file are ever dropped.
"""

import ctypes
import functools
import mmap
from pathlib import Path

PAGE = mmap.PAGESIZE


def mapping_at(address: int) -> tuple[int, int, str] | None:
    """(start, end, file path or "") of this process's mapping that holds `address`, read from
    /proc/self/maps; None when there is none (or no /proc, off Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return start, end, fields[5] if len(fields) == 6 else ""
    return None


def file_mapping(path: Path, address: int) -> tuple[int, int] | None:
    """(start, end) of this process's mapping of `path` that holds `address`; None when there is none."""
    mapping = mapping_at(address)
    return mapping[:2] if mapping is not None and mapping[2] == str(path.resolve()) else None


def in_file_mapping(address: int) -> bool:
    """Whether `address` lies in a memory map of a file (False off Linux)."""
    mapping = mapping_at(address)
    return mapping is not None and mapping[2].startswith("/")


def drop_pages(mapping: tuple[int, int], address: int, size: int):
    """Drop the whole pages of [address, address + size) that lie inside `mapping` (a file's map)."""
    first = max(-(-address // PAGE) * PAGE, mapping[0])
    last = min((address + size) // PAGE * PAGE, mapping[1])
    if last > first and hasattr(mmap, "MADV_DONTNEED"):
        libc().madvise(first, last - first, mmap.MADV_DONTNEED)


@functools.cache
def libc() -> ctypes.CDLL:
    library = ctypes.CDLL(None, use_errno=True)
    library.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return library


def trim_heap():
    """Hand the memory the C allocator keeps for reuse back to the system (glibc's malloc_trim): after a
    step that passed through much more memory than it keeps, such as building a tokenizer."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
