"""The `trillm` command on the default model: each subcommand does what its help says."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def trillm(*args, stdin=""):
    result = subprocess.run([sys.executable, "-m", "trillm.cli", *args], capture_output=True, text=True,
                            input=stdin, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tokenize_marks_special_tokens():
    lines = trillm("tokenize", "<|im_start|>user\nHello, world!").splitlines()
    assert lines[0].split() == ["1", "->", "'<|im_start|>'", "(special)"]
    pieces = [line.split("->")[1].strip() for line in lines]
    assert "'user'" in pieces and "'Hello'" in pieces
    assert all("(special)" not in line for line in lines[1:])


def test_tokenize_shows_the_text_each_token_stands_for():
    lines = trillm("tokenize", "--no-bos", "Hello wörld 你").splitlines()
    assert [line.split(" -> ")[1] for line in lines] == ["'Hello'", "'␣w'", "'ör'", "'ld'", "'␣'", "<0xE4><0xBD>",
                                                        "<0xA0>"]
    raw = trillm("tokenize", "--no-bos", "--raw", "Hello wörld").splitlines()
    assert raw[1].split(" -> ")[1] == "'␣w'  'Ġw'"
    tokens = json.loads(trillm("tokenize", "--json", "<|im_start|>Hello wörld"))
    assert tokens[0] == {"id": 1, "text": "'<|im_start|>'", "bytes": None, "piece": "<|im_start|>", "special": True}
    assert bytes.fromhex(tokens[3]["bytes"]).decode() == "ör" and tokens[3]["piece"] == "Ã¶r"


def test_generate_prints_only_the_continuation():
    out = trillm("generate", "--raw", "-p", "The capital of France is", "-n", "3", "--temperature", "0")
    assert out.strip().startswith("Paris")


def test_chat_reads_one_message_from_a_pipe():
    out = trillm("chat", "-n", "16", "--temperature", "0", "--system", "You answer in one word.",
                 stdin="What color is the sky on a clear day?\n")
    assert "blue" in out.lower()


def test_stop_string_ends_generation():
    out = trillm("generate", "--raw", "-p", "1, 2, 3, 4, 5,", "-n", "20", "--temperature", "0", "--stop", "8")
    assert "8" not in out and "7" in out


def test_bench_json_reports_speeds():
    report = json.loads(trillm("bench", "-p", "16", "-n", "4", "-r", "1", "-t", "2", "--json"))
    ours = report["engines"]["trillm"]
    assert ours["prefill_tokens_per_s"] > 0 and ours["decode_tokens_per_s"] > 0
    assert 50 < ours["weights_mb_per_token"] < 150  # Q4_1 projections + Q8_0 head, about 96 MB
    assert ours["peak_rss_mb"] > 0
    assert report["sequential"] is False  # 98 MB: the engines take turns run by run


def test_bench_train_reports_training_speeds():
    report = json.loads(trillm("bench", "--train", "tiny", "-r", "1", "-t", "2", "--seq-len", "16", "--micro-batch",
                               "1", "--no-autocast", "--json"))
    engines = report["engines"]
    assert list(engines) == ["trillm BitNet (ternary)", "trillm full precision", "transformers LLaMA"]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in engines.values())
    # the same sizes: BitNet has two sub norms a layer more than LLaMA (4 layers of 256 + 704 channels)
    assert engines["trillm BitNet (ternary)"]["parameters"] - engines["transformers LLaMA"]["parameters"] == 4 * (256 + 704)
    assert report["quantization_overhead"] > 0 and report["bf16_autocast"] is False


def test_bench_runs_engines_one_after_another_when_they_would_not_fit(monkeypatch, capsys):
    from trillm import bench
    from trillm.cli import build_parser

    assert bench.checkpoint_bytes(None) > 90e6  # the default model's file
    monkeypatch.setattr(bench, "checkpoint_bytes", lambda source: 10**15)
    bench.run_bench(build_parser().parse_args(["bench", "-p", "4", "-n", "2", "-r", "1", "-t", "1",
                                               "--compare", "transformers", "--json"]))
    report = json.loads(capsys.readouterr().out)
    assert report["sequential"] is True and set(report["engines"]) == {"trillm", "transformers"}


FAKE_LLAMA_SERVER = """#!{python}
# Stands in for llama.cpp's llama-server: checks the arguments trillm passes, then serves with trillm serve.
import sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert value("-m").endswith(".gguf") and value("--host") == "127.0.0.1" and "--no-webui" in args, args
assert int(value("-c")) == int(value("-np")) * (8 + 4 + 64), args  # each slot: prompt, reply and room
from trillm.cli import main
sys.exit(main(["serve", "-m", value("-m"), "--port", value("--port"), "--parallel", value("-np"), "-t", value("-t")]))
"""


def test_bench_serve_reports_one_client_and_many_beside_llama_server(tmp_path, capsys):
    """trillm serve under 1 and then N streaming clients, a llama-server (a stand-in that answers as one)
    taking turns with it on the same GGUF."""
    from trillm import bench
    from trillm.cli import build_parser
    from trillm.errors import TrillmError

    binary = tmp_path / "llama-server"
    binary.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable))
    binary.chmod(0o755)
    bench.run_serve_bench(build_parser().parse_args(["bench", "--serve", "2", "-p", "8", "-n", "4", "-r", "1", "-t",
                                                     "1", "--json", "--compare", "llama-server", str(binary)]))
    report = json.loads(capsys.readouterr().out)
    assert set(report["runs"]) == {"trillm serve", "llama-server"} and report["parallel"] == 2
    for runs in report["runs"].values():
        assert set(runs) == {"1 client", "2 clients"}
        assert all(r["tokens_per_s"] > 0 and r["first_token_ms_p50"] > 0 for r in runs.values())
    assert all(peak > 0 for peak in report["peak_rss_mb"].values())
    with pytest.raises(TrillmError, match="--compare takes llama-server BINARY"):
        bench.run_serve_bench(build_parser().parse_args(["bench", "--serve", "2", "--compare", "transformers"]))


def test_model_commands_take_every_head_format():
    from trillm.cli import build_parser
    from trillm.weights.head import HEAD_FORMATS

    for command in (["generate", "-p", "x"], ["chat"], ["bench"]):
        for head in HEAD_FORMATS:
            assert build_parser().parse_args([*command, "--head", head]).head == head


FAKE_LLAMA_BENCH = """#!{python}
# Answers as llama-bench -o json does (the fields trillm reads), after checking the arguments trillm passes.
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert value("-o") == "json" and value("-r") == "1" and value("-t") == "1", args
open({log!r}, "a").write(" ".join(args) + "\\n")
tests = [dict(model_filename=value("-m"), n_prompt=int(value("-p")), n_gen=0, avg_ns=int(value("-p")) * 10**7),
         dict(model_filename=value("-m"), n_prompt=0, n_gen=int(value("-n")), avg_ns=int(value("-n")) * 2 * 10**7)]
