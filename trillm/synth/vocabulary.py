"""The real Llama 3 vocabulary for synthetic checkpoints, from the quicktok package (Meta's tiktoken ranks):
as Meta's tokenizer.model, as a tokenizer.json folder, and as a GGUF file's tokenizer.ggml.* keys."""

import base64
import importlib.util
import json
import logging
import struct
import tempfile
from pathlib import Path

import gguf

LLAMA3_VOCAB_SIZE = 128256  # 128000 ranks + 256 special tokens


def has_llama3_vocabulary() -> bool:
    return importlib.util.find_spec("quicktok") is not None


def write_llama3_tokenizer(folder: Path, max_length: int, chat_template: str, bos_token: str, eos_token: str):
    """tokenizer.json (BOS added), tokenizer_config.json with the chat template and the special tokens,
    special_tokens_map.json. Built from quicktok's copy of Meta's tiktoken ranks the way trillm reads a
    Llama 3 tokenizer.model, so ids equal Meta's."""
    from trillm.tokenizer import load_tokenizer

    special_tokens = {"bos_token": bos_token, "eos_token": eos_token}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.model").write_bytes(llama3_tiktoken_file())
        (Path(scratch) / "tokenizer_config.json").write_text(json.dumps({**special_tokens, "add_bos_token": True}))
        load_tokenizer(scratch).backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {**special_tokens, "chat_template": chat_template, "clean_up_tokenization_spaces": True,
                        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": max_length,
                        "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")


# o200k_harmony, gpt-oss's vocabulary: o200k_base's ranks, then these special tokens (the rest of the
# 201088 ids the model's embedding holds are reserved and left out of the tokenizer, as in the release's).
O200K_HARMONY_SPECIAL_IDS = range(199998, 200019)
O200K_HARMONY_VOCAB_SIZE = 201088


def write_o200k_harmony_tokenizer(folder: Path, max_length: int):
    """tokenizer.json and tokenizer_config.json of gpt-oss (o200k_harmony), built from quicktok's copy of
    o200k_base's ranks and its special-token names, the way trillm turns a tiktoken encoding into BPE."""
    from trillm.tokenizer import GPT4O_SPLIT, tiktoken_backend

    names = quicktok_special_tokens("o200k_harmony")
    tiktoken_backend(quicktok_ranks("o200k"), GPT4O_SPLIT, [names[i] for i in O200K_HARMONY_SPECIAL_IDS]).save(
        str(folder / "tokenizer.json"))
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
              "model_max_length": max_length, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def quicktok_ranks(name: str) -> dict[bytes, int]:
    """The ranks of a vocabulary quicktok ships (`llama3`, `o200k`): its data/NAME.vocab is u32 count, then
    per entry u16 length, the token's bytes, u32 rank (little-endian)."""
    package = Path(importlib.util.find_spec("quicktok").submodule_search_locations[0])
    data = (package / "data" / f"{name}.vocab").read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    position, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, position)
        token = data[position + 2 : position + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, position + 2 + length)
        position += 2 + length + 4
    return ranks


def quicktok_special_tokens(name: str) -> dict[int, str]:
    """id -> name of the special tokens quicktok lists for an encoding (data/NAME.special: u32 count, then
    per entry u32 id, u16 length, UTF-8 name); the first name of an id wins."""
    package = Path(importlib.util.find_spec("quicktok").submodule_search_locations[0])
    data = (package / "data" / f"{name}.special").read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    position, names = 4, {}
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", data, position)
        names.setdefault(token_id, data[position + 6 : position + 6 + length].decode())
        position += 6 + length
    return names


def llama3_tiktoken_file() -> bytes:
    """Meta's Llama 3 tokenizer.model (`base64(token) rank` lines) from quicktok's llama3.vocab."""
    ranks = quicktok_ranks("llama3")
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in sorted(ranks.items(), key=lambda i: i[1]))


def add_gguf_vocabulary(writer: gguf.GGUFWriter, folder: Path, vocab_size: int):
    """tokenizer.ggml.* from a Llama 3 tokenizer.json, as the converter's _set_vocab_gpt2 writes them:
    byte-level pieces by id, added tokens CONTROL when special, pre-tokenizer "llama-bpe" (what its hash of
    the Llama 3 tokenizer names), then merges, BOS/EOS ids, add_bos and the chat template (gguf.SpecialVocab)."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for piece, token_id in data["model"]["vocab"].items():
        tokens[token_id], types[token_id] = piece, gguf.TokenType.NORMAL
    for added in data["added_tokens"]:
        special = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], special
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab_log = logging.getLogger("gguf.vocab")  # it warns that the BOS template has no pair form: harmless
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    finally:
        vocab_log.setLevel(level)
