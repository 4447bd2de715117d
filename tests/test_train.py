"""BitNet b1.58 training: the STE's gradients by hand, the schedules' values, exports that trillm and
transformers load with the training model's logits, a start from LLaMA checkpoints (a folder, the shipped
GGUF), exact resume, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import trillm
from test_bitnet import assert_sequences_match, load_reference
from test_llama import save_random_llama
from tokenizer_fixtures import CORPUS
from trillm.train.export import export_model, write_tokenizer
from trillm.train.init_from import llama_start
from trillm.train.loop import TrainSettings, train
from trillm.train.recipe import BitLinear, BitNetModel, TwoStageSchedule, preset_shape, quantize_weight


def test_bitlinear_gradients_go_straight_through():
    """y = q(x) q(W)^T; the STE takes dq/dx and dq/dW as the identity, so dL/dx = g q(W) and dL/dW = g^T q(x)."""
    layer = BitLinear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, -0.1, 0.4, -1.2], [0.05, 0.7, -0.6, 0.2], [-0.3, 0.3, 1.1, 0.0]]))
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0]], requires_grad=True)
    y = layer(x)
    # By hand: mean|W| = 5.85 / 12 = 0.4875; W / 0.4875 rounded and clipped; x * 127 / 4 rounded, / (127 / 4).
    scale = 5.85 / 12
    w_q = torch.tensor([[2.0, 0, 1, -2], [0, 1, -1, 0], [-1, 1, 2, 0]]).clamp(-1, 1) * scale
    x_q = torch.tensor([[32.0, -64.0, 16.0, 127.0]]) / (127 / 4)
    torch.testing.assert_close(y, x_q @ w_q.T)
    g = torch.tensor([[1.0, -0.5, 2.0]])
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w_q)
    torch.testing.assert_close(layer.weight.grad, g.T @ x_q)


def test_two_stage_schedule():
    schedule = TwoStageSchedule(10_000, (1.5e-3, 1e-3))
    assert schedule.warmup == 375 and schedule.midpoint == 5000
    assert schedule.learning_rate(0) == pytest.approx(1.5e-3 / 375)
    assert schedule.learning_rate(374) == pytest.approx(1.5e-3)
    assert schedule.learning_rate(375) == pytest.approx(1.5e-3)
    assert schedule.learning_rate(2687) == pytest.approx(1.5e-3 - 0.25e-3 * 2312 / 4625)  # towards 1.25e-3
    assert schedule.learning_rate(5000) == pytest.approx(1e-3)  # the drop to the second stage's lower peak
    assert schedule.learning_rate(7500) == pytest.approx(0.5e-3) and schedule.learning_rate(9999) == pytest.approx(2e-7)
    assert schedule.decay(4999) == 0.1 and schedule.decay(5000) == 0.0
    assert TwoStageSchedule(100, (1e-3, 5e-4)).warmup == 10  # a short run warms up for a tenth of it
    with pytest.raises(ValueError, match="lower"):
        TwoStageSchedule(100, (1e-3, 2e-3))


@pytest.fixture(scope="module")
def tokenizer():
    return trillm.load(None).tokenizer


def tiny_model(tokenizer, seed=0) -> BitNetModel:
    shape = preset_shape("tiny", tokenizer.vocab_size, num_hidden_layers=2, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id)
    torch.manual_seed(seed)
    model = BitNetModel(shape)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(std=1.0)  # spread logits (std > 1), so that a wrong layer shows
        for parameter in model.parameters():  # exactly what the bf16 files will hold
            parameter.copy_(parameter.bfloat16().float())
    return model.eval()


def test_exports_load_with_the_training_models_logits(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (16, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    bf16 = export_model(model, tokenizer, tmp_path / "bf16", "bf16")
    with torch.no_grad():
        reference = load_reference(bf16)(ids).logits
    # transformers: the same arithmetic, up to float rounding and so up to an int8 rounding flip now and then
    assert_sequences_match(reference, expected)
    assert_sequences_match(trillm.load(bf16, head="bf16").forward(ids), expected)
    packed = export_model(model, tokenizer, tmp_path / "packed", "packed")
    with torch.no_grad():
        packed_reference = load_reference(packed)(ids).logits
    # trillm's int8 activations are transformers' up to float rounding, which flips a rounding now and then;
    # a flip changes the rest of its sequence (see assert_sequences_match): here 2-5 of 16, all in the others.
    assert_sequences_match(trillm.load(packed, head="bf16").forward(ids), packed_reference, min_fraction=0.6)
    # The packed file rounds each weight_scale to bf16: a relative 2^-9 of each projection's output.
    assert (packed_reference - expected).abs().max() < 0.05 * expected.std()
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == "offline" and config["architectures"] == ["BitNetForCausalLM"]
    assert trillm.load(packed).tokenizer.encode("Hello world") == tokenizer.encode("Hello world")


def run_settings(tmp_path, out, steps, **overrides) -> TrainSettings:
    data = tmp_path / "text.txt"
    if not data.exists():
        data.write_text("\n\n".join(CORPUS * 20))
    settings = dict(preset="tiny", data=[str(data)], out=str(out), steps=steps, batch_tokens=128, seq_len=32,
                    micro_batch=2, val_every=2, val_batches=1, checkpoint_every=100)
    return TrainSettings(**{**settings, **overrides})


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole = train(run_settings(tmp_path, tmp_path / "whole", 6), progress=False)["model"]
    train(run_settings(tmp_path, tmp_path / "parts", 6), progress=False, stop_after=3)
    resumed = train(run_settings(tmp_path, tmp_path / "parts", 6), progress=False)["model"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    log = [json.loads(line) for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4, 5, 6]
    assert log[0]["loss"] > log[-1]["loss"]


def test_bf16_autocast_follows_the_float32_run(tmp_path):
    exact = train(run_settings(tmp_path, tmp_path / "f32", 2, autocast="none"), progress=False)
    rounded = train(run_settings(tmp_path, tmp_path / "bf16", 2, autocast="bf16"), progress=False)
    assert rounded["loss"] != exact["loss"] and abs(rounded["loss"] - exact["loss"]) < 0.02


def test_full_precision_baseline_has_no_quantizer(tmp_path):
    model = train(run_settings(tmp_path, tmp_path / "full", 2, precision="full"), progress=False)["model"]
    layer = model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    values, _ = quantize_weight(layer.weight)
    assert values.unique().tolist() == [-1.0, 0.0, 1.0]


# ---- Starting from LLaMA ----------------------------------------------------------------------------------

def random_llama(folder, tokenizer):
    """A small random LlamaForCausalLM folder with the default model's tokenizer, and transformers' model."""
    reference = save_random_llama(folder, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                               intermediate_size=96, tie_word_embeddings=False,
                                               vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                               eos_token_id=tokenizer.eos_id))
    with torch.no_grad():
        reference.lm_head.weight.mul_(30)  # spread logits (std > 1), so that a wrong layer shows
    reference.save_pretrained(folder)
    write_tokenizer(tokenizer, folder)
    return reference


def test_a_start_from_llama_blends_into_an_export_that_transformers_loads(tmp_path, tokenizer):
    reference = random_llama(tmp_path / "llama", tokenizer)
    shape, weights, _ = llama_start(str(tmp_path / "llama"))
    model = BitNetModel(shape)
    model.load_state_dict(weights)
    model.eval().set_blend(0.0)
    ids = torch.randint(0, tokenizer.vocab_size, (16, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)  # lambda 0: the model as it was
        model.set_blend(1.0)
        ternarized = model(ids)
    assert (ternarized - reference(ids).logits).abs().max() > 1e-3  # lambda 1: BitLinears

    settings = run_settings(tmp_path, tmp_path / "run", 4, preset=None, init_from=str(tmp_path / "llama"), blend=2)
    result = train(settings, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["val_loss_ternarized"] > log[0]["val_loss_full_precision"] > 0
    assert [record["blend"] for record in log[1:]] == [0.5, 1.0, 1.0, 1.0]
    model = result["model"].eval()
    with torch.no_grad():
        for parameter in model.parameters():  # exactly what the bf16 files will hold
            parameter.copy_(parameter.bfloat16().float())
        expected = model(ids)
    for layout in ("packed", "bf16"):
        folder = export_model(model, result["tokenizer"], tmp_path / layout, layout)
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["quantization_config"]["quant_method"] == "bitnet"
        transformers_model = load_reference(folder)
        assert type(transformers_model.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
        with torch.no_grad():
            theirs = transformers_model(ids).logits
        if layout == "packed":  # the weight_scale rounded to bf16, a relative 2^-9 of each projection's output
            assert (theirs - expected).abs().max() < 0.05 * expected.std()
        else:  # the same arithmetic, up to an int8 rounding flip now and then (assert_sequences_match)
            assert_sequences_match(theirs, expected)
        assert_sequences_match(trillm.load(folder, head="bf16").forward(ids), theirs, min_fraction=0.6)
    assert trillm.load(tmp_path / "packed").tokenizer.encode("Hello world") == tokenizer.encode("Hello world")


def test_a_start_from_the_shipped_gguf_reads_its_weights(tokenizer):
    """The default model (GGUF, Q4_1 blocks, q/k rows in llama.cpp's order): at lambda 0 the training model
    computes what trillm's exact path computes from the file."""
    shape, weights, start_tokenizer = llama_start(None)
    assert shape.architecture == "llama" and shape.vocab_size == tokenizer.vocab_size
    model = BitNetModel(shape)
    model.load_state_dict(weights)
    model.eval().set_blend(0.0)
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(trillm.load(None).forward(ids), ours, rtol=1e-4, atol=2e-4 * ours.abs().max().item())


@pytest.mark.parametrize("case", ["empty data", "missing data", "unknown preset", "seq-len beyond the context",
                                  "init-from a BitNet", "init-from with a tokenizer", "no preset"])
def test_bad_input_is_one_line(tmp_path, case):
    text = tmp_path / "text.txt"
    text.write_text("" if case == "empty data" else "some words " * 50)
    args = ["--preset", "tiny", "--data", str(text), "--out", str(tmp_path / "out"), "--steps", "1"]
    fragment = {"empty data": "no text", "missing data": "no such file", "unknown preset": "unknown preset 'huge'",
                "seq-len beyond the context": "beyond the model's context",
                "init-from a BitNet": "is not LLaMA-shaped", "init-from with a tokenizer": "keeps the model's own",
                "no preset": "needs --preset (or --init-from)"}[case]
    if case == "missing data":
        args[3] = str(tmp_path / "none.txt")
    elif case == "unknown preset":
        args[1] = "huge"
    elif case == "seq-len beyond the context":
        args += ["--seq-len", "100000"]
    elif case.startswith("init-from"):
        from trillm.synth import write_preset

        bitnet = write_preset("bitnet-tiny", tmp_path / "bitnet")
        args[:2] = ["--init-from", str(bitnet)]
        if case == "init-from with a tokenizer":
            args[1] = str(tmp_path / "llama")
            args += ["--tokenizer", str(bitnet)]
    elif case == "no preset":
        args = args[2:]
    result = subprocess.run([sys.executable, "-m", "trillm.cli", "train", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def train_cli(*args, processes: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 \
        else [sys.executable]
    result = subprocess.run([*launcher, "-m", "trillm.cli", "train", *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """run(precision, processes, shard): the folder of a short `trillm train` run; the one-process runs are
    made once for the tests that compare with them."""
    data = tmp_path_factory.mktemp("gloo") / "text.txt"
    data.write_text("\n\n".join(CORPUS * 20))

    def run(precision, processes=1, shard=False):
        out = data.parent / f"{precision}-{processes}{'-shard' if shard else ''}"
        if not (out / "log.jsonl").exists():
            train_cli("--preset", "tiny", "--data", str(data), "--steps", "3", "--batch-tokens", "256", "--seq-len",
                      "32", "--micro-batch", "2", "--precision", precision, "--autocast", "none", "--out", str(out),
                      *(["--shard"] if shard else []), processes=processes)
        return out
    return run


@pytest.mark.parametrize("precision,shard", [("full", False), ("ternary", False), ("full", True)])
def test_two_processes_with_gloo_equal_one(gloo_runs, precision, shard):
    """torchrun, 2 processes on gloo (DDP, or FSDP2 with --shard), against 1 process with the same global
    batch: the same parameters (full precision: to float rounding) and the same losses (ternary: a float
    difference upstream flips an int8 rounding now and then, so the losses agree to 1e-4)."""
    runs = gloo_runs(precision), gloo_runs(precision, processes=2, shard=shard)
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()] for run in runs]
    assert len(losses[1]) == 3  # rank 0 alone logs
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6 if precision == "full" else 1e-4, atol=0)
    if precision == "full":
        one, two = (torch.load(run / "checkpoint.pt", weights_only=True)["model"] for run in runs)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


def test_a_trained_vocabulary_and_the_loss_plot(tmp_path):
    from trillm.train.data import train_tokenizer
    from trillm.train.plot import plot_runs

    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(CORPUS * 20))
    tokenizer = train_tokenizer([str(data)], 400, tmp_path / "tokenizer")
    assert tokenizer.vocab_size == 400 and tokenizer.eos_token == "<|endoftext|>"
    text = "Café naïve 日本語 def add(a, b):"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: any text
    assert train_tokenizer([], 0, tmp_path / "tokenizer").backend.to_str() == tokenizer.backend.to_str()  # kept
    out = tmp_path / "run"
    train(run_settings(tmp_path, out, 2, train_tokenizer=400), progress=False)
    png = plot_runs({"run": out}, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_settings_from_a_config_file(tmp_path):
    from trillm.cli import build_parser, train_settings
    from trillm.errors import TrillmError

    (tmp_path / "run.yaml").write_text("preset: tiny\ndata: [a.txt]\nsteps: 7\nlr: [0.002, 0.001]\nseq_len: 64\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--out", "o", "--steps", "9"])
    settings = train_settings(args)
    assert (settings.steps, settings.seq_len, settings.lr, settings.data) == (9, 64, (0.002, 0.001), ["a.txt"])
    assert settings.batch_tokens == TrainSettings.batch_tokens  # the dataclass's default where neither says
    for text, message in (('{"preset": "tiny", "data": "a", "stpes": 3}', "unknown settings stpes"),
                          ('{"preset": "tiny", "data": "a", "steps": "many"}', "steps: 'many' is not"),
                          ("[1, 2]", "a mapping"), ("{", "not readable")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(TrillmError, match=message):
            train_settings(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.json"), "--out", "o"]))
