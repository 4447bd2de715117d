"""Hostile files, options and environments: each ends in one clear line (or a warning), never in a crash,
a hang, a runaway allocation, a read outside the model folder or lost work. One test per way in."""

import base64
import hashlib
import json
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import trillm
from trillm import chat
from trillm.chat import ChatTemplateError, render_chat
from trillm.checkpoint import default_model_path
from trillm.errors import CheckpointError, TrillmError
from trillm.native import build, ops
from trillm.synth.bitnet import bitnet_config, write_bitnet, write_bitnet_gguf
from trillm.synth.vocabulary import has_llama3_vocabulary
from trillm.tokenizer import load_tokenizer, tokenizer_from_gguf

from test_bitnet_gguf import config_of, rewrite_gguf
from test_errors import assert_one_line_error, run_cli
from test_llama import CONFIGS, save_random_llama


def gguf_config() -> dict:
    return config_of("tq2_0-gqa2")  # 4 heads, 2 KV heads, 256 wide: TQ2_0 blocks


# ---- Memory that grows with the file, not with its square -------------------------------------------------

def peak_python_memory(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


LONG_TOKEN = "ab" * 10_000  # one 20,000-character vocabulary entry: 400 MB of prefix/suffix pairs, built whole


def test_a_long_sentencepiece_token_costs_its_length():
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "▁", LONG_TOKEN]
    metadata = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [0.0] * 3 + [-1.0, -2.0, -0.5, -3.0, -9.0],
                "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1]}
    assert peak_python_memory(lambda: tokenizer_from_gguf(metadata)) < 20_000_000
    assert tokenizer_from_gguf(metadata).encode("ab", add_special_tokens=False) == [6, 5]  # ▁ ab


def test_a_long_tiktoken_token_costs_its_length(tmp_path):
    ranks = [b"a", b"b", b"ab", LONG_TOKEN.encode()]
    (tmp_path / "tokenizer.model").write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank
                                                        for rank, token in enumerate(ranks)))
    assert peak_python_memory(lambda: load_tokenizer(tmp_path)) < 20_000_000


# ---- Shapes the layers and kernels trust -----------------------------------------------------------------

@pytest.fixture
def llama_folder(tmp_path):
    save_random_llama(tmp_path, CONFIGS["mha-untied"][0])
    return tmp_path


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


DELETE = object()


@pytest.mark.parametrize("heads, kv_heads", [(2, 4), (4, 3)])
def test_head_counts_that_do_not_group_are_refused(llama_folder, heads, kv_heads):
    edit_config(llama_folder, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16)
    with pytest.raises(CheckpointError, match=f"config.json: {heads} attention heads cannot share {kv_heads} KV heads"):
        trillm.load(llama_folder)


def test_packed_ternary_rows_must_fill_whole_bytes():
    """Four output rows share a byte of packed codes: a BitNet, or a LLaMA trained to 1.58 bits, whose
    projections have other row counts is refused from its config; stored as bf16 masters it is not."""
    from trillm.models.bitnet import BitNetConfig
    from trillm.models.llama import LlamaConfig

    packed = bitnet_config("bitnet-tiny", intermediate_size=354)
    with pytest.raises(CheckpointError, match="multiples of 4; gate has 354"):
        BitNetConfig.from_hf(packed)
    assert BitNetConfig.from_hf(bitnet_config("bitnet-tiny", "bf16", intermediate_size=354)).intermediate_size == 354
    llama = {"hidden_size": 64, "intermediate_size": 90, "num_hidden_layers": 1, "num_attention_heads": 4,
             "vocab_size": 101, "quantization_config": packed["quantization_config"]}
    with pytest.raises(CheckpointError, match="multiples of 4; gate has 90"):
        LlamaConfig.from_hf(llama)
    assert LlamaConfig.from_hf({**llama, "quantization_config": {}}).ternary is None


