"""trillm.tokenizer against the references: transformers' tokenizers for the same files (AutoTokenizer on
HF folders and GGUF files, LlamaTokenizer on a SentencePiece tokenizer.model, TikTokenConverter on a
tiktoken one), the tiktoken library, and the sentencepiece library on ordinary prose."""

import json

import pytest
import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from tokenizer_fixtures import (
    CORPUS,
    LLAMA3_PATTERN,
    SMOLLM2_GGUF,
    USER_DEFINED_SYMBOL,
    gguf_metadata,
    llama_cpp_vocab_cases,
    smollm2_folder,
    train_sentencepiece_model,
    write_llama3_tiktoken_model,
    write_sentencepiece_gguf,
)
from trillm.errors import CheckpointError
from trillm.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, tokenizer_from_gguf

# Special tokens written in text, per vocabulary, each next to ordinary text.
SMOLLM2_SPECIAL_TEXT = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<repo_name>x<|endoftext|>y"]
SENTENCEPIECE_SPECIAL_TEXT = ["<s>Hello</s> world", f"call {USER_DEFINED_SYMBOL} now <unk>", "</s> after"]
LLAMA3_SPECIAL_TEXT = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "<|python_tag|>print(1)<|eom_id|> <|reserved_special_token_247|>x",
]


def assert_same_ids(tokenizer: Tokenizer, reference, texts: list[str]) -> None:
    """Our ids equal transformers', with and without special tokens, and so do both decodes."""
    for text in texts:
        for add_special_tokens in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            assert ids == reference.encode(text, add_special_tokens=add_special_tokens), (text, add_special_tokens)
        for skip_special_tokens in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens) == reference.decode(
                ids, skip_special_tokens=skip_special_tokens
            ), text


def assert_round_trip(tokenizer: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def reference_special_ids(reference) -> set[int]:
    return {index for index, token in reference.added_tokens_decoder.items() if token.special}


# ---------------------------------------------------------------------------------------------------
# GGUF, byte-level BPE: the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2_metadata():
    return gguf_metadata(smollm2_folder() / SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata):
    return tokenizer_from_gguf(smollm2_metadata)


@pytest.fixture(scope="module")
def smollm2_reference():
    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def test_gguf_byte_level_ids_match_transformers(smollm2, smollm2_reference):
    assert_same_ids(smollm2, smollm2_reference, CORPUS + SMOLLM2_SPECIAL_TEXT)
    assert_round_trip(smollm2, CORPUS + SMOLLM2_SPECIAL_TEXT)


def test_gguf_byte_level_special_tokens(smollm2, smollm2_reference):
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.add_bos is False  # tokenizer.ggml.add_bos_token is false in this file
    assert smollm2.stop_ids == {2, 0}  # <|im_end|> and <|endoftext|>, as llama.cpp stops on both
    assert smollm2.vocab_size == len(smollm2_reference) == 49152
    assert {i for i in range(smollm2.vocab_size) if smollm2.is_special(i)} == reference_special_ids(smollm2_reference)
    assert smollm2.chat_template == smollm2_reference.chat_template and "<|im_start|>" in smollm2.chat_template
    hello = smollm2.encode(" hello", add_special_tokens=False)
    assert [smollm2.piece(i) for i in hello] == smollm2_reference.convert_ids_to_tokens(hello) == ["Ġhello"]


def test_gguf_add_bos_and_eot_flags(smollm2, smollm2_metadata):
    flags = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    flagged = tokenizer_from_gguf(smollm2_metadata | flags | {"tokenizer.ggml.eot_token_id": 5})
    assert flagged.add_bos
    assert flagged.encode("Hi") == [1, *smollm2.encode("Hi"), 2]
    assert flagged.stop_ids == {0, 2, 5}


# ---------------------------------------------------------------------------------------------------
# SentencePiece (Llama 2 style): a model trained here, as tokenizer.model and inside a GGUF


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    return train_sentencepiece_model()


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory, sentencepiece_model):
    folder = tmp_path_factory.mktemp("llama2")
    (folder / "tokenizer.model").write_bytes(sentencepiece_model)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    return folder


@pytest.fixture(scope="module")
def sentencepiece_reference(sentencepiece_folder):
    return AutoTokenizer.from_pretrained(sentencepiece_folder)


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory, sentencepiece_model):
    path = tmp_path_factory.mktemp("llama2_gguf") / "tiny.gguf"
    write_sentencepiece_gguf(path, sentencepiece_model)
    return path


# transformers' LlamaTokenizer (tokenizers' Metaspace) leaves SentencePiece's dummy prefix out of a text that
# begins with a space; trillm gives SentencePiece's ids there (test_sentencepiece_model_matches_sentencepiece).
NO_LEADING_SPACE = [text for text in CORPUS + SENTENCEPIECE_SPECIAL_TEXT if not text.startswith(" ")]


