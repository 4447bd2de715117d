"""The `trillm` command, in llama.cpp's spirit: generate, chat, tokenize, bench, synth.

Every error a user can cause is printed as one line on stderr with a non-zero exit, no traceback; an
error of trillm's own says it is a bug (set TRILLM_DEBUG=1 to see the traceback).
"""

import argparse
import os
import sys

import trillm
from trillm.errors import TrillmError
from trillm.weights.head import HEAD_FORMATS


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-m", "--model", default=None,
                        help="model folder, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("-c", "--ctx-size", type=int, default=None,
                        help="context length in tokens (default: the model's own)")
    parser.add_argument("--head", default=None, choices=HEAD_FORMATS,
                        help="output head in memory: bf16 (exact), q8_0 (47%% fewer bytes a token) or q6_k "
                             "(59%% fewer, int8 activations) (default: as stored; q6_k for BitNet)")


def add_sampling_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-n", "--n-predict", type=int, default=256, help="maximum tokens to generate")
    parser.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    parser.add_argument("--min-p", type=float, default=0.05, help="0 = off")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text is generated (repeatable)")


def sampling_from(args):
    from trillm.engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repeat_penalty, seed=args.seed)


def load_model(args):
    from trillm.native.build import set_num_threads

    threads = args.threads or os.cpu_count()
    if threads < 1:
        raise TrillmError(f"invalid --threads {threads}: must be >= 1")
    import torch

    torch.set_num_threads(threads)
    set_num_threads(threads)
    return trillm.load(args.model, ctx_size=args.ctx_size, head=args.head)


def write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def command_generate(args):
    sampling = sampling_from(args)  # check the options before the (slow) load
    model = load_model(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw:
        source = prompt
    else:
        source = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
    for piece in model.stream(source, args.n_predict, sampling, args.stop):
        write(piece)
    write("\n")


def command_chat(args):
    from trillm.chat import Conversation
    from trillm.engine import Session

    sampling = sampling_from(args)
    model = load_model(args)
    session = Session()
    conversation = Conversation(args.system)

    def reply(text: str):
        conversation.add_user(text)
        pieces = []
        for piece in model.stream(conversation.all_messages(), args.n_predict, sampling, args.stop, session):
            pieces.append(piece)
            write(piece)
        write("\n")
        conversation.add_assistant("".join(pieces))

    if not sys.stdin.isatty():  # one message from a pipe, one reply
        text = sys.stdin.read().strip()
        if not text:
            raise TrillmError("no message on standard input")
        reply(text)
        return
    import readline  # noqa: F401  (line editing and history for input())

    print(f"trillm chat with {model.source}: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text == "/exit":
            return
        if text == "/reset":
            conversation.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text:
            reply(text)


def command_tokenize(args):
    model = load_model(args)
    tokenizer = model.require_tokenizer()
    for token_id in tokenizer.encode(args.text, add_special_tokens=not args.no_bos):
        mark = "  (special)" if tokenizer.is_special(token_id) else ""
        print(f"{token_id:>8} -> {tokenizer.piece(token_id)!r}{mark}")


def command_bench(args):
    from trillm.bench import run_bench

    run_bench(args)


def command_synth(args):
    from pathlib import Path

    from trillm.synth import GGUF_LAYOUTS, has_llama3_vocabulary, write_preset

    if args.layout in GGUF_LAYOUTS and Path(args.out).suffix != ".gguf":
        raise TrillmError(f"with --layout {args.layout}, OUT is the .gguf file to write, not {args.out!r}")
    out = write_preset(args.preset, args.out, layout=args.layout, seed=args.seed, gguf_embedding=args.gguf_embedding)
    size = (out.stat().st_size if out.is_file() else sum(path.stat().st_size for path in out.iterdir())) / 1e6
    print(f"wrote {args.preset} ({args.layout} layout, random weights, seed {args.seed}) to {out}: {size:.0f} MB")
    has_tokenizer = has_llama3_vocabulary() if out.is_file() else (out / "tokenizer.json").is_file()
    if not has_tokenizer:
        reason = "" if has_llama3_vocabulary() else " (install quicktok-v1 for the Llama 3 vocabulary)"
        print(f"note: no tokenizer written{reason}; only forward() on token ids works", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trillm", description="Run LLaMA, BitNet and gpt-oss models on the CPU.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a reply (or a plain continuation with --raw)")
    add_model_arguments(generate)
    generate.add_argument("-p", "--prompt", required=True, help="prompt text, or - to read standard input")
    generate.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as is")
    generate.add_argument("--system", default=None, help="system prompt (chat template only)")
    add_sampling_arguments(generate)
    generate.set_defaults(run=command_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat")
    add_model_arguments(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(chat)
    chat.set_defaults(run=command_chat)

    tokenize = commands.add_parser("tokenize", help="show the token ids and pieces of a text")
    add_model_arguments(tokenize)
    tokenize.add_argument("text")
    tokenize.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    tokenize.set_defaults(run=command_tokenize)

    bench = commands.add_parser("bench", help="prefill and decode speed, memory, bandwidth")
    add_model_arguments(bench)
    bench.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens to prefill")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to decode")
    bench.add_argument("-r", "--repetitions", type=int, default=5, help="measured runs (medians are reported)")
    bench.add_argument("--compare", action="append", default=[], choices=["transformers", "llama.cpp"],
                       help="measure a reference on the same file in the same run")
    bench.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16"],
                       help="dtype transformers computes in with --compare transformers")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(run=command_bench)

    from trillm.synth import LAYOUTS, PRESETS

    synth = commands.add_parser("synth", help="write a random-weight checkpoint in a real release's exact layout")
    synth.add_argument("preset", choices=list(PRESETS), help="the model's shape")
    synth.add_argument("out", metavar="OUT", help="folder to write (created if needed); the .gguf file with "
                                                  "--layout tq2_0 or tq1_0")
    synth.add_argument("--layout", default="packed", choices=list(LAYOUTS),
                       help="packed: the release's uint8 ternary codes + weight_scale; bf16: the bf16 master "
                            "weights; tq2_0, tq1_0: the packed weights as one GGUF file in llama.cpp's ternary "
                            "types, as its converter writes them")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    synth.add_argument("--gguf-embedding", default="f16", choices=["f16", "q8_0"],
                       help="with a GGUF layout: the embedding's type, also the output head llama.cpp reads")
    synth.set_defaults(run=command_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TrillmError as error:
        print(f"trillm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:  # a bug of ours still gets one line; TRILLM_DEBUG shows the traceback
        if os.environ.get("TRILLM_DEBUG"):
            raise
        print(f"trillm: internal error (a bug in trillm, please report it; TRILLM_DEBUG=1 shows the traceback): "
              f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
