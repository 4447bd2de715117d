"""Weights in huge pages (weights/huge_pages.py): a copy equals its source and lies in memory asked for 2 MB
pages; past the budget nothing is copied; a retired chunk is given back once its tensors are gone; and a
loaded model computes from such copies, with its file's pages let go."""

import gc
import mmap

import pytest
import torch

import trillm
from trillm.checkpoint import default_model_path
from trillm.checkpoint.pages import file_mapping
from trillm.weights import huge_pages
from trillm.weights.huge_pages import CHUNK_BYTES, HugePageArena
from trillm.weights.linear import RowLinear

pytestmark = pytest.mark.skipif(not huge_pages.huge_pages_available(),
                                reason="this system has no transparent huge pages")


def mapping_field(address: int, field: str) -> int:
    """A field of /proc/self/smaps (in kB, or a flag) for the mapping that holds `address`."""
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if not fields[0].endswith(":"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == field + ":":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def resident_kb_of_file(path) -> int:
    total, current = 0, None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == str(path.resolve()):
            total += int(fields[1])
    return total


def pages(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def test_a_copy_equals_its_source_in_memory_asked_for_huge_pages():
    arena = HugePageArena()
    source = torch.randn(300, 700)[:, ::2]  # not contiguous
    copy = arena.copy(source)
    assert torch.equal(copy, source) and copy.is_contiguous() and copy.data_ptr() != source.data_ptr()
    assert copy.data_ptr() % mmap.PAGESIZE == 0
    assert mapping_field(copy.data_ptr(), "THPeligible") == 1
    following = arena.copy(torch.arange(10))
    assert following.data_ptr() == copy.data_ptr() + pages(copy.numel() * 4)  # packed in the same chunk


def test_a_copy_row_by_row_says_each_slice_of_rows_done():
    arena = HugePageArena()
    source = torch.randn(3000, 2000)  # 24 MB: two slices of COPY_SLICE_BYTES
    done = []
    copy = arena.copy(source, lambda start, end: done.append((start, end)))
    assert torch.equal(copy, source)
    assert done[0][0] == 0 and done[-1][1] == 3000 and len(done) == 2
    assert all(a[1] == b[0] for a, b in zip(done, done[1:]))


def test_memory_already_in_huge_pages_is_not_copied_again():
    placed = huge_pages.in_huge_pages(torch.ones(1000, 100))
    assert huge_pages.in_huge_pages(placed) is placed
    rows = huge_pages.empty_rows(500, 34)  # where a quantizer writes a re-stored head
    assert rows.shape == (500, 34) and rows.dtype == torch.uint8
    assert huge_pages.in_huge_pages(rows) is rows
    assert mapping_field(rows.data_ptr(), "THPeligible") == 1


def test_past_the_budget_a_tensor_stays_where_it_is():
    arena = HugePageArena()
    arena.budget = 1 << 20
    small, large = torch.ones(1000), torch.ones(1 << 18)
    assert arena.copy(small).data_ptr() != small.data_ptr()
    assert arena.copy(large) is large
    assert arena.placed == pages(4000)


def test_a_retired_chunk_is_given_back_once_its_tensors_are_gone():
    arena = HugePageArena()
    first = arena.copy(torch.ones(1 << 20))  # 4 MB, in a chunk of CHUNK_BYTES
    second = arena.copy(torch.ones(CHUNK_BYTES // 4))  # does not fit beside it: a new chunk
    assert arena.placed == pages(4 << 20) + CHUNK_BYTES
    del first
    gc.collect()
    assert arena.placed == CHUNK_BYTES
    assert torch.equal(second, torch.ones(CHUNK_BYTES // 4))


def test_a_model_computes_from_huge_page_copies_and_lets_go_of_its_file(monkeypatch):
    path = default_model_path()
    ids = torch.tensor([[1, 504, 2119, 314, 260, 1789]])
    resident_before = resident_kb_of_file(path)  # other tests' models may map the same file
    model = trillm.load(path)
    linears = [m for m in model.network.modules() if isinstance(m, RowLinear)]
    assert len(linears) == 4 * model.config.num_layers + 1  # qkv, o, gate_up, down, and the head
    assert all(mapping_field(m.stored.data_ptr(), "THPeligible") == 1 for m in linears)
    # SmolLM2's embedding is tied: it looks its rows up in the head's copy, not in the file
    assert model.network.embedding.stored.data_ptr() == model.network.head.stored.data_ptr()
    with torch.inference_mode():
        logits = model.forward(ids)
    # The weights are read from the copies: of the file only its header (the vocabulary, ~3 MB) and the
    # embedding's looked-up rows are resident; read from the file's map they add ~53 MB (below).
    copied_kb = resident_kb_of_file(path) - resident_before
    assert copied_kb < 5000

    monkeypatch.setattr(huge_pages, "ARENA", None)
    mapped = trillm.load(path)
    o_proj = mapped.network.blocks[0].attention.o_proj
    assert file_mapping(path, o_proj.stored.data_ptr()) is not None  # read from the file's map, as before
    with torch.inference_mode():
        assert torch.equal(mapped.forward(ids), logits)
    assert resident_kb_of_file(path) - resident_before - copied_kb > 40000