def test_sentencepiece_model_ids_match_transformers(sentencepiece_folder, sentencepiece_reference):
    assert type(sentencepiece_reference).__name__ == "LlamaTokenizer"
    tokenizer = load_tokenizer(sentencepiece_folder)
    assert_same_ids(tokenizer, sentencepiece_reference, NO_LEADING_SPACE)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos, tokenizer.stop_ids) == (1, 2, True, {2})
    assert {i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)} == {0, 1, 2}
    user_defined = tokenizer.encode(USER_DEFINED_SYMBOL, add_special_tokens=False)
    assert len(user_defined) == 1 and not tokenizer.is_special(user_defined[0])
    assert [tokenizer.piece(i) for i in tokenizer.encode("\x07", add_special_tokens=False)] == ["▁", "<0x07>"]


def test_sentencepiece_model_matches_sentencepiece(sentencepiece_folder, sentencepiece_model):
    """On text without special tokens (leading spaces, whitespace runs, tabs included) trillm is Meta's
    tokenizer, the sentencepiece library."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    tokenizer = load_tokenizer(sentencepiece_folder)
    prose = [text for text in CORPUS if text]
    assert sum(text.startswith(" ") for text in prose) >= 2
    for text in prose:
        assert tokenizer.encode(text) == [processor.bos_id(), *processor.encode(text)], text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == processor.decode(
            processor.encode(text)
        )
    assert_round_trip(tokenizer, prose + ["a\n\tb  c   d"])


def test_gguf_sentencepiece_ids_match_transformers(sentencepiece_gguf):
    reference = AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)
    tokenizer = tokenizer_from_gguf(gguf_metadata(sentencepiece_gguf))
    assert_same_ids(tokenizer, reference, NO_LEADING_SPACE)
    # No add_bos_token key: llama.cpp and transformers add BOS to a SentencePiece vocabulary.
    assert tokenizer.add_bos and reference.add_bos_token
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.stop_ids) == ("<s>", "</s>", {2})
    assert {i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)} == reference_special_ids(reference)
    assert tokenizer.vocab_size == len(reference) == 800
    # Older files name no unknown token; the UNKNOWN token type alone keeps "<unk>" whole, as in llama.cpp.
    metadata = gguf_metadata(sentencepiece_gguf)
    del metadata["tokenizer.ggml.unknown_token_id"]
    assert tokenizer_from_gguf(metadata).encode("<unk>", add_special_tokens=False) == [0]


# ---------------------------------------------------------------------------------------------------
# tiktoken (Llama 3): the real vocabulary as Meta's tokenizer.model


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    write_llama3_tiktoken_model(folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def llama3(llama3_folder):
    return load_tokenizer(llama3_folder)


@pytest.fixture(scope="module")
def llama3_special_tokens(llama3) -> dict[str, int]:
    return {llama3.piece(i): i for i in range(128000, 128256)}


@pytest.fixture(scope="module")
def llama3_converted(llama3_folder, llama3_special_tokens):
    """transformers' conversion of the same file."""
    converter = TikTokenConverter(
        str(llama3_folder / "tokenizer.model"), pattern=LLAMA3_PATTERN, extra_special_tokens=list(llama3_special_tokens)
    )
    return converter.converted()


def test_tiktoken_model_special_tokens(llama3, llama3_special_tokens):
    named = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    assert named.items() <= llama3_special_tokens.items()
    assert len(llama3_special_tokens) == 256 and all(llama3.is_special(i) for i in llama3_special_tokens.values())
    assert not llama3.is_special(127999)
    assert (llama3.bos_id, llama3.eos_id, llama3.add_bos, llama3.vocab_size) == (128000, 128001, True, 128256)
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.encode("Hi") == [128000, *llama3.encode("Hi", add_special_tokens=False)]


def test_tiktoken_model_ids_match_tiktoken_and_transformers(
    llama3, llama3_folder, llama3_converted, llama3_special_tokens
):
    ranks = load_tiktoken_bpe(str(llama3_folder / "tokenizer.model"))
    encoding = tiktoken.Encoding(
        "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=llama3_special_tokens
    )
    for text in CORPUS + LLAMA3_SPECIAL_TEXT:
        ids = llama3.encode(text, add_special_tokens=False)
        assert ids == encoding.encode(text, allowed_special="all"), text
        assert ids == llama3_converted.encode(text, add_special_tokens=False).ids, text
        assert llama3.decode(ids) == encoding.decode(ids) == text
        assert llama3.decode(ids, skip_special_tokens=True) == llama3_converted.decode(ids, skip_special_tokens=True)