def test_gguf_head_counts_and_head_dim_are_checked(tmp_path):
    good = write_bitnet_gguf(tmp_path / "good.gguf", gguf_config(), "tq2_0", tokenizer=False)
    bad = rewrite_gguf(good, tmp_path / "kv.gguf", metadata={"bitnet.attention.head_count_kv": 3})
    with pytest.raises(CheckpointError, match="kv.gguf: 4 attention heads cannot share 3 KV heads"):
        trillm.load(bad)
    bad = rewrite_gguf(good, tmp_path / "dim.gguf", metadata={"bitnet.attention.key_length": 63})
    with pytest.raises(CheckpointError, match="dim.gguf: head_dim 63 is odd"):
        trillm.load(bad)


def test_the_attention_kernel_refuses_heads_that_do_not_group(native_level):
    """Whatever it is given, the kernel divides by no zero and reads no head that is not there."""
    lib = build.load()
    qkv, table, cache, out = torch.zeros(1, 12, 16), torch.zeros(16), torch.zeros(1, 4, 8, 16), torch.zeros(64)
    for heads, kv_heads, head_dim, slot in [(2, 4, 16, 0), (4, 0, 16, 0), (4, 3, 16, 0), (4, 2, 15, 0), (4, 2, 16, 1)]:
        code = lib.trillm_attention_one_token(qkv.data_ptr(), table.data_ptr(), table.data_ptr(), cache.data_ptr(),
                                              cache.data_ptr(), None, 1, heads, kv_heads, head_dim, slot, 1, 512, 128,
                                              0.25, out.data_ptr())
        assert code == -3, (heads, kv_heads, head_dim, slot)
    with pytest.raises(ValueError, match="do not make grouped-query attention"):
        ops.attend_one_token(torch.zeros(1, 1, 10, 16), table[None, None], table[None, None], cache, cache, 0, 4)


# ---- config.json and GGUF metadata: every bad value is named -------------------------------------------

