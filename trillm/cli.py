"""The `trillm` command, in llama.cpp's spirit: generate, chat, tokenize, bench, synth.

Every error a user can cause is printed as one line on stderr with a non-zero exit, no traceback; an
error of trillm's own says it is a bug (set TRILLM_DEBUG=1 to see the traceback). Nothing heavy is imported
before main() runs, so that Ctrl-C during the imports is one line too.
"""

import argparse
import math
import os
import re
import socket
import sys
import typing
from pathlib import Path

from trillm.errors import TrillmError

MAX_THREADS = 256  # the kernels' pool has at most 255 workers beside the caller


def add_model_arguments(parser: argparse.ArgumentParser):
    from trillm.models.gpt_oss import EXPERT_ACTIVATIONS
    from trillm.models.llama import ACTIVATIONS
    from trillm.weights.head import DENSE_FORMATS, HEAD_FORMATS

    parser.add_argument("-m", "--model", default=None,
                        help="model folder, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("-c", "--ctx-size", type=int, default=None,
                        help="context length in tokens (default, or 0: the model's own)")
    parser.add_argument("--head", default=None, choices=HEAD_FORMATS,
                        help="output head in memory: bf16 (exact), q8_0 (47%% fewer bytes a token) or q6_k "
                             "(59%% fewer, int8 activations) (default: as stored; q6_k for BitNet)")
    parser.add_argument("--activations", default=None, choices=ACTIVATIONS,
                        help="LLaMA: int8 quantizes each matmul's activations per 32 as llama.cpp does (GGUF "
                             "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K weights): faster decoding, logits no "
                             "longer exactly transformers' (default: float32, exact)")
    parser.add_argument("--dense", default=None, choices=DENSE_FORMATS,
                        help="gpt-oss: attention and head re-stored in Q8_0, as llama.cpp's GGUF files have them "
                             "(default: as stored)")
    parser.add_argument("--expert-activations", default=None, choices=EXPERT_ACTIVATIONS,
                        help="gpt-oss: the MXFP4 experts' activations, int8 (as llama.cpp), bf16 (CPUs with "
                             "AVX512-BF16; a prompt's attention in bf16 too) or float32 (exact, slower) (default: "
                             "int8 for decoding, bf16 for prompts where the CPU has it)")


def add_sampling_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-n", "--n-predict", type=int, default=256,
                        help="maximum tokens to generate (-1: until the context is full)")
    parser.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    parser.add_argument("--min-p", type=float, default=0.05, help="0 = off")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text is generated (repeatable)")


def add_chat_arguments(parser: argparse.ArgumentParser):
    from trillm.harmony import REASONING_EFFORTS

    parser.add_argument("--reasoning-effort", default="medium", choices=REASONING_EFFORTS,
                        help="gpt-oss: how much it reasons before it answers")


def sampling_from(args):
    from trillm.engine import Sampling

    if args.n_predict < -1:
        raise TrillmError(f"invalid --n-predict {args.n_predict}: must be >= 0, or -1 for no limit")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repeat_penalty, seed=args.seed)


def set_threads(args) -> int:
    """Set the CPU threads -t asks for (torch's on this thread, and the kernels' pool); return them."""
    import torch

    from trillm.native.build import set_num_threads

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = available if args.threads is None else args.threads
    if not 1 <= threads <= MAX_THREADS:
        raise TrillmError(f"invalid --threads {threads}: must be 1 to {MAX_THREADS}")
    if threads > available:
        note(f"trillm: warning: --threads {threads} is more than the {available} CPUs this process may use")
    torch.set_num_threads(threads)
    set_num_threads(threads)
    return threads


def load_model(args):
    set_threads(args)
    return trillm_load(args)


def new_tokens(args, model) -> int:
    return model.max_context if args.n_predict == -1 else args.n_predict


