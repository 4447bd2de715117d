"""`trillm bench`: prefill and decode tokens/s, peak memory and bandwidth, beside references on the same file.

Each engine runs in its own worker process (so its peak resident memory is its own) and loads the model
once; the parent then asks the workers for one measured run each in turn, so a slow spell of a shared
machine hits every engine alike (unless together they would not fit in memory: then one after another).
One warm-up run each, then medians of the repetitions.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from trillm.errors import TrillmError

# ---- Worker side: one engine, one model, one run per request ----------------------------------------

def random_prompt(vocab_size: int, length: int) -> list[int]:
    import torch

    # Like llama-bench: random ids, so no engine gets an easy prompt; fixed seed, so all get the same one.
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()


class TrillmRunner:
    """Greedy decoding through the engine's own prefill and decode steps."""

    def __init__(self, model_source: str, dtype: str, **options):
        import torch

        import trillm
        from trillm.weights import weight_bytes_per_token

        self.torch = torch
        self.model = trillm.load(model_source, **options)  # head, dense, expert_activations, activations
        self.vocab_size = self.model.config.vocab_size
        self.weight_bytes = weight_bytes_per_token(self.model.network)

    def run(self, prompt: list[int], n_gen: int) -> tuple[float, float]:
        from trillm.engine import GREEDY, Session, decode_one_token, prefill, sample_next

        torch, network = self.torch, self.model.network
        no_history = torch.tensor([], dtype=torch.long)
        with torch.inference_mode():
            session = Session(network.new_cache(1, len(prompt) + n_gen + 1))
            start = time.perf_counter()
            token = sample_next(prefill(network, session, prompt), GREEDY, None, no_history)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(n_gen):
                token = sample_next(decode_one_token(network, session, token), GREEDY, None, no_history)
            decode_s = time.perf_counter() - start
        return prefill_s, decode_s


class TransformersRunner:
    def __init__(self, model_source: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        from trillm.checkpoint import resolve_source

        self.torch = torch
        path = resolve_source(model_source)
        options = {"gguf_file": path.name} if path.is_file() else {}
        folder = path.parent if path.is_file() else path
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **options).eval()
        self.model.to(getattr(torch, dtype))  # BitNet keeps its unpacked weights and norms in bf16 otherwise
        self.vocab_size = self.model.config.vocab_size
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, prompt: list[int], n_gen: int) -> tuple[float, float]:
        torch, model = self.torch, self.model
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - start
            cache, token = out.past_key_values, out.logits[0, -1].argmax()
            start = time.perf_counter()
            for _ in range(n_gen):
                out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[0, -1].argmax()
            decode = time.perf_counter() - start
        return prefill, decode


def gguf_bytes_per_token(path) -> int:
    """The bytes of a GGUF file's tensors that a decode step reads, counted as trillm counts its own: every
    matrix once, a mixture's expert banks (`*_exps`) for the experts a token is routed to only, and the token
    embedding not at all when an output head of its own is there (one row of it is read)."""
    import math

    from trillm.checkpoint.gguf_file import GGUFCheckpoint, row_bytes

    checkpoint = GGUFCheckpoint(path)
    architecture = checkpoint.metadata.get("general.architecture")
    routed = (checkpoint.metadata.get(f"{architecture}.expert_used_count", 1)
              / checkpoint.metadata.get(f"{architecture}.expert_count", 1))
    total = 0
    for name, (ggml_type, dims, _) in checkpoint.infos.items():
        if name == "token_embd.weight" and "output.weight" in checkpoint.infos:
            continue
        size = math.prod(dims[1:]) * row_bytes(ggml_type, dims)
        total += size * routed if "_exps." in name else size
    return int(total)


class LlamaCppRunner:
    def __init__(self, model_source: str, dtype: str):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise TrillmError("--compare llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
        import numpy

        from trillm.checkpoint import resolve_source

        path = resolve_source(model_source)
        if not path.is_file():
            raise TrillmError("--compare llama.cpp needs a GGUF file as the model")
        self.numpy = numpy
        threads = int(os.environ["TRILLM_BENCH_THREADS"])
        self.model = Llama(str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512,
                           logits_all=False, verbose=False)
        self.vocab_size = self.model.n_vocab()
        self.weight_bytes = gguf_bytes_per_token(path)

    def run(self, prompt: list[int], n_gen: int) -> tuple[float, float]:
        model, numpy = self.model, self.numpy
        model.reset()
        start = time.perf_counter()
        model.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_gen):
            model.eval([int(numpy.argmax(model.scores[model.n_tokens - 1]))])
        decode = time.perf_counter() - start
        return prefill, decode


