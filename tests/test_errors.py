"""Bad input gets one clear error naming the problem, from the API and from the CLI (no traceback)."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import trillm
from trillm.engine import Sampling
from trillm.errors import CheckpointError, TrillmError

from test_llama import CONFIGS, save_random_llama


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "trillm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trillm: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def llama_folder(tmp_path):
    save_random_llama(tmp_path, CONFIGS["mha-untied"][0])
    return tmp_path


def test_gpt_oss_options_are_refused_elsewhere(llama_folder):
    for option in ({"dense": "q8_0"}, {"expert_activations": "int8"}):
        with pytest.raises(TrillmError, match="applies to gpt-oss only"):
            trillm.load(llama_folder, **option)
    with pytest.raises(TrillmError, match="invalid dense format"):
        trillm.load(llama_folder, dense="q4_0")
    assert_one_line_error(run_cli("generate", "-m", str(llama_folder), "-p", "hi", "--dense", "q8_0"), "gpt-oss only")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        trillm.load(tmp_path / "absent.gguf")
    assert_one_line_error(run_cli("generate", "-m", str(tmp_path / "absent.gguf"), "-p", "hi"), "absent.gguf")


def test_hub_repo_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no network, deterministically
    with pytest.raises(CheckpointError, match="cannot download 'someone/absent-model'"):
        trillm.load("someone/absent-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        trillm.load(tmp_path)


def test_truncated_safetensors(llama_folder):
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        trillm.load(llama_folder)
    assert_one_line_error(run_cli("tokenize", "-m", str(llama_folder), "x"), "model.safetensors")


def test_tensor_of_wrong_shape(llama_folder):
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(32, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        trillm.load(llama_folder)
    message = str(error.value)
    assert "model.safetensors" in message and name in message and "[32, 64]" in message and "[64, 64]" in message


def test_missing_tensor(llama_folder):
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.mlp.up_proj.weight"
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name}.*missing"):
        trillm.load(llama_folder)


def test_unknown_architecture(llama_folder):
    config_path = llama_folder / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["MambaForCausalLM"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture 'MambaForCausalLM'"):
        trillm.load(llama_folder)
    assert_one_line_error(run_cli("tokenize", "-m", str(llama_folder), "x"), "MambaForCausalLM")


def test_model_type_names_the_family_without_architectures(llama_folder):
    config_path = llama_folder / "config.json"
    config = json.loads(config_path.read_text())
    del config["architectures"]
    config_path.write_text(json.dumps(config))
    assert trillm.load(llama_folder).config.num_layers == 2  # model_type "llama"
    config_path.write_text(json.dumps(dict(config, model_type="mamba")))
    with pytest.raises(CheckpointError, match="no supported architecture or model_type .model_type 'mamba'"):
        trillm.load(llama_folder)


def test_unknown_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="mamba.gguf: unsupported GGUF architecture 'mamba'"):
        trillm.load(tmp_path / "mamba.gguf")


def test_a_bug_of_ours_says_so_in_one_line(monkeypatch, capsys):
    """An exception that is not a TrillmError is trillm's fault, not the user's: the line says so and how to
    see the traceback, which TRILLM_DEBUG=1 shows."""
    from trillm import cli

    def broken(args):
        raise KeyError("blocks")

    monkeypatch.setattr(cli, "command_tokenize", broken)
    monkeypatch.delenv("TRILLM_DEBUG", raising=False)
    assert cli.main(["tokenize", "x"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("trillm: internal error (a bug in trillm") and "TRILLM_DEBUG=1" in captured.err
    assert "KeyError: 'blocks'" in captured.err
    monkeypatch.setenv("TRILLM_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["tokenize", "x"])


def test_pickle_only_folder_is_refused(llama_folder):
    (llama_folder / "model.safetensors").rename(llama_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        trillm.load(llama_folder)


def test_prompt_longer_than_context(llama_folder):
    model = trillm.load(llama_folder)  # max_position_embeddings = 128
    with pytest.raises(TrillmError, match="prompt is 200 tokens, longer than the context of 128"):
        next(model.generate_ids(list(range(1, 101)) * 2, max_new_tokens=4))


def test_prompt_longer_than_context_cli():
    result = run_cli("generate", "-c", "8", "-p", "a prompt that is certainly longer than eight tokens, by far", "--raw")
    assert_one_line_error(result, "longer than the context of 8 tokens")


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0),
                                          ("top_k", -3), ("repetition_penalty", 0.0)])
def test_invalid_sampling_values(field, value):
    with pytest.raises(TrillmError, match=f"invalid sampling value: {field}"):
        Sampling(**{field: value})


def test_invalid_sampling_value_cli():
    assert_one_line_error(run_cli("generate", "-p", "hi", "--top-p", "1.5"), "top_p")


def test_truncated_gguf(tmp_path):
    from trillm.checkpoint import default_model_path

    cut = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as file:
        cut.write_bytes(file.read(3_000_000))
    with pytest.raises(CheckpointError, match="cut.gguf"):
        trillm.load(cut)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        trillm.load(path)
