"""`trillm inspect`: its numbers against independent counts (the gguf package's reader, the safetensors
headers, the seed analysis of the real BitNet release), its verification against corrupted weights, and its
errors on files that are not checkpoints."""

import json
import math
import subprocess
import sys

import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trillm.checkpoint import resolve_source
from trillm.inspect import inspect_checkpoint, sampled_layers
from trillm.synth import write_preset


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trillm.cli", *args], capture_output=True, text=True, timeout=300)


def categories(report) -> dict:
    return {row["category"]: row for row in report["categories"]}


@pytest.mark.slow
def test_2b4t_folder_matches_the_seed_analysis_of_the_release(bitnet_2b4t_folder):
    """The numbers ../shared/seeds/003 gives for the real packed release (its MB are MiB): 542 tensors, 210
    packed projections (U8, 496.88 MB), the embedding 626.25 MB = 55.72%, each MLP projection 126.56 MB =
    11.26%, Q and O 46.88 MB = 4.17%, K and V 11.72 MB = 1.04%, per block 69,468,160 weights in 16.56 MB."""
    report = inspect_checkpoint(bitnet_2b4t_folder, "all")
    assert report["tensor_count"] == 542
    formats = {row["format"]: row for row in report["formats"]}
    assert formats["U8 ternary (4 a byte)"]["tensors"] == 210
    assert formats["U8 ternary (4 a byte)"]["bytes"] / 2**20 == pytest.approx(496.88, abs=0.005)
    assert formats["BF16"]["tensors"] == 332
    stats = categories(report)
    for category, mib, share in (("Embedding", 626.25, 0.5572), ("MLP down", 126.56, 0.1126), ("MLP up", 126.56, 0.1126),
                                 ("MLP gate", 126.56, 0.1126), ("Attention Q", 46.88, 0.0417),
                                 ("Attention O", 46.88, 0.0417), ("Attention K", 11.72, 0.0104),
                                 ("Attention V", 11.72, 0.0104)):
        assert stats[category]["bytes"] / 2**20 == pytest.approx(mib, abs=0.005), category
        assert stats[category]["share"] == pytest.approx(share, abs=5e-5), category
    # Logical weights: 4 a packed byte (the seed counted bytes): 2560 x 6912 per MLP matrix, plus the scale.
    assert stats["MLP down"]["params"] == 30 * (2560 * 6912 + 1)
    block = report["planning"]["block_total"]
    assert block["params"] == 69_468_160 and block["stored_bytes"] / 2**20 == pytest.approx(16.56, abs=0.005)
    assert report["planning"]["model_total"]["params"] == 2_084_044_800
    assert report["structure"]["all_share"] and report["structure"]["layers"] == 30
    # Every projection of every layer verified: random codes, none invalid.
    assert len(report["verification"]) == 210 and not report["verification_failed"]
    assert all(0.2 < row["zero"] < 0.6 for row in report["verification"])