def gguf_file_bytes_per_token(path) -> int:
    """gguf_bytes_per_token for a GGUF file whose tensor types trillm may not know (bitnet.cpp's I2_S): each
    tensor's bytes are taken from where the next one starts."""
    from trillm.checkpoint.gguf_file import data_start_of, read_entries

    with open(path, "rb") as file:
        # The header only: metadata (vocabulary included) and the tensor list.
        metadata, entries, header_end = read_entries(path, file.read(64 * 2**20))
    tensors = sorted((offset, name) for name, _, _, offset in entries)
    ends = [offset for offset, _ in tensors[1:]] + [os.path.getsize(path) - data_start_of(metadata, header_end)]
    names = {name for _, name in tensors}
    return sum(end - offset for (offset, name), end in zip(tensors, ends)
               if not (name == "token_embd.weight" and "output.weight" in names))


class LlamaBenchRunner:
    """A `llama-bench` binary (llama.cpp's, or bitnet.cpp's on its own I2_S file), one process a run, each
    with llama-bench's two tests of one repetition: prompt processing of random tokens, then generation,
    which starts from an empty context (trillm's and llama-cpp-python's decode after the prompt)."""

    def __init__(self, binary: str, gguf: str):
        self.command = [binary, "-m", gguf, "-t", os.environ["TRILLM_BENCH_THREADS"], "-r", "1", "-o", "json"]
        self.vocab_size = 4  # unused: llama-bench draws its own prompt
        self.weight_bytes = gguf_file_bytes_per_token(gguf)

    def run(self, prompt: list[int], n_gen: int) -> tuple[float, float]:
        command = [*self.command, "-p", str(len(prompt)), "-n", str(n_gen)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise TrillmError(f"{command[0]} failed (exit code {done.returncode}): {last}")
        try:
            tests = json.loads(done.stdout)
            prefill = next(test for test in tests if test["n_gen"] == 0)["avg_ns"] / 1e9
            decode = next(test for test in tests if test["n_prompt"] == 0)["avg_ns"] / 1e9
        except (ValueError, TypeError, KeyError, StopIteration):
            raise TrillmError(f"{command[0]}: its output is not llama-bench's JSON of a prompt and a generation "
                              f"test") from None
        return prefill, decode

    @staticmethod
    def peak_rss_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest run's


RUNNERS = {"trillm": TrillmRunner, "transformers": TransformersRunner, "llama.cpp": LlamaCppRunner}


def worker_main(engine: str, model_source: str, dtype: str, options: dict, n_prompt: int, n_gen: int):
    """Load, report ready, then answer each `run` line with one measured run as JSON."""
    import torch

    threads = int(os.environ["TRILLM_BENCH_THREADS"])
    torch.set_num_threads(threads)
    if engine == "trillm":
        from trillm.native.build import set_num_threads

        set_num_threads(threads)

    def start():
        if options.get("binary"):
            runner = LlamaBenchRunner(options["binary"], options["gguf"])
        else:
            runner = RUNNERS[engine](model_source, dtype, **(options if engine == "trillm" else {}))
        prompt = random_prompt(runner.vocab_size, n_prompt)

        def run() -> dict:
            prefill, decode = runner.run(prompt, n_gen)
            return {"prefill_s": prefill, "decode_s": decode}
        return {"weight_bytes": runner.weight_bytes}, run, getattr(runner, "peak_rss_bytes", None)

    serve_runs(engine, start)


def serve_runs(engine: str, start):
    """A worker's side of the conversation: `start()` loads and gives (the ready message's fields, one
    measured run as a dict, the peak RSS or None for this process's own); then each `run` line gets one run
    as JSON, and the end of input the peak. An error is one JSON line, which the parent reports."""
    try:
        ready, run, peak = start()
        print(json.dumps({"ready": True, **ready}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            print(json.dumps(run()), flush=True)
    except Exception as error:  # reported by the parent as one line
        print(json.dumps({"error": f"{engine}: {error}"}), flush=True)
        return
    # Linux reports kilobytes
    print(json.dumps({"peak_rss_bytes": peak() if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
          flush=True)


# ---- Parent side ------------------------------------------------------------------------------------

class Worker:
    """One worker process (`python -m trillm.bench ARGUMENTS`), started with this many threads; `ready` holds
    the fields of its ready message, `runs` the runs asked of it."""

    def __init__(self, label: str, arguments: list[str], threads: int, keep_omp_wait_policy: bool = False):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), TRILLM_BENCH_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
        if keep_omp_wait_policy:
            del env["OMP_WAIT_POLICY"]
            env["TRILLM_KEEP_OMP_WAIT_POLICY"] = "1"  # or importing trillm (the worker) would set it again
        self.engine = label
        self.process = subprocess.Popen([sys.executable, "-m", "trillm.bench", *arguments], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True)
        self.ready = self.receive()
        self.runs = []

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise TrillmError(f"the {self.engine} benchmark worker failed (exit code {self.process.returncode})")
        message = json.loads(line)
        if "error" in message:
            raise TrillmError(message["error"])
        return message

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.receive()

    def finish(self) -> int:
        self.process.stdin.close()
        peak = self.receive()["peak_rss_bytes"]
        self.process.wait()
        return peak


def engine_worker(label: str, args, threads: int, engine: str, binary: str | None, gguf: str | None) -> Worker:
    arguments = [engine, args.model or "", args.reference_dtype,
                 json.dumps({"binary": binary, "gguf": gguf} if binary else
                            {"head": args.head, "dense": args.dense, "expert_activations": args.expert_activations,
                             "activations": args.activations}),
                 str(args.n_prompt), str(args.n_gen)]
    # llama.cpp synchronises its OpenMP threads after every op: sleeping waiters cost it 3x. Its threads spin
    # only while it runs, and the engines take turns, so its own default is fair.
    return Worker(label, arguments, threads, keep_omp_wait_policy=engine in ("llama.cpp", "bitnet.cpp"))


def take_turns(workers: list[Worker], repetitions: int):
    """One warm-up run each (caches, thread pools, lazy initialisation), then the measured runs, in turns."""
    for worker in workers:
        worker.run()
    for _ in range(repetitions):
        for worker in workers:
            worker.runs.append(worker.run())


def measure_memory_bandwidth(threads: int) -> float:
    """Bytes/s that summing a 1 GiB buffer reaches with this many threads (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def checkpoint_bytes(source) -> int:
    """The size of a model's weight files: a GGUF file, or a folder's safetensors."""
    from trillm.checkpoint import resolve_source

    path = resolve_source(source)
    return path.stat().st_size if path.is_file() else sum(file.stat().st_size for file in path.glob("*.safetensors"))


def reference_engine(args, compare: list[str]) -> tuple[str, tuple]:
    """--compare ENGINE [LLAMA_BENCH [GGUF]] as (label, (engine, binary, gguf)): transformers and
    llama-cpp-python on the model itself, or a llama-bench binary on the model's GGUF or the GGUF given
    (bitnet.cpp's needs its own I2_S file)."""
    engine, *paths = compare
    if engine not in ("transformers", "llama.cpp", "bitnet.cpp"):
        raise TrillmError(f"--compare {engine}: choose transformers, llama.cpp [LLAMA_BENCH [GGUF]] or bitnet.cpp "
                          f"LLAMA_BENCH GGUF")
    if engine == "transformers" and paths or len(paths) > 2:
        raise TrillmError(f"--compare {' '.join(compare)}: too many paths")
    if engine == "bitnet.cpp" and len(paths) != 2:
        raise TrillmError("--compare bitnet.cpp needs its llama-bench binary and its I2_S GGUF file: "
                          "--compare bitnet.cpp LLAMA_BENCH GGUF")
    if not paths:
        return engine, (engine, None, None)
    binary = paths[0]
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise TrillmError(f"--compare {engine}: {binary} is not an executable file")
    if len(paths) == 2:
        gguf = paths[1]
    else:
        from trillm.checkpoint import resolve_source

        gguf = str(resolve_source(args.model))
    if not (os.path.isfile(gguf) and gguf.endswith(".gguf")):
        raise TrillmError(f"--compare {engine}: {gguf} is not a GGUF file (llama-bench reads only those)")
    return f"{engine} ({os.path.basename(gguf)})", (engine, binary, gguf)


def run_bench(args):
    threads = args.threads or os.cpu_count()
    for name in ("n_prompt", "n_gen", "repetitions"):
        if getattr(args, name) < 1:
            raise TrillmError(f"invalid --{name.replace('_', '-')}: must be >= 1")
    from trillm.checkpoint import open_checkpoint

    open_checkpoint(args.model)  # a bad source fails here, in one line, before any worker starts
    engines = {"trillm": ("trillm", None, None)} | dict(reference_engine(args, compare) for compare in args.compare)
    # Engines that would not fit in memory side by side (gpt-oss-20b: llama.cpp keeps a second copy of its
    # experts) run one after another; else they take turns, run by run.
    sequential = len(engines) * checkpoint_bytes(args.model) > 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results = {}
    for group in ([[label] for label in engines] if sequential else [list(engines)]):
        workers = [engine_worker(label, args, threads, *engines[label]) for label in group]
        take_turns(workers, args.repetitions)
        for worker in workers:
            prefill = statistics.median(run["prefill_s"] for run in worker.runs)
            decode = statistics.median(run["decode_s"] for run in worker.runs)
            results[worker.engine] = {
                "prefill_tokens_per_s": args.n_prompt / prefill,
                "decode_tokens_per_s": args.n_gen / decode,
                "peak_rss_mb": worker.finish() / 2**20,
                "weights_mb_per_token": worker.ready["weight_bytes"] / 2**20,
                "implied_gb_per_s": worker.ready["weight_bytes"] * args.n_gen / decode / 1e9,
            }
    bandwidth = measure_memory_bandwidth(threads)
    from trillm.native.build import chosen_level

    report = {"model": args.model or "default (SmolLM2-135M-Instruct Q4_1)", "threads": threads,
              "native_kernels": chosen_level() or "none (PyTorch reference twins)",
              "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repetitions": args.repetitions,
              "machine_bandwidth_gb_per_s": bandwidth / 1e9, "sequential": sequential, "engines": results}
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def format_report(report: dict) -> str:
    engines = report["engines"]
    width = max(14, *(len(engine) + 2 for engine in engines))
    lines = [
        f"model: {report['model']}",
        f"threads: {report['threads']}  trillm's kernels: {report['native_kernels']}  prompt: {report['n_prompt']} "
        f"tokens  generate: {report['n_gen']} tokens  medians of {report['repetitions']} runs after a warm-up",
        "",
        f"{'engine':<{width}}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}"
        f"{'weights MB/token':>18}{'implied GB/s':>14}",
    ]
    for engine, r in engines.items():
        lines.append(f"{engine:<{width}}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}"
                     f"{r['peak_rss_mb']:>13.0f}{r['weights_mb_per_token']:>18.1f}{r['implied_gb_per_s']:>14.2f}")
    if report["sequential"]:
        lines.append("(the engines ran one after another: side by side they would not fit in this machine's memory)")
    ours = engines["trillm"]
    for engine, r in engines.items():
        if engine != "trillm":
            lines.append(f"trillm vs {engine}: prefill {ours['prefill_tokens_per_s'] / r['prefill_tokens_per_s']:.2f}x, "
                         f"decode {ours['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x")
    share = ours["implied_gb_per_s"] / report["machine_bandwidth_gb_per_s"]
    lines.append(f"machine memory bandwidth ({report['threads']} threads, measured): "
                 f"{report['machine_bandwidth_gb_per_s']:.1f} GB/s; trillm decode reads weights at {share:.0%} of it")
    return "\n".join(lines)


# ---- Training: `trillm bench --train PRESET` ---------------------------------------------------------------
#
# One optimizer step (forward, backward, AdamW) a run on a batch of random tokens of the default vocabulary,
# in three workers: trillm's BitNet (BitLinears: the quantizers' cost is the point), the same architecture in
# full precision (the quantization overhead is the ratio of the two), and transformers' LlamaForCausalLM of
# the same sizes, plain PyTorch training that nobody here wrote.

TRAIN_ENGINES = ("trillm BitNet (ternary)", "trillm full precision", "transformers LLaMA")


class TrainStepRunner:
    def __init__(self, engine: str, preset: str, seq_len: int, micro_batch: int, autocast: bool):
        import torch

        import trillm
        from trillm.train.recipe import BitNetModel, preset_shape

        vocab_size = trillm.load(None).tokenizer.vocab_size
        shape = preset_shape(preset, vocab_size)
        torch.manual_seed(0)
        if engine == "transformers LLaMA":
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size,
                                 intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                                 num_attention_heads=shape.num_attention_heads,
                                 num_key_value_heads=shape.num_key_value_heads, tie_word_embeddings=True,
                                 max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta)
            model = LlamaForCausalLM(config)
            self.logits = lambda ids: model(ids).logits
        else:
            model = BitNetModel(shape, ternary=engine == TRAIN_ENGINES[0])
            self.logits = model
        self.torch, self.model, self.autocast = torch, model.train(), autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        self.batch = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
        self.parameters = sum(p.numel() for p in model.parameters())

    def run(self) -> float:
        torch = self.torch
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
            logits = self.logits(self.batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.batch[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def train_worker_main(engine: str, preset: str, seq_len: int, micro_batch: int, autocast: bool):
    import torch

    torch.set_num_threads(int(os.environ["TRILLM_BENCH_THREADS"]))

    def start():
        runner = TrainStepRunner(engine, preset, seq_len, micro_batch, autocast)
        return {"parameters": runner.parameters}, lambda: {"step_s": runner.run()}, None

    serve_runs(engine, start)


def run_train_bench(args):
    """Training steps a second of the three TRAIN_ENGINES, taking turns, medians of the repetitions."""
    from trillm.train.loop import native_bf16
    from trillm.train.recipe import PRESETS

    if args.train not in PRESETS:
        raise TrillmError(f"unknown preset {args.train!r} (choose from {', '.join(PRESETS)})")
    for name in ("seq_len", "micro_batch", "repetitions"):
        if getattr(args, name) < 1:
            raise TrillmError(f"invalid --{name.replace('_', '-')}: must be >= 1")
    if args.autocast is None:  # as `trillm train --autocast auto` decides
        args.autocast = native_bf16()
    threads = args.threads or os.cpu_count()
    arguments = [args.train, str(args.seq_len), str(args.micro_batch), "1" if args.autocast else "0"]
    workers = [Worker(engine, ["train", engine, *arguments], threads) for engine in TRAIN_ENGINES]
    take_turns(workers, args.repetitions)
    tokens = args.seq_len * args.micro_batch
    results = {worker.engine: {"tokens_per_s": tokens / statistics.median(run["step_s"] for run in worker.runs),
                               "parameters": worker.ready["parameters"], "peak_rss_mb": worker.finish() / 2**20}
               for worker in workers}
    report = {"preset": args.train, "threads": threads, "tokens_per_step": tokens, "seq_len": args.seq_len,
              "bf16_autocast": args.autocast, "repetitions": args.repetitions, "engines": results,
              "quantization_overhead": results[TRAIN_ENGINES[1]]["tokens_per_s"] / results[TRAIN_ENGINES[0]]["tokens_per_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    width = max(len(engine) for engine in results) + 2
    print(f"training preset {args.train}: {threads} threads, {args.micro_batch} x {args.seq_len} tokens a step, "
          f"bf16 autocast {'on' if args.autocast else 'off'}, medians of {args.repetitions} steps after a warm-up\n")
    print(f"{'engine':<{width}}{'parameters':>12}{'tokens/s':>10}{'peak RSS MB':>13}")
    for engine, r in results.items():
        print(f"{engine:<{width}}{r['parameters'] / 1e6:>11.1f}M{r['tokens_per_s']:>10.0f}{r['peak_rss_mb']:>13.0f}")
    print(f"quantization overhead (full precision / ternary step time): {report['quantization_overhead']:.2f}x")


# ---- Serving: `trillm bench --serve N` ---------------------------------------------------------------------
#
# `trillm serve` in its own process, then streaming clients over loopback HTTP: one alone (batch-1 decode),
# then N at once (continuous batching). Each asks for -n tokens (ignore_eos) after its own random prompt of
# -p tokens, so that no slot reuses another's prefix.

def stream_completion(port: int, prompt: list[int], n_gen: int) -> dict:
    """One streamed /v1/completions request: when it was sent, when each text event came, when it ended."""
    import http.client

    body = json.dumps({"prompt": prompt, "max_tokens": n_gen, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise TrillmError(f"the server answered {response.status}: {response.read().decode()[:200]}")
    events, tokens = [], 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["text"]:
            events.append(time.perf_counter())
    connection.close()
    # Without a usage chunk (a server that sends none), ignore_eos made it n_gen tokens.
    return {"sent": sent, "events": events, "ended": time.perf_counter(), "tokens": tokens or n_gen}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def serve_round(port: int, clients: int, n_prompt: int, n_gen: int, vocab_size: int, round_index: int) -> dict:
    """`clients` streams at once; their aggregate tokens/s and latencies (ms)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [random_prompt(vocab_size, n_prompt + 1 + round_index * clients + k)[-n_prompt:] for k in range(clients)]
    begun = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        streams = list(pool.map(lambda prompt: stream_completion(port, prompt, n_gen), prompts))
    wall = max(s["ended"] for s in streams) - begun
    gaps = [(b - a) * 1e3 for s in streams for a, b in zip(s["events"], s["events"][1:])]
    decode = [(len(s["events"]) - 1) / (s["events"][-1] - s["events"][0]) for s in streams if len(s["events"]) > 1]
    return {"tokens_per_s": sum(s["tokens"] for s in streams) / wall,
            "stream_decode_tokens_per_s": statistics.median(decode),
            "first_token_ms": [(s["events"][0] - s["sent"]) * 1e3 for s in streams if s["events"]],
            "gap_ms": gaps, "latency_ms": [(s["ended"] - s["sent"]) * 1e3 for s in streams]}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(name: str, command: list[str], port: int) -> tuple[subprocess.Popen, dict]:
    """A server process, once its /v1/models answers; (the process, its first model's entry). Its stderr
    goes to a file: a pipe nobody reads would fill and stall a server that logs every request. llama-server
    runs without the OMP_WAIT_POLICY=PASSIVE that importing trillm set here: ggml's OpenMP threads wait
    between the ops of a graph by spinning, and asleep it decodes 3x slower (as Worker does for llama.cpp)."""
    import tempfile
    import urllib.request

    log = tempfile.TemporaryFile(mode="w+")
    env = {key: value for key, value in os.environ.items() if name == "trillm serve" or key != "OMP_WAIT_POLICY"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, text=True)
    while True:
        if server.poll() is not None:
            log.seek(0)
            last = (log.read().strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise TrillmError(f"{name} exited: {last}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
                return server, json.load(response)["data"][0]
        except OSError:  # not listening yet, or 503 while it loads
            time.sleep(0.2)


def peak_rss(process: subprocess.Popen) -> int:
    with open(f"/proc/{process.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def serve_commands(args, clients: int, threads: int) -> dict[str, tuple[list[str], int]]:
    """Each server to measure: its command line and port. trillm serve, and llama.cpp's llama-server (with
    `--compare llama-server BINARY`) on the same GGUF with as many slots of as much context."""
    port = free_port()
    options = [("-m", args.model), ("-c", args.ctx_size), ("--head", args.head), ("--dense", args.dense),
               ("--expert-activations", args.expert_activations), ("--activations", args.activations)]
    servers = {"trillm serve": ([sys.executable, "-m", "trillm.cli", "serve", "--port", str(port), "--parallel",
                                 str(clients), "-t", str(threads)]
                                + [part for flag, value in options if value is not None for part in (flag, str(value))],
                                port)}
    for compare in args.compare:
        if compare[0] != "llama-server" or len(compare) != 2:
            raise TrillmError("with --serve, --compare takes llama-server BINARY (llama.cpp's server)")
        from trillm.checkpoint import resolve_source

        gguf = str(resolve_source(args.model))
        if not gguf.endswith(".gguf"):
            raise TrillmError(f"--compare llama-server: {gguf} is not a GGUF file (llama-server reads only those)")
        port = free_port()
        slot_context = args.ctx_size or args.n_prompt + args.n_gen + 64
        servers["llama-server"] = ([compare[1], "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np",
                                    str(clients), "-c", str(slot_context * clients), "-t", str(threads),
                                    "--no-webui"], port)
    return servers


def run_serve_bench(args):
    clients, threads = args.serve, args.threads or os.cpu_count()
    for name in ("n_prompt", "n_gen", "repetitions", "serve"):
        if getattr(args, name) < 1:
            raise TrillmError(f"invalid --{name.replace('_', '-')}: must be >= 1")
    commands = serve_commands(args, clients, threads)
    servers = {}
    try:
        for name, (command, port) in commands.items():
            servers[name] = start_server(name, command, port)
        vocab_size = servers["trillm serve"][1]["meta"]["vocab_size"]
        for name, (command, port) in commands.items():
            serve_round(port, 1, args.n_prompt, min(args.n_gen, 8), vocab_size, 10**6)  # warm-up
        results = {name: {} for name in commands}
        for label, count in (("1 client", 1), (f"{clients} clients", clients)):
            rounds = {name: [] for name in commands}
            for r in range(args.repetitions):  # the servers take turns, round by round
                for name, (command, port) in commands.items():
                    rounds[name].append(serve_round(port, count, args.n_prompt, args.n_gen, vocab_size, r))
            for name, done in rounds.items():
                merged = {key: [v for r in done for v in r[key]] for key in ("first_token_ms", "gap_ms", "latency_ms")}
                results[name][label] = {
                    "clients": count,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in done),
                    "stream_decode_tokens_per_s": statistics.median(r["stream_decode_tokens_per_s"] for r in done),
                    **{f"{key}_p{p}": percentile(values, p / 100) for key, values in merged.items() for p in (50, 90, 99)}}
        peaks = {name: peak_rss(process) / 2**20 for name, (process, _) in servers.items()}
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(10)
    report = {"model": args.model or "default (SmolLM2-135M-Instruct Q4_1)", "threads": threads, "parallel": clients,
              "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repetitions": args.repetitions,
              "peak_rss_mb": peaks, "runs": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"model: {report['model']}\n--parallel {clients} slots, {threads} threads; each client streams {args.n_gen} "
          f"tokens after its own {args.n_prompt}-token prompt; medians of {args.repetitions} rounds, the servers "
          f"taking turns (latency percentiles over all of them)\n")
    print(f"{'server':<14}{'clients':<12}{'total tok/s':>12}{'tok/s a stream':>16}{'first token ms p50/p90/p99':>29}"
          f"{'between tokens ms p50/p90/p99':>32}{'peak RSS MB':>13}")
    for name, runs in results.items():
        for label, r in runs.items():
            triple = lambda key: "/".join(f"{r[f'{key}_p{p}']:.0f}" for p in (50, 90, 99))
            print(f"{name:<14}{label:<12}{r['tokens_per_s']:>12.1f}{r['stream_decode_tokens_per_s']:>16.1f}"
                  f"{triple('first_token_ms'):>29}{triple('gap_ms'):>32}{peaks[name]:>13.0f}")
    together = f"{clients} clients"
    ours = results["trillm serve"]
    print(f"trillm serve, batched: {ours[together]['tokens_per_s'] / ours['1 client']['tokens_per_s']:.2f}x the "
          f"tokens/s of one client")
    if "llama-server" in results:
        theirs = results["llama-server"]
        print(f"trillm serve vs llama-server: " + ", ".join(
            f"{label} {ours[label]['tokens_per_s'] / theirs[label]['tokens_per_s']:.2f}x" for label in ours))

if __name__ == "__main__":
    if sys.argv[1] == "train":
        engine, preset, seq_len, micro_batch, autocast = sys.argv[2:7]
        train_worker_main(engine, preset, int(seq_len), int(micro_batch), autocast == "1")
    else:
        engine, model_source, dtype, options, n_prompt, n_gen = sys.argv[1:7]
        worker_main(engine, model_source or None, dtype, json.loads(options), int(n_prompt), int(n_gen))