@pytest.mark.parametrize("changes, named", [
    (dict(num_attention_heads="4"), "num_attention_heads must be an integer >= 1, got '4'"),
    (dict(hidden_size=-64), "hidden_size must be an integer >= 1, got -64"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers must be an integer >= 1, got 2.5"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be an integer >= 1, got True"),
    (dict(vocab_size=DELETE), "vocab_size is missing"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number >= 0, got nan"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number >= 0, got -1e-05"),
    (dict(rope_theta=-1.0), "rope_theta must be a finite number > 0, got -1.0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0, got inf"),
    (dict(rope_parameters=[1, 2]), "rope_parameters must be a JSON object, got list"),
    (dict(rope_parameters={"rope_type": "dynamic"}),
     "rope_parameters.rope_type must be one of 'default', 'llama3', 'yarn', got 'dynamic'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "rope_parameters.low_freq_factor is missing"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 16}), "high_freq_factor must be greater than"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false, got 'yes'"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be an integer >= 1, got 0"),
    (dict(head_dim=7), "head_dim 7 is odd"),
    (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
])
def test_a_bad_config_value_is_named(llama_folder, changes, named):
    edit_config(llama_folder, **changes)
    with pytest.raises(CheckpointError) as error:
        trillm.load(llama_folder)
    assert str(error.value).startswith(f"{llama_folder / 'config.json'}: ") and named in str(error.value)


def test_a_config_that_is_not_an_object(llama_folder):
    (llama_folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="config.json: the file must be a JSON object, got list"):
        trillm.load(llama_folder)
    assert_one_line_error(run_cli("tokenize", "-m", str(llama_folder), "x"), "must be a JSON object")


@pytest.mark.parametrize("metadata, named", [
    ({"bitnet.block_count": "3"}, "bitnet.block_count must be an integer >= 1, got '3'"),
    ({"bitnet.attention.head_count": 0}, "bitnet.attention.head_count must be an integer >= 1, got 0"),
    ({"bitnet.rope.freq_base": -5.0}, "bitnet.rope.freq_base must be a finite number > 0, got -5.0"),
    ({"general.alignment": 24}, "general.alignment must be a power of two, got 24"),
])
def test_a_bad_gguf_metadata_value_is_named(tmp_path, metadata, named):
    good = write_bitnet_gguf(tmp_path / "good.gguf", gguf_config(), "tq2_0", tokenizer=False)
    if "general.alignment" in metadata:  # the writer would lay the file out by it: write a raw header instead
        bad = write_raw_gguf(tmp_path / "bad.gguf", {"general.architecture": "bitnet", "general.alignment": 24}, [])
    else:
        bad = rewrite_gguf(good, tmp_path / "bad.gguf", metadata=metadata)
    with pytest.raises(CheckpointError) as error:
        trillm.load(bad)
    assert str(error.value).startswith(f"{bad}: ") and named in str(error.value)


def test_token_ids_past_the_models_vocabulary_are_refused(llama_folder):
    model = trillm.load(llama_folder)  # vocab_size 101
    with pytest.raises(TrillmError, match="token id 101 is outside the model's vocabulary of 101 tokens"):
        next(model.generate_ids([1, 101, 3], 4))


def test_bad_tokenizer_files_are_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('["not", "an", "object"]')
    with pytest.raises(CheckpointError, match="tokenizer_config.json: the file must be a JSON object, got list"):
        load_tokenizer(tmp_path)
    tokens = ["a", "b", "ab"]
    for metadata, named in [({"tokenizer.ggml.bos_token_id": "a"}, "tokenizer.ggml.bos_token_id must be an integer"),
                            ({"tokenizer.ggml.token_type": [1]}, "token_type must be an array of 3 token types"),
                            ({"tokenizer.ggml.merges": ["a b c"]}, "merges must be an array of 'left right' strings"),
                            ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens must be an array of strings")]:
        with pytest.raises(CheckpointError, match=named):
            tokenizer_from_gguf({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                                 "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"], **metadata},
                                "model.gguf")


def test_the_kv_cache_of_a_huge_context_is_refused_in_one_line(llama_folder):
    edit_config(llama_folder, max_position_embeddings=10**12)
    model = trillm.load(llama_folder)
    with pytest.raises(TrillmError, match="needs a .* GB KV cache, more than this machine's .* lower -c/--ctx-size"):
        next(model.generate_ids([1, 2, 3], 4))


# ---- Values llama.cpp would reject or warn about ---------------------------------------------------------

def test_norm_weights_must_be_finite_floats(llama_folder):
    name = "model.layers.1.post_attention_layernorm.weight"
    tensors = load_file(llama_folder / "model.safetensors")
    tensors[name][3] = float("nan")
    save_file(tensors, llama_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"model.safetensors: norm weight '{name}' holds NaN"):
        trillm.load(llama_folder)
    tensors[name] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, llama_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"norm weight '{name}' is torch.int32"):
        trillm.load(llama_folder)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0])
def test_a_bitnet_weight_scale_must_be_finite_and_nonzero(tmp_path, scale):
    write_bitnet(tmp_path, bitnet_config(vocab_size=101, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                         num_attention_heads=4, num_key_value_heads=4), tokenizer=False)
    name = "model.layers.1.mlp.up_proj.weight_scale"
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[name] = torch.tensor([scale], dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"'{name}' is .*: a weight scale must be finite and nonzero"):
        trillm.load(tmp_path)


def test_layers_past_the_configs_count_are_refused(llama_folder):
    edit_config(llama_folder, num_hidden_layers=1)  # the file holds 2
    with pytest.raises(CheckpointError, match="holds layers up to 1, but its config says 1 layers"):
        trillm.load(llama_folder)