print(json.dumps(tests, indent=2))
"""


def test_bench_runs_a_llama_bench_binary(tmp_path, capsys):
    """A llama-bench binary (here a stand-in that answers as one) runs once a repetition on the GGUF given,
    its 100 and 50 tok/s reported as its own; a missing or bad one is one clear line."""
    from trillm import bench
    from trillm.checkpoint import resolve_source
    from trillm.cli import build_parser
    from trillm.errors import TrillmError

    binary, log = tmp_path / "llama-bench", tmp_path / "calls.log"
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log)))
    binary.chmod(0o755)
    gguf = str(resolve_source(None))
    bench.run_bench(build_parser().parse_args(["bench", "-p", "4", "-n", "2", "-r", "2", "-t", "1", "--json",
                                               "--compare", "bitnet.cpp", str(binary), gguf]))
    report = json.loads(capsys.readouterr().out)
    theirs = report["engines"][f"bitnet.cpp ({resolve_source(None).name})"]
    assert theirs["prefill_tokens_per_s"] == pytest.approx(100) and theirs["decode_tokens_per_s"] == pytest.approx(50)
    assert log.read_text().splitlines() == [f"-m {gguf} -t 1 -r 1 -o json -p 4 -n 2"] * 3  # warm-up and 2 runs
    # Its bytes per token from the spans between tensors: trillm's count of the same file, plus the padding
    # to the file's 32-byte alignment.
    exact = bench.gguf_bytes_per_token(gguf)
    assert 0 <= bench.gguf_file_bytes_per_token(gguf) - exact < 32 * 300
    assert theirs["weights_mb_per_token"] == pytest.approx(bench.gguf_file_bytes_per_token(gguf) / 2**20)
    for compare, message in ((["bitnet.cpp", str(binary)], "needs its llama-bench binary and its I2_S GGUF"),
                             (["llama.cpp", str(tmp_path / "none")], "is not an executable file"),
                             (["llama.cpp", str(binary), str(log)], "is not a GGUF file"),
                             (["vllm"], "choose transformers")):
        with pytest.raises(TrillmError, match=message):
            bench.run_bench(build_parser().parse_args(["bench", "-r", "1", "--compare", *compare]))