def write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def note(text: str):
    """A line for the person at the terminal: on stderr, never on stdout (where the output goes)."""
    if sys.stderr is not None:
        print(printable(text), file=sys.stderr, flush=True)


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences from a file's text) written escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def valid_text(text: str, what: str) -> str:
    """Text from the command line or a terminal that is valid UTF-8 (Python keeps invalid bytes as
    surrogates, which the tokenizer rejects)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TrillmError(f"{what} is not valid UTF-8 (at character {error.start})") from None
    return text


def read_stdin(what: str) -> str:
    if sys.stdin is None:
        raise TrillmError(f"standard input is closed: there is no {what} to read")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TrillmError(f"standard input is not valid UTF-8 (at byte {error.start})") from None


def stop_strings(args) -> list[str]:
    return [valid_text(stop, "--stop") for stop in args.stop]


def command_generate(args):
    sampling = sampling_from(args)  # check the options before the (slow) load
    prompt = read_stdin("prompt") if args.prompt == "-" else valid_text(args.prompt, "the prompt")
    system = valid_text(args.system, "--system") if args.system else None
    model = load_model(args)
    if args.raw:
        source = prompt
    else:
        source = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    from trillm.engine import Session

    session = Session()
    if args.raw:
        for piece in model.stream(source, new_tokens(args, model), sampling, stop_strings(args), session):
            write(piece)
    else:
        print_reply(model, source, args, sampling, session, show_reasoning=args.show_reasoning)
    write("\n")
    if session.finish_reason == "context":
        note(f"trillm: the context of {model.max_context} tokens is full: generation stopped there")


DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def print_reply(model, messages: list[dict], args, sampling, session, show_reasoning: bool,
                answer: list[str] | None = None):
    """Write a chat reply as it streams, its answer's pieces also appended to `answer` (so that what was
    written is kept if Ctrl-C stops it). gpt-oss's reasoning (harmony's analysis channel) is written first if
    asked for, dimmed on a terminal; --stop applies to the answer."""
    from trillm.engine.stopping import cut_at_stop

    dim = show_reasoning and sys.stdout.isatty()
    reasoned = False

    def answer_pieces():
        nonlocal reasoned
        pieces = model.stream_messages(messages, new_tokens(args, model), sampling, session, args.reasoning_effort)
        try:
            for channel, text in pieces:
                if channel == "final":
                    if reasoned:
                        write(PLAIN + "\n" if dim else "\n")
                        reasoned = False
                    yield text
                elif show_reasoning:
                    write(DIM + text if dim and not reasoned else text)
                    reasoned = True
        finally:
            pieces.close()
            if reasoned and dim:
                write(PLAIN)

    for piece in cut_at_stop(answer_pieces(), stop_strings(args)):
        if answer is not None:
            answer.append(piece)
        write(piece)


def command_chat(args):
    from trillm.chat import Conversation
    from trillm.engine import Session

    sampling = sampling_from(args)
    conversation = Conversation(valid_text(args.system, "--system") if args.system else None)
    if sys.stdin is None:
        raise TrillmError("standard input is closed: there is no message to answer")
    model = load_model(args)
    session = Session()

    if not sys.stdin.isatty():  # one message from a pipe, one reply
        text = read_stdin("message").strip()
        if not text:
            raise TrillmError("no message on standard input")
        chat_turn(model, conversation, session, text, args, sampling)
        return
    import readline  # noqa: F401  (line editing and history for input())

    note(f"trillm chat with {model.source}: /reset clears the conversation, /exit, Ctrl-D or Ctrl-C quits; "
         f"Ctrl-C during a reply stops it")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            note("")
            return
        except UnicodeDecodeError as error:
            note(f"trillm: error: that line is not valid UTF-8 (at byte {error.start})")
            continue
        if text == "/exit":
            return
        if text == "/reset":
            conversation.reset()
            note("(conversation cleared)")
            continue
        if text:
            try:
                chat_turn(model, conversation, session, text, args, sampling)
            except TrillmError as error:  # the message is not answered; the conversation goes on
                note(f"trillm: error: {error}")


def chat_turn(model, conversation, session, text: str, args, sampling):
    """Answer one message. A conversation that outgrows the context loses its oldest messages (said on
    stderr), keeping room for a reply of up to -n tokens (at most a quarter of the context); Ctrl-C stops
    the reply and keeps what was written of it."""
    conversation.add_user(valid_text(text, "the message"))
    reserve = max(1, min(new_tokens(args, model), model.max_context // 4))

    def fits(messages: list[dict]) -> bool:
        return len(model.chat_prompt(messages, args.reasoning_effort)) + reserve <= model.max_context

    try:
        if not fits(conversation.all_messages(since=len(conversation.messages) - 1)):
            raise TrillmError(f"the message is too long for the context of {model.max_context} tokens with room "
                              f"for a reply: shorten it, or raise --ctx-size")
        dropped = conversation.drop_oldest_turns(fits)
    except TrillmError:  # a message that cannot be answered does not stay in the conversation
        conversation.messages.pop()
        raise
    if dropped:
        note(f"(the conversation outgrew the context of {model.max_context} tokens: its oldest {dropped} messages "
             f"were dropped)")
    answer = []
    try:
        print_reply(model, conversation.all_messages(), args, sampling, session, not args.hide_reasoning, answer)
        write("\n")
    except KeyboardInterrupt:
        write("\n")
        note("(reply stopped)")
    conversation.add_assistant("".join(answer))
    if session.finish_reason == "context":
        note("(the reply was cut short: the context is full; the next message drops the oldest ones, or /reset)")


def readable_piece(piece_bytes: bytes | None, piece: str) -> str:
    """A token as the text it stands for, quoted, a space shown as ␣; bytes that are part of a UTF-8
    character as <0xNN>; a special token as its name."""
    if piece_bytes is None:
        return repr(piece)
    try:
        return repr(piece_bytes.decode("utf-8").replace(" ", "␣"))
    except UnicodeDecodeError:
        return "".join(f"<0x{byte:02X}>" for byte in piece_bytes)


def command_tokenize(args):
    import json

    text = valid_text(args.text, "the text")
    model = load_model(args)
    tokenizer = model.require_tokenizer()
    tokens = []
    for token_id in tokenizer.encode(text, add_special_tokens=not args.no_bos):
        piece_bytes = tokenizer.token_bytes(token_id)
        tokens.append({"id": token_id, "text": readable_piece(piece_bytes, tokenizer.piece(token_id)),
                       "bytes": None if piece_bytes is None else piece_bytes.hex(), "piece": tokenizer.piece(token_id),
                       "special": tokenizer.is_special(token_id)})
    if args.json:
        print(json.dumps(tokens, ensure_ascii=False, indent=2))
        return
    for token in tokens:
        raw = f"  {token['piece']!r}" if args.raw else ""
        mark = "  (special)" if token["special"] else ""
        print(f"{token['id']:>8} -> {token['text']}{raw}{mark}")


def command_bench(args):
    from trillm.bench import run_bench, run_serve_bench, run_train_bench

    if args.train and args.serve:
        raise TrillmError("--train and --serve are two different benchmarks: give one")
    (run_train_bench if args.train else run_serve_bench if args.serve else run_bench)(args)


def command_serve(args):
    import uvicorn

    from trillm.server.app import Server, create_app

    if args.parallel < 1 or args.queue < 0 or not 0 <= args.port <= 65535:
        raise TrillmError("invalid --parallel, --queue or --port: --parallel >= 1, --queue >= 0, --port 0 to 65535")
    threads = set_threads(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        note(f"trillm: warning: serving on {args.host} without --api-key: anyone who can reach it may use it")
    failures = []

    def failed(message: str):
        failures.append(message)
        http.should_exit = True

    server = Server(lambda: trillm_load(args), args.parallel, args.queue, args.api_key, args.alias, failed, threads)
    http = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=2))
    try:  # bound here, so that a taken port is told in one line
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((args.host, args.port))
    except OSError as error:
        raise TrillmError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    port = listening.getsockname()[1]
    note(f"trillm: serving http://{args.host}:{port}/ (the chat page; the API under /v1); the model loads "
         f"now, /health answers 200 once it is ready")
    http.run(sockets=[listening])
    if failures:
        raise TrillmError(failures[0])


def trillm_load(args):
    import trillm

    return trillm.load(args.model, ctx_size=args.ctx_size, head=args.head, dense=args.dense,
                       expert_activations=args.expert_activations, activations=args.activations)


def command_inspect(args):
    import json as json_module

    from trillm.inspect import inspect_checkpoint, module_report, render, render_modules

    if args.verify != "all" and not args.verify.isdigit():
        raise TrillmError(f"--verify takes a number of layers or 'all', not {args.verify!r}")
    if args.filter:
        try:
            re.compile(args.filter)
        except re.error as error:
            raise TrillmError(f"--filter {args.filter!r} is not a regular expression ({error})") from None
    if args.target_tps is not None and not args.target_tps > 0:
        raise TrillmError("--target-tps must be a positive number of tokens per second")
    report = inspect_checkpoint(args.model, args.verify, args.target_tps, args.filter)
    modules = module_report(args.model) if args.modules else None
    if args.json:
        print(json_module.dumps({**report, **({"modules": modules} if modules else {})}, indent=2))
    else:
        render(report)
        if modules:
            render_modules(modules)
    if report["verification_failed"]:
        failed = report["verification_failed"]
        raise TrillmError(f"{report['path']}: {len(failed)} tensors failed verification (the first: {failed[0]})")


def train_settings(args):
    """TrainSettings from --config FILE (JSON, or YAML by its suffix) and the options given, which win."""
    import dataclasses
    import json

    from trillm.train.loop import TrainSettings

    fields = {field.name: field for field in dataclasses.fields(TrainSettings)}
    values = {}
    if args.config:
        path = Path(args.config)
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text)
            else:
                values = json.loads(text)
        except OSError as error:
            raise TrillmError(f"--config {path}: {error.strerror}") from None
        except Exception as error:  # json's and yaml's errors: the file is not what it says
            raise TrillmError(f"--config {path}: not readable as {path.suffix[1:] or 'JSON'} ({error})") from None
        if not isinstance(values, dict):
            raise TrillmError(f"--config {path}: a mapping of settings is needed")
        unknown = sorted(set(values) - set(fields) - {"out"})
        if unknown:
            raise TrillmError(f"--config {path}: unknown settings {', '.join(unknown)} (known: {', '.join(fields)})")
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    values = {**values, **given, "out": args.out}
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    for name, value in values.items():
        kind = fields[name].type
        if type(None) in typing.get_args(kind):  # an optional setting: checked as its type when given
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        wrong = (kind is int and not isinstance(value, int)) or (kind is float and not number) or (
            name == "data" and not (isinstance(value, list) and all(isinstance(v, str) for v in value))) or (
            name == "lr" and value is not None and not (len(value) == 2 and all(isinstance(v, (int, float)) for v in value)))
        if wrong or isinstance(value, bool) and kind is not bool:
            raise TrillmError(f"training setting {name}: {value!r} is not a {'pair of numbers' if name == 'lr' else kind}")
    if "lr" in values and values["lr"] is not None:
        values["lr"] = tuple(values["lr"])
    if not (values.get("preset") or values.get("init_from")) or not values.get("data"):
        raise TrillmError("trillm train needs --preset (or --init-from) and --data (in --config or as options), or "
                          "--export DIR")
    return TrainSettings(**values)


def command_train(args):
    from trillm.train.export import export_model
    from trillm.train.loop import model_from_checkpoint, run_tokenizer, train

    if args.plot:
        from trillm.train.plot import plot_runs

        runs = {Path(run).name: run for run in args.plot}
        print(f"loss curves: {plot_runs(runs, Path(args.out) / 'loss.png', ' vs '.join(runs))}")
        return
    if args.export:
        model, settings = model_from_checkpoint(args.out)
        tokenizer = run_tokenizer(args.out, settings)
        print(f"exported to {export_model(model, tokenizer, args.export, args.layout)} ({args.layout} layout)")
        return
    settings = train_settings(args)
    result = train(settings)
    if result["rank"] != 0:  # under torchrun: rank 0 reports and exports
        return
    print(f"step {settings.steps}: loss {result['loss']:.4f}, validation loss {result['val_loss']:.4f} "
          f"(perplexity {math.exp(result['val_loss']):.1f})")
    from trillm.train.plot import plot_runs

    print(f"loss curves: {plot_runs({settings.precision: args.out}, Path(args.out) / 'loss.png')}")
    if settings.precision == "ternary":
        for layout in ("packed", "bf16"):
            folder = export_model(result["model"].eval(), result["tokenizer"], Path(args.out) / layout, layout)
            print(f"exported the {layout} layout to {folder}")


def command_synth(args):
    from trillm.synth import has_llama3_vocabulary, write_preset

    options = {name: value for name, value in (("gguf_embedding", args.gguf_embedding), ("dense_type", args.dense))
               if value is not None}
    out = write_preset(args.preset, args.out, layout=args.layout, seed=args.seed, force=args.force, **options)
    size = (out.stat().st_size if out.is_file() else sum(path.stat().st_size for path in out.iterdir())) / 1e6
    print(f"wrote {args.preset} ({args.layout or 'release'} layout, random weights, seed {args.seed}) to {out}: "
          f"{size:.0f} MB")
    has_tokenizer = has_llama3_vocabulary() if out.is_file() else (out / "tokenizer.json").is_file()
    if not has_tokenizer:
        reason = "" if has_llama3_vocabulary() else " (install quicktok-v1 for the real vocabularies)"
        note(f"note: no tokenizer written{reason}; only forward() on token ids works")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trillm", description="Run LLaMA, BitNet and gpt-oss models on the CPU.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a reply (or a plain continuation with --raw)")
    add_model_arguments(generate)
    generate.add_argument("-p", "--prompt", required=True, help="prompt text, or - to read standard input")
    generate.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as is")
    generate.add_argument("--system", default=None, help="system prompt (chat template only)")
    generate.add_argument("--show-reasoning", action="store_true",
                          help="gpt-oss: write its reasoning (harmony's analysis channel) before the answer")
    add_chat_arguments(generate)
    add_sampling_arguments(generate)
    generate.set_defaults(run=command_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat")
    add_model_arguments(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--hide-reasoning", action="store_true",
                      help="gpt-oss: do not show its reasoning (harmony's analysis channel), only its answers")
    add_chat_arguments(chat)
    add_sampling_arguments(chat)
    chat.set_defaults(run=command_chat)

    tokenize = commands.add_parser("tokenize", help="show the token ids and pieces of a text")
    add_model_arguments(tokenize)
    tokenize.add_argument("text")
    tokenize.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    tokenize.add_argument("--raw", action="store_true", help="also each token as the vocabulary spells it")
    tokenize.add_argument("--json", action="store_true", help="the tokens as JSON: id, text, bytes (hex), piece, "
                                                              "special")
    tokenize.set_defaults(run=command_tokenize)

    bench = commands.add_parser("bench", help="prefill and decode speed, memory, bandwidth")
    add_model_arguments(bench)
    bench.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens to prefill")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to decode")
    bench.add_argument("-r", "--repetitions", type=int, default=5, help="measured runs (medians are reported)")
    bench.add_argument("--compare", action="append", default=[], nargs="+", metavar="ENGINE [PATH]",
                       help="measure a reference in the same run: transformers or llama.cpp (llama-cpp-python) on "
                            "the same model, llama.cpp LLAMA_BENCH [GGUF] (a llama-bench binary, on the model's "
                            "GGUF or the one given), bitnet.cpp LLAMA_BENCH GGUF (bitnet.cpp's, on its I2_S file); "
                            "with --serve: llama-server BINARY (llama.cpp's server, on the model's GGUF)")
    bench.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16"],
                       help="dtype transformers computes in with --compare transformers")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--train", default=None, metavar="PRESET",
                       help="instead: training steps a second of a trillm train preset (BitNet, the same in full "
                            "precision, transformers' LLaMA of the same sizes), -r steps each")
    bench.add_argument("--serve", type=int, default=None, metavar="N",
                       help="instead: trillm serve --parallel N under N concurrent streaming clients, beside one "
                            "client alone: total tokens/s and latency percentiles")
    bench.add_argument("--seq-len", type=int, default=256, help="with --train: tokens a sequence")
    bench.add_argument("--micro-batch", type=int, default=8, help="with --train: sequences a step")
    bench.add_argument("--autocast", default=None, action=argparse.BooleanOptionalAction,
                       help="with --train: the forward in bf16 autocast (default: where the CPU has AVX512-BF16)")
    bench.set_defaults(run=command_bench)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching, and a "
                                              "chat page")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on the API")
    serve.add_argument("--parallel", "-np", type=int, default=4,
                       help="sequences generated at once, each with its own KV cache slot (default 4)")
    serve.add_argument("--queue", type=int, default=64,
                       help="requests that may wait for a slot; beyond them, 503 (default 64)")
    serve.add_argument("--alias", default=None, help="the model's id in the API (default: its file or folder name)")
    serve.set_defaults(run=command_serve)

    inspect = commands.add_parser("inspect", help="what a checkpoint holds: tensors, statistics, structure, "
                                                  "planning figures, verification of packed weights")
    inspect.add_argument("model", nargs="?", default=None, metavar="MODEL",
                         help="model folder, .gguf file or Hugging Face repo id (default: the default model)")
    inspect.add_argument("--filter", default=None, metavar="REGEX", help="list only the tensors whose name matches")
    inspect.add_argument("--verify", default="2", metavar="N|all",
                         help="layers whose packed weights are decoded and checked (default 2: the first and last)")
    inspect.add_argument("--target-tps", type=float, default=None, metavar="N",
                         help="the memory bandwidth N decoded tokens a second need")
    inspect.add_argument("--modules", action="store_true", help="also the module tree trillm builds, and its weights")
    inspect.add_argument("--json", action="store_true", help="the same as one JSON document")
    inspect.set_defaults(run=command_inspect)

    from trillm.train.recipe import PRESETS as TRAIN_PRESETS

    train_parser = commands.add_parser("train", help="train a BitNet b1.58 model (or the same one in full precision)")
    train_parser.add_argument("--preset", help=f"the model's shape and learning rates: {', '.join(TRAIN_PRESETS)}")
    train_parser.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders of them, or .jsonl")
    train_parser.add_argument("--init-from", default=None, metavar="MODEL",
                              help="start from this LLaMA checkpoint (folder or GGUF) instead of a preset: its "
                                   "projections become BitLinears, its tokenizer is kept")
    train_parser.add_argument("--blend", type=int, default=None, metavar="STEPS",
                              help="with --init-from: the steps over which the quantizers blend in, from full "
                                   "precision to ternary (default: --warmup's)")
    train_parser.add_argument("--out", required=True, help="the run's folder: checkpoint, log, exports")
    train_parser.add_argument("--steps", type=int, default=None)
    train_parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per optimizer step")
    train_parser.add_argument("--seq-len", type=int, default=None)
    train_parser.add_argument("--micro-batch", type=int, default=None, help="sequences a forward (accumulated)")
    train_parser.add_argument("--lr", type=float, nargs=2, metavar=("PEAK1", "PEAK2"),
                              help="the two stages' peak learning rates (default: the preset's)")
    train_parser.add_argument("--warmup", type=int, default=None)
    train_parser.add_argument("--val-every", type=int, default=None)
    train_parser.add_argument("--checkpoint-every", type=int, default=None)
    train_parser.add_argument("--seed", type=int, default=None)
    train_parser.add_argument("--precision", default=None, choices=["ternary", "full"],
                              help="full: the same architecture without quantization, the baseline")
    train_parser.add_argument("--tokenizer", default=None, metavar="MODEL",
                              help="the tokenizer of this model folder or GGUF (default: the default model's)")
    train_parser.add_argument("--config", default=None, metavar="FILE",
                              help="settings as JSON or YAML (the options' names with _: batch_tokens...); options "
                                   "given on the command line win")
    train_parser.add_argument("--autocast", default=None, choices=["auto", "none", "bf16"],
                              help="bf16: the forward's matmuls in bfloat16; auto (default): where the CPU has "
                                   "AVX512-BF16 or AMX")
    train_parser.add_argument("--shard", action="store_true", default=None,
                              help="under torchrun: FSDP2, each process holding a share of the parameters, gradients "
                                   "and optimizer state (default: DDP, each holding the whole model)")
    train_parser.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB_SIZE",
                              help="learn a byte-level BPE vocabulary of this size from the data instead")
    train_parser.add_argument("--export", default=None, metavar="DIR", help="only export --out's checkpoint to DIR")
    train_parser.add_argument("--layout", default="packed", choices=["packed", "bf16"], help="with --export")
    train_parser.add_argument("--plot", nargs="+", metavar="RUN", help="only plot these runs' loss curves into one "
                                                                       "PNG, OUT/loss.png")
    train_parser.set_defaults(run=command_train)

    from trillm.synth import LAYOUTS, PRESETS

    synth = commands.add_parser("synth", help="write a random-weight checkpoint in a real release's exact layout")
    synth.add_argument("preset", choices=list(PRESETS), help="the model's shape")
    synth.add_argument("out", metavar="OUT", help="folder to write (created if needed), or the .gguf file with a "
                                                  "GGUF layout")
    synth.add_argument("--layout", default=None, choices=list(LAYOUTS),
                       help="BitNet: packed (the release's uint8 ternary codes + weight_scale, the default), bf16 "
                            "(the bf16 master weights), tq2_0, tq1_0 (one GGUF file in llama.cpp's ternary types, "
                            "as its converter writes them); gpt-oss: release (MXFP4 experts, sharded, the default) "
                            "or gguf (llama.cpp's gpt-oss layout)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    synth.add_argument("--gguf-embedding", default=None, choices=["f16", "q8_0"],
                       help="BitNet's GGUF layouts: the embedding's type, also the output head llama.cpp reads "
                            "(default f16)")
    synth.add_argument("--dense", default=None, choices=["bf16", "q8_0"],
                       help="gpt-oss's GGUF layout: the type of its dense matrices (default bf16)")
    synth.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    synth.set_defaults(run=command_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("TRILLM_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
        if sys.stdout is None:
            raise TrillmError("standard output is closed: there is nowhere to write the output")
        args.run(args)
    except TrillmError as error:
        note(f"trillm: error: {error}")
        return 1
    except KeyboardInterrupt:
        note("")
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush fails no more
        return 141
    except Exception as error:  # a bug of ours still gets one line; TRILLM_DEBUG shows the traceback
        if debug:
            raise
        note(f"trillm: internal error (a bug in trillm, please report it; TRILLM_DEBUG=1 shows the traceback): "
             f"{type(error).__name__}: {error}")
        return 1
    except BaseException as error:  # a Rust panic in a library (tokenizers' PanicException) is not an Exception
        if isinstance(error, (SystemExit, GeneratorExit)) or debug:
            raise
        first_line = (str(error).splitlines() or [""])[0]
        note(f"trillm: error: a library trillm uses failed on this model's files ({type(error).__name__}: "
             f"{first_line}); they may be malformed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