def test_an_untied_model_needs_its_output_head(llama_folder):
    tensors = load_file(llama_folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, llama_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'lm_head.weight' is missing"):
        trillm.load(llama_folder)


@pytest.mark.parametrize("options, named", [
    (["--temperature", "inf"], "temperature must be finite and >= 0"),
    (["--repeat-penalty", "nan"], "repetition_penalty"),
    (["-n", "-2"], "invalid --n-predict -2: must be >= 0, or -1 for no limit"),
    (["-c", "-5"], "invalid context size -5"),
    (["-t", "0"], "invalid --threads 0: must be 1 to 256"),
    (["-t", "1000"], "invalid --threads 1000"),
    (["-t", str(2**31)], "must be 1 to 256"),
])
def test_options_out_of_range_are_refused(options, named):
    assert_one_line_error(run_cli("generate", "-p", "hi", *options), named)


def test_n_predict_minus_one_runs_until_the_context_is_full():
    result = run_cli("generate", "--raw", "-p", "1, 2, 3,", "-n", "-1", "-c", "24", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "the context of 24 tokens is full" in result.stderr and result.stdout.strip()


# ---- GGUF headers ----------------------------------------------------------------------------------------

def write_raw_gguf(path, metadata: dict, tensors: list, data: bytes = b"") -> Path:
    """A GGUF file written byte by byte (gguf's writer would refuse what these tests need): string and
    uint32 metadata; tensors as (name, dims, type number, offset)."""
    def string(text):
        return struct.pack("<Q", len(text.encode())) + text.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += string(key) + (struct.pack("<I", 8) + string(value) if isinstance(value, str)
                              else struct.pack("<II", 4, value))
    for name, dims, type_number, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_number, offset)
    out += b"\0" * (-len(out) % 32) + data
    path.write_bytes(out)
    return path


@pytest.mark.parametrize("tensors, named", [
    ([("a.weight", [32, 2], 0, 0), ("a.weight", [32, 2], 0, 256)], "tensor 'a.weight' is listed twice"),
    ([("a.weight", [32, 2], 0, 0), ("b.weight", [32, 2], 0, 128)], "tensors 'a.weight' and 'b.weight' overlap"),
    ([("a.weight", [32, 2], 0, 8)], "starts at offset 8, not a multiple of general.alignment 32"),
    ([("a.weight", [32, 2], 99, 0)], "GGML type number 99, which no GGUF reader knows"),
    ([("a.weight", [33, 2], 8, 0)], "not whole Q8_0 blocks of 32"),
])
def test_bad_gguf_tensor_tables_are_named(tmp_path, tensors, named):
    path = write_raw_gguf(tmp_path / "bad.gguf", {"general.architecture": "llama"}, tensors, bytes(1024))
    with pytest.raises(CheckpointError, match=re.escape(named)):
        trillm.load(path)


def test_an_edited_gguf_parameter_changes_this_process_only():
    """The file is mapped copy-on-write: an edit works in memory (a read-only map crashed the process)."""
    path = default_model_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    script = ("import trillm, torch; m = trillm.load(None); m.network.norm.weight.mul_(2); "
              "print(m.forward(torch.tensor([[1, 2, 3]])).isfinite().all().item())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


# ---- Files outside the folder, and files replaced in place -------------------------------------------

@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_an_index_cannot_name_files_outside_the_folder(llama_folder, shard):
    (llama_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(CheckpointError, match=f"shard {re.escape(repr(shard))} is not a file name inside the model"):
        trillm.load(llama_folder)


def test_synth_never_overwrites_without_force(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("synth", "bitnet-tiny", str(out)), "exists and is not empty: pass --force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    gguf_path = tmp_path / "model.gguf"
    gguf_path.write_text("mine")
    assert_one_line_error(run_cli("synth", "bitnet-tiny", str(gguf_path), "--layout", "tq2_0"), "--force")
    assert gguf_path.read_text() == "mine"
    result = run_cli("synth", "bitnet-tiny", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.gguf"]  # no temporary left


def test_synth_force_leaves_a_reader_of_the_old_files_its_files(tmp_path):
    """The new checkpoint is renamed into place: a process that has the old file mapped keeps reading the
    old bytes (rewriting the file in place changed them under it, or ended it with SIGBUS)."""
    from trillm.synth import write_preset

    out = write_preset("bitnet-tiny", tmp_path / "model", seed=0)
    old_bytes = (out / "model.safetensors").read_bytes()
    with open(out / "model.safetensors", "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        write_preset("bitnet-tiny", out, seed=1, force=True)
        assert mapped[:] == old_bytes
    assert (out / "model.safetensors").read_bytes() != old_bytes


def test_a_failed_synth_leaves_no_partial_output_and_the_old_in_place(tmp_path, monkeypatch):
    from trillm.synth import bitnet, write_preset

    out = tmp_path / "model"
    write_preset("bitnet-tiny", out)
    before = sorted(p.name for p in out.iterdir())

    def disk_full(path, tensors, metadata=None):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bitnet, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_preset("bitnet-tiny", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- The native library's cache ----------------------------------------------------------------------------

# The cache's tests build the portable library unoptimized: what they check is the same, in a few seconds.
UNOPTIMIZED = ["-O0", "-shared", "-fPIC", "-pthread"]


def load_in_a_new_process(cache) -> subprocess.CompletedProcess:
    script = (f"from trillm.native import build; build.FLAGS = {UNOPTIMIZED!r}; lib = build.library('c'); "
              "print(lib.trillm_vector_floats())")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRILLM_CACHE=str(cache)))


def test_a_damaged_cached_library_is_built_again(tmp_path):
    first = load_in_a_new_process(tmp_path)
    assert first.returncode == 0 and first.stdout.strip() == "1", first.stderr
    (library,) = (tmp_path / "native").glob("trillm-c-*.so")
    whole = library.read_bytes()
    library.write_bytes(whole[: len(whole) // 2])  # truncated: loading it crashed every later run
    again = load_in_a_new_process(tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "1", again.stderr
    assert library.read_bytes() == whole
    record = library.with_suffix(".so.sha256")
    for damaged in (b"", b"\x7fELF" + bytes(len(whole) - 4)):  # emptied, or another file of the same size
        library.write_bytes(damaged)
        assert not build.intact(library, record)
    library.write_bytes(whole)
    assert build.intact(library, record)


def test_abandoned_partial_builds_are_removed(tmp_path, fresh_native, monkeypatch):
    folder = tmp_path / "native"
    folder.mkdir()
    dead = folder / "trillm-c-0123456789abcdef.so.999999999.x1y2.partial"  # no process has this pid
    alive = folder / f"trillm-c-0123456789abcdef.so.{os.getpid()}.x1y2.partial"
    dead.write_bytes(b"half a library")
    alive.write_bytes(b"being built")
    monkeypatch.setenv("TRILLM_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "FLAGS", UNOPTIMIZED)
    assert build.library("c") is not None
    assert not dead.exists() and alive.exists()


def test_empty_cache_variables_mean_unset(monkeypatch):
    monkeypatch.setenv("TRILLM_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert build.cache_dir() == Path.home() / ".cache" / "trillm" / "native"
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert build.cache_dir() == Path("/somewhere/trillm/native")


# ---- Chat templates that try to run forever or fill the memory -------------------------------------------

@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**10 }}",
    "{{ 10**10 * 'x' }}",
    "{{ (range(10)|list) * 10**9 }}",
    "{{ messages|tojson(indent=10**8) }}",
    "{{ '{0:>3000000000}'.format(1) }}",
    "{{ '{0:>{1}}'.format(1, 3000000000) }}",
    "{{ '%3000000000s' % 1 }}",
    "{{ '%*s' % (3000000000, 'x') }}",
    "{{ 'x'|center(3000000000) }}",
    "{{ 'x'.ljust(3000000000) }}",
    "{{ 2 ** (10 ** 9) }}",
])
def test_template_bombs_are_refused_at_once(template):
    with pytest.raises(ChatTemplateError, match="larger than a chat template may|longer than"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_a_template_that_loops_too_long_is_stopped(monkeypatch):
    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.5)
    looping = "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="ran for more than 0.5 s"):
        render_chat(looping, [{"role": "user", "content": "hi"}])


def test_a_template_that_grows_the_memory_is_stopped(monkeypatch):
    monkeypatch.setattr(chat, "MAX_RENDER_GROWTH_BYTES", 64 << 20)
    doubling = "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="took more than 64 MB of memory"):
        render_chat(doubling, [{"role": "user", "content": "hi"}])


def test_a_template_that_writes_too_much_is_stopped():
    writing = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=f"wrote more than {chat.MAX_PROMPT_CHARS} characters"):
        render_chat(writing, [{"role": "user", "content": "hi"}])


# ---- Prompts, text and terminals -------------------------------------------------------------------------

def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(monkeypatch):
    model = trillm.load(None)
    encoded = []
    monkeypatch.setattr(type(model.tokenizer), "encode", lambda self, text, **options: encoded.append(text))
    with pytest.raises(TrillmError, match=r"the prompt is at least \d+ tokens \(10000000 bytes\), longer than the "
                                          r"context of 8192"):
        "".join(model.stream("0123456789" * 1_000_000, 4))
    assert encoded == []


def test_invalid_utf8_is_one_line():
    script = "import sys; from trillm.cli import main; sys.exit(main(sys.argv[1:]))"
    for args, named in [([b"generate", b"-p", b"caf\xe9"], "the prompt is not valid UTF-8"),
                        ([b"generate", b"-p", b"hi", b"--system", b"\xff"], "--system is not valid UTF-8"),
                        ([b"tokenize", b"\xc3"], "the text is not valid UTF-8")]:
        assert_one_line_error(subprocess.run([sys.executable.encode(), b"-c", script.encode(), *args],
                                             capture_output=True, text=True, timeout=300), named)
    result = subprocess.run([sys.executable, "-m", "trillm.cli", "chat"], input=b"caf\xe9\n", capture_output=True,
                            timeout=300)
    assert_one_line_error(text_result(result), "standard input is not valid UTF-8 (at byte 3)")


def text_result(result):
    result.stdout, result.stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    return result


def test_a_reader_that_goes_away_ends_the_output_quietly():
    process = subprocess.Popen([sys.executable, "-m", "trillm.cli", "generate", "--raw", "-p", "1, 2, 3,", "-n", "200",
                                "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(3)
    process.stdout.close()  # `| head -c 3`
    assert process.wait(timeout=300) == 141
    assert process.stderr.read() == b""


@pytest.mark.parametrize("closed, args, named", [
    (1, ["tokenize", "hi"], "standard output is closed"),
    (0, ["chat"], "standard input is closed"),
])
def test_closed_standard_streams_are_one_line(closed, args, named):
    result = subprocess.run([sys.executable, "-m", "trillm.cli", *args], capture_output=closed != 1,
                            stderr=subprocess.PIPE if closed == 1 else None, text=True, timeout=300,
                            preexec_fn=lambda: os.close(closed))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"trillm: error: {named}" + lines[0].split(named, 1)[1]


def test_with_stderr_closed_an_error_never_reaches_stdout():
    result = subprocess.run([sys.executable, "-m", "trillm.cli", "tokenize", "-m", "/no/such/model", "x"],
                            stdout=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert result.returncode == 1 and result.stdout == ""


def test_escape_sequences_in_a_files_text_reach_the_terminal_escaped(tiny_bitnet):
    config_path = tiny_bitnet / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ raise_exception('\x1b]0;pwned\x07\x1b[2J gone') }}"
    config_path.write_text(json.dumps(config))
    result = run_cli("generate", "-m", str(tiny_bitnet), "-p", "hi")
    assert_one_line_error(result, "chat template error: ", "\\x1b]0;pwned\\x07\\x1b[2J gone")
    assert "\x1b" not in result.stderr


@pytest.fixture
def tiny_bitnet(tmp_path):
    if not has_llama3_vocabulary():
        pytest.skip("quicktok (Llama 3 vocabulary) missing")
    from trillm.synth import write_preset

    return write_preset("bitnet-tiny", tmp_path / "tiny")


def test_a_rust_panic_is_one_line(monkeypatch, capsys):
    from trillm import cli

    class PanicException(BaseException):  # what pyo3 raises for a panic in tokenizers
        pass

    def panicking(args):
        raise PanicException("regex compilation failed\nstack backtrace: ...")

    monkeypatch.setattr(cli, "command_tokenize", panicking)
    monkeypatch.delenv("TRILLM_DEBUG", raising=False)
    assert cli.main(["tokenize", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PanicException: regex compilation failed" in err and "malformed" in err


def test_ctrl_c_while_starting_is_one_line():
    """SIGINT while torch is being imported (its library just mapped) or the model loaded: one line, 130."""
    process = subprocess.Popen([sys.executable, "-m", "trillm.cli", "tokenize", "x"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and len(err.strip().splitlines()) <= 1 and "Traceback" not in err, err


# ---- A chat keeps its conversation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_64():
    return trillm.load(None, ctx_size=128)


def chat_args(**options):
    return SimpleNamespace(**{"n_predict": 24, "stop": [], "reasoning_effort": "medium", "hide_reasoning": False,
                              **options})


def test_a_chat_that_outgrows_its_context_drops_its_oldest_turns(smollm2_64, capsys):
    from trillm.chat import Conversation
    from trillm.cli import chat_turn
    from trillm.engine import Sampling, Session

    model, conversation, session = smollm2_64, Conversation("Be brief."), Session()
    for question in ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Peru?",
                     "And of Chile?"]:
        chat_turn(model, conversation, session, question, chat_args(), Sampling(temperature=0))
        assert len(model.chat_prompt(conversation.all_messages())) <= model.max_context
    assert conversation.messages[0]["content"] != "What is the capital of France?"  # dropped
    assert "oldest 2 messages were dropped" in capsys.readouterr().err
    with pytest.raises(TrillmError, match="the message is too long for the context of 128 tokens"):
        chat_turn(model, conversation, session, "word " * 200, chat_args(), Sampling(temperature=0))
    assert conversation.messages[-1]["role"] == "assistant"  # the long message is not kept; the rest is


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(smollm2_64, monkeypatch, capsys):
    from trillm.chat import Conversation
    from trillm.cli import chat_turn
    from trillm.engine import Sampling, Session

    model, conversation = smollm2_64, Conversation()
    real_stream = type(model).stream_messages

    def interrupted(self, *args, **options):
        for index, piece in enumerate(real_stream(self, *args, **options)):
            if index == 3:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(type(model), "stream_messages", interrupted)
    chat_turn(model, conversation, Session(), "Count to ten.", chat_args(n_predict=50), Sampling(temperature=0))
    assert "(reply stopped)" in capsys.readouterr().err
    assert conversation.messages[-1]["role"] == "assistant" and conversation.messages[-1]["content"]


def test_a_reply_cut_short_by_the_context_says_so(smollm2_64, capsys):
    from trillm.chat import Conversation
    from trillm.cli import chat_turn
    from trillm.engine import Sampling, Session

    conversation = Conversation()
    chat_turn(smollm2_64, conversation, Session(), "Write a long story about a dragon.", chat_args(n_predict=-1),
              Sampling(temperature=0))
    assert "the reply was cut short: the context is full" in capsys.readouterr().err
