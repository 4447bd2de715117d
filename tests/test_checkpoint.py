"""Letting go of a checkpoint's file pages (checkpoint/pages.py): after `release`, the pages no longer count
as resident, the tensor still reads the same values (from the file again), and memory that is not the
file's own map is never touched."""

import gguf
import torch
from safetensors.torch import save_file

from trillm.checkpoint import open_checkpoint
from trillm.checkpoint.pages import file_mapping

ROWS, COLUMNS = 1024, 1024  # 4 MB of float32: a thousand pages


def resident_kb(path) -> int:
    """Resident kB of this process's mappings of `path`, from /proc/self/smaps."""
    total, current = 0, None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields[0].endswith(":"):
            if fields[0] == "Rss:" and current == str(path.resolve()):
                total += int(fields[1])
        else:
            current = fields[5] if len(fields) > 5 else None
    return total


def check_release(checkpoint, path, name, expected):
    tensor = checkpoint.get(name)
    assert torch.equal(tensor.float(), expected)  # reads every page
    before = resident_kb(path)
    checkpoint.release(name, (0, ROWS // 2))
    half = resident_kb(path)
    checkpoint.release(name)
    after = resident_kb(path)
    assert before - half >= 1800 and before - after >= 3900, (before, half, after)
    assert torch.equal(checkpoint.get(name).float(), expected)  # faulted back in from the file


def test_safetensors_release_drops_pages_and_keeps_values(tmp_path):
    weight = torch.randn(ROWS, COLUMNS)
    save_file({"model.weight": weight, "model.small": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    checkpoint = open_checkpoint(tmp_path)
    check_release(checkpoint, (tmp_path / "model.safetensors"), "model.weight", weight)
    checkpoint.release("model.small")  # smaller than a page: nothing to drop, no error
    assert torch.equal(checkpoint.get("model.small"), torch.ones(3))


def test_gguf_release_drops_pages_and_keeps_values(tmp_path):
    weight = torch.randn(ROWS, COLUMNS)
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_release(open_checkpoint(path), path, "weight", weight)


def test_memory_outside_the_files_map_is_never_dropped(tmp_path):
    save_file({"model.weight": torch.ones(ROWS, COLUMNS)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    checkpoint = open_checkpoint(tmp_path)
    mapped = checkpoint.get("model.weight")
    assert file_mapping(tmp_path / "model.safetensors", mapped.data_ptr()) is not None
    anonymous = torch.ones(ROWS, COLUMNS)
    assert file_mapping(tmp_path / "model.safetensors", anonymous.data_ptr()) is None


def test_an_embedding_read_from_the_file_lets_go_of_the_pages_each_lookup_maps(tmp_path):
    """A lookup faults in the page cache's folio around its row (up to 2 MB on recent kernels); an embedding
    read from a file's map lets those pages go after each lookup, values unchanged, except pages the process
    wrote (its own copies). A table that is not a file's (the same rows in memory) is never touched."""
    from trillm.weights import make_embedding
    from trillm.weights.dense import ReferenceDenseEmbedding

    table = torch.randn(8 * ROWS, 256).bfloat16()  # 4 MB
    save_file({"model.embed_tokens.weight": table}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    path = tmp_path / "model.safetensors"
    mapped = open_checkpoint(tmp_path).get("model.embed_tokens.weight")
    assert file_mapping(path, mapped.data_ptr()) is not None
    embedding = make_embedding(mapped)
    ids = torch.randint(0, 8 * ROWS, (64,), generator=torch.Generator().manual_seed(0))
    expected = ReferenceDenseEmbedding(table)(ids)
    assert torch.equal(embedding(ids), expected)
    assert resident_kb(path) <= 8  # at most the pages the table shares with the file's header
    mapped[1000] += 1  # the map is copy-on-write: this row is the process's own now, and a lookup keeps it
    assert torch.equal(embedding(torch.tensor([1001, 1000]))[1], (table[1000] + 1).float())
    assert torch.equal(mapped[1000], table[1000] + 1)
    in_memory = make_embedding(table)
    assert in_memory._release_rows is None
    assert torch.equal(in_memory(ids), expected)


def test_a_long_lookup_lets_go_of_its_pages_chunk_by_chunk(tmp_path):
    """A prompt's lookup from a file's map releases pages after each RELEASE_CHUNK_ROWS rows, so the folios of
    a long prompt never pile up (they did: 130 MB of peak memory on a 2B4T prefill of 128 tokens)."""
    from trillm.weights import make_embedding
    from trillm.weights.dense import ReferenceDenseEmbedding
    from trillm.weights.linear import RELEASE_CHUNK_ROWS

    table = torch.randn(32 * ROWS, 1024).bfloat16()  # 64 MB: 32 windows of 2 MB
    save_file({"model.embed_tokens.weight": table}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    path = tmp_path / "model.safetensors"
    embedding = make_embedding(open_checkpoint(tmp_path).get("model.embed_tokens.weight"))
    released, resident_before = embedding._release_rows, []

    def release(ids, n):
        resident_before.append(resident_kb(path))
        return released(ids, n)

    embedding._release_rows = release
    ids = torch.arange(32) * ROWS + 7  # a row in each 2 MB window
    assert torch.equal(embedding(ids), ReferenceDenseEmbedding(table)(ids))
    assert len(resident_before) == 32 // RELEASE_CHUNK_ROWS
    assert max(resident_before) <= RELEASE_CHUNK_ROWS * 2048 + 8
    assert resident_kb(path) <= 8