def test_gguf_numbers_equal_the_gguf_packages_count():
    path = resolve_source(None)
    report = inspect_checkpoint(path, "1")
    reader = GGUFReader(path)
    assert report["tensor_count"] == len(reader.tensors)
    assert report["total_params"] == sum(int(t.n_elements) for t in reader.tensors) == 134_515_008
    assert report["total_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert report["config"]["layers"] == 30 and report["config"]["tied_embeddings"] is True
    assert report["config"]["quantization"] == "MOSTLY_Q4_1"
    assert categories(report)["Embedding"]["bytes"] == next(int(t.n_bytes) for t in reader.tensors
                                                             if t.name == "token_embd.weight")
    # Layer 0 verified: Q4_1 blocks decoded, all finite.
    assert {row["kind"] for row in report["verification"]} == {"Q4_1 blocks"}
    assert len(report["verification"]) == 7 and not report["verification_failed"]
    # A decode step reads everything once: the tied embedding is the head.
    assert report["planning"]["bytes_per_decoded_token"] == report["total_bytes"]


def test_gpt_oss_folder_experts_layers_and_mxfp4(tmp_path):
    write_preset("gpt-oss-tiny", tmp_path)
    report = inspect_checkpoint(tmp_path, "all", target_tps=20)
    config = json.loads((tmp_path / "config.json").read_text())
    blocks_name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    with safe_open(tmp_path / "model-00000-of-00000.safetensors", "pt") as file:  # the release's sharded layout
        shapes = {name: file.get_slice(name).get_shape() for name in file.keys()}
    tensor = next(t for t in report["tensors"] if t["name"] == blocks_name)
    assert tensor["params"] == 2 * math.prod(shapes[blocks_name])  # two FP4 codes a byte
    assert tensor["logical_shape"] == [config["num_local_experts"], 2 * config["intermediate_size"],
                                       config["hidden_size"]]
    groups = report["structure"]["groups"]
    assert not report["structure"]["all_share"]
    assert {group["kind"]: group["layers"] for group in groups} == {"sliding_attention": [0], "full_attention": [1]}
    mxfp4 = [row for row in report["verification"] if row["kind"] == "mxfp4"]
    assert len(mxfp4) == 4 and all(row["nan_scales"] == 0 and 0 < row["zero_share"] < 0.3 for row in mxfp4)
    planning = report["planning"]
    assert planning["routed_expert_share"] == config["num_experts_per_tok"] / config["num_local_experts"]
    assert planning["bandwidth_needed_gb_per_s"] == pytest.approx(planning["bytes_per_decoded_token"] * 20 / 1e9)


def test_bf16_master_is_shown_ternarized(tmp_path):
    write_preset("bitnet-tiny", tmp_path, layout="bf16")
    report = inspect_checkpoint(tmp_path, "1")
    kinds = {row["kind"] for row in report["verification"]}
    assert kinds == {"bf16 master, ternarized (absmean)"} and len(report["verification"]) == 7


def test_an_invalid_ternary_code_fails_verification(tmp_path):
    write_preset("bitnet-tiny", tmp_path)
    name = "model.layers.2.mlp.gate_proj.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[name][3, 5] |= 0b11 << 2  # the weight at row 3 + (rows / 4), column 5
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    packed_rows = tensors[name].shape[0]
    report = inspect_checkpoint(tmp_path, "all")
    assert report["verification_failed"] == [name]
    row = next(row for row in report["verification"] if row["name"] == name)
    assert row["invalid_codes"] == 1 and f"row {3 + packed_rows}, column 5" in row["problem"]
    result = run_cli("inspect", str(tmp_path), "--verify", "all")
    assert result.returncode == 1 and name in result.stdout
    assert result.stderr.strip().splitlines() == [f"trillm: error: {tmp_path}: 1 tensors failed verification "
                                                  f"(the first: {name})"]
    assert run_cli("inspect", str(tmp_path), "--verify", "1").returncode == 0  # layer 2 not sampled


def test_a_nan_mxfp4_scale_fails_verification(tmp_path):
    write_preset("gpt-oss-tiny", tmp_path)
    name = "model.layers.1.mlp.experts.down_proj_scales"
    shard = tmp_path / "model-00000-of-00000.safetensors"
    tensors = load_file(shard)
    tensors[name][0, 0, 0] = 255
    save_file(tensors, shard, metadata={"format": "pt"})
    report = inspect_checkpoint(tmp_path, "all")
    assert report["verification_failed"] == ["model.layers.1.mlp.experts.down_proj_blocks"]


def test_cli_json_filter_and_modules():
    result = run_cli("inspect", "--json", "--filter", r"blk\.3\.ffn", "--modules", "--verify", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [t["name"] for t in report["tensors"]] == ["blk.3.ffn_down.weight", "blk.3.ffn_gate.weight",
                                                      "blk.3.ffn_norm.weight", "blk.3.ffn_up.weight"]
    assert report["verification"] == []
    weights = {row["name"]: row for row in report["modules"]["weights"]}
    assert weights["blocks.0.mlp.gate_up_proj.weight"]["shape"] == [3072, 576]  # gate and up fused by trillm
    assert weights["blocks.0.mlp.gate_up_proj.weight"]["format"] == "Q4_1 blocks"
    assert "Transformer(" in report["modules"]["tree"]
    text = run_cli("inspect", "--verify", "1").stdout
    for heading in ("1. Tensors", "2. By category", "3. Layer 0", "4. Linear layers", "5. Formats", "6. Verification"):
        assert heading in text


@pytest.mark.parametrize("case", ["truncated gguf", "corrupt gguf header", "corrupt safetensors header",
                                  "folder without weights", "neither", "bad verify", "bad filter"])
def test_bad_input_is_one_line(tmp_path, case):
    args = []
    if case == "truncated gguf":
        data = resolve_source(None).read_bytes()
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:len(data) // 2])
        fragment = "truncated"
    elif case == "corrupt gguf header":
        path = tmp_path / "bad.gguf"
        path.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 64)
        fragment = "bad.gguf"
    elif case == "corrupt safetensors header":
        write_preset("bitnet-tiny", tmp_path)
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[:8] + b"[" + data[9:])  # its JSON header broken
        path, fragment = tmp_path, "model.safetensors"
    elif case == "folder without weights":
        (tmp_path / "config.json").write_text("{}")
        path, fragment = tmp_path, "no *.safetensors"
    elif case == "neither":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        fragment = "not a GGUF file"
    elif case == "bad verify":
        path, args, fragment = resolve_source(None), ["--verify", "some"], "--verify"
    else:
        path, args, fragment = resolve_source(None), ["--filter", "("], "--filter"
    result = run_cli("inspect", str(path), *args)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trillm: error: ") and fragment in lines[0], result.stderr


def test_sampled_layers():
    assert sampled_layers(30, "2") == [0, 29] and sampled_layers(30, "3") == [0, 14, 29]  # round half to even
    assert sampled_layers(30, "0") == [] and sampled_layers(3, "9") == [0, 1, 2] and sampled_layers(4, "all") == [0, 1, 2, 3]
    assert torch.equal(torch.tensor(sampled_layers(1, "2")), torch.tensor([0]))