def test_gguf_llama3_vocabulary_matches_tiktoken(llama3, llama3_folder, llama3_special_tokens):
    """A Llama 3 GGUF: the same vocabulary as a "gpt2" one whose `tokenizer.ggml.pre` names the Llama 3 split
    pattern (GPT-2's own would cut numbers differently) and, as in llama.cpp, looks whole words up before
    merging (transformers' GGUF conversion does not, and cuts the corpus' " việc" into three tokens)."""
    merges = json.loads(llama3.backend.to_str())["model"]["merges"]
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": [llama3.piece(i) for i in range(llama3.vocab_size)],
        "tokenizer.ggml.token_type": [1] * 128000 + [3] * 256,
        "tokenizer.ggml.merges": [" ".join(merge) for merge in merges],
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.add_bos_token": True,
    }
    from_gguf = tokenizer_from_gguf(metadata)
    ranks = load_tiktoken_bpe(str(llama3_folder / "tokenizer.model"))
    encoding = tiktoken.Encoding(
        "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=llama3_special_tokens
    )
    for text in CORPUS + LLAMA3_SPECIAL_TEXT:
        assert from_gguf.encode(text) == [128000, *encoding.encode(text, allowed_special="all")], text
    assert from_gguf.stop_ids == {128001, 128008, 128009}


# ---------------------------------------------------------------------------------------------------
# tokenizer.json folders, with transformers' rules for BOS/EOS


@pytest.fixture(scope="module")
def llama3_hf_folder(tmp_path_factory, llama3_converted):
    """Laid out like a Llama 3.1 Instruct repo: BOS from the tokenizer.json template, eos ids listed in
    generation_config.json, the chat template inside tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("llama3_hf")
    backend = BackendTokenizer.from_str(llama3_converted.to_str())
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)]
            ),
        ]
    )
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    return folder


def test_tokenizer_json_llama3_folder(llama3_hf_folder):
    reference = AutoTokenizer.from_pretrained(llama3_hf_folder)
    tokenizer = load_tokenizer(llama3_hf_folder)
    assert_same_ids(tokenizer, reference, CORPUS + LLAMA3_SPECIAL_TEXT)
    assert tokenizer.add_bos and tokenizer.encode("x")[0] == 128000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_id) == ("<|begin_of_text|>", "<|eot_id|>", 128009)
    assert tokenizer.stop_ids == {128001, 128008, 128009}
    assert tokenizer.chat_template == reference.chat_template


def test_tokenizer_json_smollm2_folder(tmp_path, smollm2, smollm2_reference):
    """transformers' own save of the GGUF tokenizer: tokenizer.json, config, chat_template.jinja."""
    smollm2_reference.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert_same_ids(tokenizer, reference, CORPUS + SMOLLM2_SPECIAL_TEXT)
    assert tokenizer.chat_template == smollm2.chat_template
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos, tokenizer.stop_ids) == (1, 2, False, {0, 2})


@pytest.mark.parametrize("template_adds_bos", [True, False])
@pytest.mark.parametrize(
    "flags",
    [{}, {"add_bos_token": True}, {"add_bos_token": False}, {"add_eos_token": True}],
    ids=["no-flags", "add-bos", "no-bos", "add-eos"],
)
def test_tokenizer_json_post_processor_decides_bos(tmp_path, sentencepiece_reference, template_adds_bos, flags):
    """transformers 5 drops add_bos_token/add_eos_token from tokenizer_config.json when a tokenizer.json is
    there: the file's post-processor alone adds BOS (or not)."""
    backend = BackendTokenizer.from_str(sentencepiece_reference.backend_tokenizer.to_str())
    backend.post_processor = (
        processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)]) if template_adds_bos else None
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"} | flags
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert_same_ids(tokenizer, reference, ["Hello world", "<s>x</s>"])
    assert tokenizer.add_bos == template_adds_bos == (reference.encode("x")[0] == 1)


def test_tokenizer_json_named_special_tokens_are_matched_whole(tmp_path, sentencepiece_reference):
    """A tokenizer.json may hold its BOS/EOS/UNK as plain vocabulary; transformers still matches the
    tokens the config names whole in text, and calls them special."""
    tokenizer_json = json.loads(sentencepiece_reference.backend_tokenizer.to_str())
    tokenizer_json["added_tokens"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    config["unk_token"] = "<unk>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert_same_ids(tokenizer, reference, ["<s>Hello</s> x <unk>"])
    assert tokenizer.encode("<s></s><unk>", add_special_tokens=False) == [1, 2, 0]
    assert all(tokenizer.is_special(i) for i in (0, 1, 2))


@pytest.mark.parametrize(
    "flags", [{"add_bos_token": False}, {"add_eos_token": True}, {"add_bos_token": True, "add_eos_token": True}]
)
def test_sentencepiece_model_bos_eos_flags_follow_transformers(tmp_path, sentencepiece_model, flags):
    """Without a tokenizer.json, transformers applies the config's flags (a missing one meaning False)."""
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"} | flags
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert_same_ids(tokenizer, reference, ["Hello world", "<s>x</s>"])
    assert tokenizer.add_bos == flags.get("add_bos_token", False)
    assert (tokenizer.encode("x")[-1] == tokenizer.eos_id) == flags.get("add_eos_token", False)


def test_sentencepiece_model_without_config_adds_bos(tmp_path, sentencepiece_model):
    """Meta's folder has no tokenizer_config.json; Meta's encoder (and llama.cpp) add BOS, so we do."""
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.add_bos) == ("<s>", "</s>", True)
    assert tokenizer.encode("x")[0] == 1


