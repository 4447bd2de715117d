"""The weights a decode step streams, moved into 2 MB transparent huge pages.

A decode step reads every weight once. From 4 KB pages (a file's memory map, or the allocator's memory)
each 4 KB costs a TLB miss, and the hardware prefetchers stop at every page's end; from 2 MB pages they run
on. Measured (Zen 4, 2 threads, SmolLM2-135M decode, AVX2 kernels): F16 76-85 tok/s mapped, 98-103 in huge
pages; Q8_0 with int8 activations 122-139 and 149-155. llama.cpp streams its weights from the file's map.

`in_huge_pages(t)` copies a tensor into anonymous memory the kernel is asked (madvise) to back with huge
pages, packed with the others in 64 MB chunks (a huge page is only whole when it is 2 MB-aligned and
filled), and returns the copy; the loader then lets go of the original's file pages (models/loading.py),
so the weights are not resident twice. Nothing is copied where the system has no transparent huge pages
(`never`, or not Linux), with TRILLM_HUGE_PAGES=0, or past half the memory available when the first weight
was placed: beyond that the weights stay where they are (memory-mapped, so the page cache can still hold a
model larger than memory).
"""

import mmap
import os
import threading
import weakref
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
CHUNK_BYTES = 64 << 20
COPY_SLICE_BYTES = 16 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this system backs memory with transparent huge pages when asked (`always` or `madvise`)."""
    if os.environ.get("TRILLM_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes (0 where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Chunk:
    """An anonymous mapping asked for huge pages, handed out front to back until it is retired; it is
    unmapped when the last tensor placed in it is gone (each holds the mapping), and the arena told."""

    def __init__(self, size: int, arena: "HugePageArena"):
        memory_map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory_map.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(memory_map, dtype=torch.uint8)
        start = -whole.data_ptr() % HUGE_PAGE
        self.memory: torch.Tensor | None = whole[start:start + size]
        self.start, self.end = self.memory.data_ptr(), self.memory.data_ptr() + size
        self.used = 0
        arena.chunks.add(self)
        weakref.finalize(memory_map, arena.forget, self)

    def retire(self):
        self.memory = None  # from now on only the tensors placed here hold the mapping

    def take(self, size: int) -> torch.Tensor | None:
        if self.used + size > self.memory.numel():
            return None
        piece = self.memory[self.used:self.used + size]
        self.used += -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        return piece


class HugePageArena:
    """Where in_huge_pages puts its copies: the current chunk, and the bytes placed in chunks still alive
    (a chunk's finalizer takes its bytes off, without the lock: it may run inside `take`, on any thread)."""

    def __init__(self):
        self.budget: int | None = None  # set when the first weight is placed
        self.placed = 0  # bytes handed out, in chunks still alive
        self.chunk: Chunk | None = None
        self.chunks: set[Chunk] = set()  # alive
        self.lock = threading.Lock()  # models may load on several threads at once (trillm serve loads on one)

    def forget(self, chunk: Chunk):
        self.placed -= chunk.used
        self.chunks.discard(chunk)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether t already lies in this arena's memory, whole and contiguous."""
        return t.is_contiguous() and any(c.start <= t.data_ptr() < c.end for c in list(self.chunks))

    def copy(self, t: torch.Tensor, rows_done=None) -> torch.Tensor:
        """t copied into huge pages (itself past the budget); with `rows_done`, a slice of rows at a time,
        rows_done(start, end) after each (a loader lets go of those rows' file pages there)."""
        with self.lock:
            piece = self.take(t.numel() * t.element_size())
        if piece is None:
            return t
        copy = piece.view(t.dtype).view(t.shape)
        if rows_done is None:
            copy.copy_(t)
            return copy
        step = max(1, COPY_SLICE_BYTES // max(1, t[0].numel() * t.element_size()))
        for start in range(0, len(t), step):
            copy[start:start + step] = t[start:start + step]
            rows_done(start, min(start + step, len(t)))
        return copy

    def take(self, size: int) -> torch.Tensor | None:
        """`size` bytes of huge-page memory, or None past the budget."""
        if self.budget is None:
            self.budget = available_memory() // 2
        if size == 0 or self.placed + size > self.budget:
            return None
        piece = self.chunk.take(size) if self.chunk is not None else None
        if piece is None:
            if self.chunk is not None:
                self.chunk.retire()
            self.chunk = Chunk(max(CHUNK_BYTES, size), self)
            piece = self.chunk.take(size)
        self.placed += -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        return piece


ARENA = HugePageArena() if huge_pages_available() else None


def in_huge_pages(t: torch.Tensor, rows_done=None) -> torch.Tensor:
    """t copied into huge pages, contiguous (see HugePageArena.copy for `rows_done`); t itself where it is
    there already, or none are to be had (see the module's text)."""
    return t if ARENA is None or ARENA.holds(t) else ARENA.copy(t, rows_done)


def empty_rows(rows: int, row_bytes: int) -> torch.Tensor:
    """An uninitialized (rows, row_bytes) uint8 tensor, in huge pages where there are any: for a weight made at
    load (a re-stored head), which in_huge_pages then does not copy again."""
    if ARENA is not None:
        with ARENA.lock:
            piece = ARENA.take(rows * row_bytes)
        if piece is not None:
            return piece.view(rows, row_bytes)
    return torch.empty(rows, row_bytes, dtype=torch.uint8)


def weights_copied() -> bool:
    """Whether the kernels' weights are copies (in huge pages), so the loader may let go of the originals."""
    return ARENA is not None