def test_chat_template_file_wins_over_config(tmp_path, llama3_hf_folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama3_hf_folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0]['content'] }}"


# ---------------------------------------------------------------------------------------------------
# Streaming


def test_stream_decoder_never_returns_partial_characters(smollm2, sentencepiece_folder, llama3):
    """Pushed one id at a time, the pieces concatenate to the full decode and none holds a broken
    character, though emoji and CJK span several tokens in all three vocabularies."""
    text = "Émoji 😀🎉 then 日本語, a family 👨‍👩‍👧 and <s>/</s> text"
    for tokenizer in (smollm2, load_tokenizer(sentencepiece_folder), llama3):
        ids = tokenizer.encode(text)
        stream = StreamDecoder(tokenizer)
        pieces = [stream.push(i) for i in ids]
        assert "" in pieces  # some token only began a character
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) + stream.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_decoder_flush_and_special_tokens(llama3):
    flamingo = llama3.encode("ok 🦩", add_special_tokens=False)
    assert len(flamingo) == 4  # "ok", then the emoji's four bytes in three tokens
    stream = StreamDecoder(llama3)
    assert "".join(stream.push(i) for i in flamingo[:-1]) == "ok"
    assert stream.flush().endswith("\ufffd")
    assert stream.flush() == ""

    ids = llama3.encode("<|start_header_id|>user<|end_header_id|>")
    shown = StreamDecoder(llama3, skip_special_tokens=False)
    assert "".join(shown.push(i) for i in ids) + shown.flush() == "<|begin_of_text|>" + llama3.decode(ids[1:])


# ---------------------------------------------------------------------------------------------------
# Folders without a tokenizer, and files that are not tokenizers


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


@pytest.mark.parametrize(
    "name, content",
    [
        ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": '),
        ("tokenizer.json", b'{"version": "1.0"}'),
        ("tokenizer.model", b"\xff\xfe not a protobuf \x00\x01"),
        ("tokenizer.model", b"SGVsbG8= 0\nnot base64 at all\n"),
        ("tokenizer_config.json", b"{not json"),
    ],
)
def test_unreadable_files_name_themselves(tmp_path, name, content):
    if name == "tokenizer_config.json":
        (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert str(tmp_path / name) in message and "\n" not in message


def test_unsupported_gguf_vocabularies():
    with pytest.raises(CheckpointError, match="no vocabulary"):
        tokenizer_from_gguf({"general.architecture": "llama"})
    with pytest.raises(CheckpointError, match="'t5'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(CheckpointError, match="gemma3"):
        tokenizer_from_gguf(
            {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
        )


# ---------------------------------------------------------------------------------------------------
# llama.cpp's tokenizer test cases: texts and the ids the original tokenizers (SentencePiece for Llama 2,
# tiktoken-style BPE for Llama 3, GPT-2's) give, for the vocabularies trillm claims


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "deepseek-coder", "gpt-2", "qwen2", "qwen35"])
def test_llama_cpp_vocabulary_cases(name):
    path, cases = llama_cpp_vocab_cases(name)
    assert len(cases) >= 47
    tokenizer = tokenizer_from_gguf(gguf_metadata(path))
    wrong = [(text, ids, tokenizer.encode(text, add_special_tokens=False)) for text, ids in cases
             if tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not wrong, wrong[:3]


def test_token_bytes_of_sentencepiece_and_byte_level_pieces():
    path, _ = llama_cpp_vocab_cases("llama-spm")
    spm = tokenizer_from_gguf(gguf_metadata(path))
    ids = spm.encode(" Hello 你", add_special_tokens=False)
    assert [spm.token_bytes(i) for i in ids] == [b" ", b" Hello", b" ", "你".encode()]
    fallback = spm.encode("\x07", add_special_tokens=False)[-1]
    assert spm.piece(fallback) == "<0x07>" and spm.token_bytes(fallback) == b"\x07"
    assert spm.token_bytes(spm.bos_id) is None
    gpt2 = tokenizer_from_gguf(gguf_metadata(llama_cpp_vocab_cases("gpt-2")[0]))
    assert b"".join(gpt2.token_bytes(i) for i in gpt2.encode("naïve 日本", add_special_tokens=False)) == "naïve 日本".encode()
