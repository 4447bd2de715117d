"""Text to token ids and back, for every tokenizer file trillm reads.

Each format becomes one `tokenizers.Tokenizer` (the Rust library transformers itself runs), assembled the
way transformers 5 assembles it, so the ids equal `AutoTokenizer`'s for the same files:

- tokenizer.json: read as it is, its post-processor deciding BOS/EOS (transformers 5 ignores the
  config's add_bos_token then); token names from tokenizer_config.json.
- GGUF vocabularies: transformers' `integrations/gguf/gguf_tokenizer_mapping.py`, which reads
  llama.cpp's conventions (`llama-vocab.cpp`): token types, the split regex named by
  `tokenizer.ggml.pre`, BOS added by default for SentencePiece vocabularies. One departure, for Llama 3
  style vocabularies: whole words are looked up before merging, as llama.cpp and tiktoken do.
- SentencePiece `tokenizer.model` (Llama 2): transformers' `LlamaTokenizer` built from
  `SentencePieceExtractor`, with BOS/EOS flags from the config (applied as transformers'
  `update_post_processor` does); the proto is parsed with the schema sentencepiece ships.
- tiktoken `tokenizer.model` (Llama 3): transformers' `TikTokenConverter`, with the split pattern and
  the 256 special tokens of Meta's Llama 3.1 `tokenizer.py`.
- A tokenizer.model without add_bos_token in a config gets BOS, as in Meta's code and llama.cpp
  (transformers would add none).

Streaming detokenization is the library's `DecodeStream`.
"""

import base64
import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream
from tokenizers.models import BPE

from trillm.checkpoint.fields import Fields
from trillm.errors import CheckpointError

# Token types, numbered alike in SentencePiece protos and GGUF `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

# Tokens that end a turn when the vocabulary marks them special: llama.cpp's end-of-generation names
# (llama-vocab.cpp), DeepSeek's, and gpt-oss's harmony stops.
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
    "<|call|>",
)

# Split patterns by `tokenizer.ggml.pre`, as transformers' GGUF_PRE_TOKENIZER_SPLITS maps them; a name
# missing here keeps GPT-2's own pattern, as transformers does.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek Coder's splits, each applied to the pieces the one before left: line breaks, words with one
# space before, punctuation runs likewise, CJK runs, single digits.
DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
                         r"\p{N}")
GGUF_SPLIT_PATTERNS = {
    "deepseek-coder": DEEPSEEK_CODER_SPLITS,
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], QWEN2_SPLIT),
    "qwen35": QWEN35_SPLIT,
    "tekken": TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], GPT4O_SPLIT),
}

# Vocabularies whose own tokenizer (tiktoken for Llama 3) takes a whole pre-token found in the vocabulary
# before merging: llama.cpp's list (llama-vocab.cpp, `ignore_merges = true`). transformers' GGUF conversion
# omits this and cuts e.g. " việc" into three tokens where Llama 3 has one; we follow Llama 3 and llama.cpp.
GGUF_WHOLE_WORD_FIRST = {
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"
}

# Meta's Llama 3.1 tokenizer.py: 256 special tokens follow the ranks, these first, reserved ones after.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_SPECIAL_TOKEN_COUNT = 256

# GGUF architectures whose SentencePiece vocabulary transformers rebuilds differently (Gemma's spelled
# spaces and file-order merges, Phi-3's normalizer); not handled here, so refused rather than guessed.
GGUF_SENTENCEPIECE_VARIANTS = ("gemma", "gemma2", "gemma3", "phi3")


class Tokenizer:
    """A `tokenizers.Tokenizer` and what an engine needs to know about its special tokens."""

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        other_special_tokens: Iterable[str | None] = (),
        other_stop_ids: Iterable[int] = (),
        dummy_prefix: bool = False,
    ):
        """`add_bos` and `add_eos` both None keep the backend's own post-processor (a tokenizer.json's);
        otherwise BOS and EOS are added as they say, a None one meaning no. `dummy_prefix`: a SentencePiece
        vocabulary whose backend puts `▁` before the text (see encode)."""
        self.backend = backend
        self.dummy_prefix = dummy_prefix
        # An engine must see the whole prompt: a length limit or padding in a tokenizer.json is for training.
        backend.no_truncation()
        backend.no_padding()
        self.bos_id = _token_id(backend, bos_token)
        self.eos_id = _token_id(backend, eos_token)
        self.bos_token = bos_token if self.bos_id is not None else None
        self.eos_token = eos_token if self.eos_id is not None else None
        self.chat_template = chat_template

        # transformers matches its named special tokens (bos, eos, unk, pad) whole in text even where the
        # vocabulary holds them as plain tokens.
        already_added = {str(token) for token in backend.get_added_tokens_decoder().values()}
        named = [t for t in (bos_token, eos_token, *other_special_tokens) if _token_id(backend, t) is not None]
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named) if t not in already_added]
        )
        self._special_ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}

        if add_bos is not None or add_eos is not None:
            backend.post_processor = _bos_eos_template(
                self.bos_token if add_bos else None, self.eos_token if add_eos else None, backend
            )
        # Whatever produced it (a flag or a tokenizer.json template), this is what encode() does.
        self.add_bos = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]

        self.stop_ids = {i for i in (self.eos_id, *other_stop_ids) if i is not None}
        self.stop_ids |= {i for i in map(backend.token_to_id, END_OF_TURN_TOKENS) if i in self._special_ids}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token can stand for: the longest vocabulary entry as UTF-8 (an upper
        bound: a byte-level entry spells each byte as one character of up to 2 bytes, "▁" is 3)."""
        return max((len(piece.encode("utf-8", "surrogatepass")) for piece in self.backend.get_vocab()), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids, as in transformers."""
        if self.dummy_prefix and text.startswith(" "):
            # SentencePiece puts its `▁` before every text; tokenizers' Metaspace leaves it out of a text that
            # already begins with one (a space), so ' Hello' came out as '▁Hello', not '▁' '▁Hello'.
            text = " " + text
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str:
        """The token as the vocabulary spells it (`Ġhello`, `▁hello`, `<0x0A>`)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of text a token stands for (a piece may hold part of a UTF-8 character); None for a
        special token, which stands for no text."""
        if self.is_special(token_id):
            return None
        piece = self.piece(token_id)
        if isinstance(self.backend.decoder, decoders.ByteLevel):  # GPT-2's alphabet: a character a byte
            byte_of = _gpt2_byte_of_character()
            if all(character in byte_of for character in piece):
                return bytes(byte_of[character] for character in piece)
            return piece.encode("utf-8")  # an added token spelled as plain text
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte:  # SentencePiece's byte fallback
            return bytes([int(byte[1], 16)])
        return piece.replace("▁", " ").encode("utf-8")


class StreamDecoder:
    """Incremental detokenization: text comes back only once its characters are complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.emitted_chars = 0

    def push(self, token_id: int) -> str:
        """The text this token completes: empty while it holds only part of a UTF-8 character."""
        self.ids.append(token_id)
        text = self.stream.step(self.tokenizer.backend, token_id) or ""
        self.emitted_chars += len(text)
        return text

    def flush(self) -> str:
        """What the stream still holds back at the end (an unfinished character decodes to U+FFFD)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)[self.emitted_chars :]
        self.emitted_chars += len(text)
        return text


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders and tokenizer.model files


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer of a model folder: tokenizer.json, else tokenizer.model (SentencePiece or
    tiktoken, told apart by content); None when the folder has neither. Special tokens and flags come
    from tokenizer_config.json (then special_tokens_map.json), extra end-of-turn ids from
    generation_config.json, the chat template from chat_template.jinja or the config."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    special_tokens_map = _read_json(folder / "special_tokens_map.json")
    generation_config = _read_json(folder / "generation_config.json")

    def named_token(name: str, default: str | None = None) -> str | None:
        value = config.get(name, special_tokens_map.get(name, default))
        token = value.get("content") if isinstance(value, dict) else value
        if token is not None and not isinstance(token, str):
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: {name} must be a token (a string), got "
                                  f"{token!r}")
        return token

    if (folder / "tokenizer.json").is_file():
        backend = _read_tokenizer_json(folder / "tokenizer.json")
        default_bos = default_eos = None
        # transformers 5 drops add_bos_token/add_eos_token from the config when a tokenizer.json exists:
        # the file's post-processor alone decides (the two agree in files transformers 4 saved).
        add_bos = add_eos = None
        dummy_prefix = False  # the file's pre-tokenizer as transformers runs it
    elif (folder / "tokenizer.model").is_file():
        path = folder / "tokenizer.model"
        if _is_tiktoken_file(path):
            backend = _tiktoken_backend(path)
            default_bos, default_eos = LLAMA3_NAMED_SPECIAL_TOKENS[:2]
        else:
            backend, default_bos, default_eos = _sentencepiece_model_backend(path, config)
        dummy_prefix = _has_dummy_prefix(backend)  # SentencePiece's own result, as its slow tokenizer gives
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is None and add_eos is None:
            # Meta's reference encoders (and llama.cpp) start every prompt with BOS. transformers 5 adds
            # none unless the config says add_bos_token, as every Llama release on the Hub does.
            add_bos = True
    else:
        return None

    eos_ids = Fields(generation_config, folder / "generation_config.json").token_ids("eos_token_id")
    return Tokenizer(
        backend,
        bos_token=named_token("bos_token", default_bos),
        eos_token=named_token("eos_token", default_eos),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_chat_template(folder, config),
        dummy_prefix=dummy_prefix,
        other_special_tokens=(named_token("unk_token"), named_token("pad_token")),
        other_stop_ids=eos_ids,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    return Fields(values, path).values  # an object, or one line saying what it is


def _read_tokenizer_json(path: Path) -> BackendTokenizer:
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception with a serde message
        reason = str(error).partition("\n")[0]
        raise CheckpointError(f"{path}: not a tokenizers file ({reason})") from error


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja wins over the config's entry, as in transformers 5; a list of named
    templates gives its "default" one."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                              f"named templates")
    return template


def _is_tiktoken_file(path: Path) -> bool:
    """A tiktoken file is text lines `base64(token bytes) rank`; a SentencePiece model is a binary proto."""
    with open(path, "rb") as file:
        first_line = file.readline(1024).strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first_line) is not None


def _tiktoken_backend(path: Path) -> BackendTokenizer:
    """Meta's Llama 3 tokenizer.model as transformers' TikTokenConverter turns it into BPE."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:  # binascii.Error is one too
            raise CheckpointError(f"{path}: line {number} is not `base64 rank` ({error})") from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1}")

    reserved = (
        f"<|reserved_special_token_{index}|>"
        for index in range(3, 3 + LLAMA3_SPECIAL_TOKEN_COUNT - len(LLAMA3_NAMED_SPECIAL_TOKENS))
    )
    return tiktoken_backend(ranks, LLAMA3_SPLIT, [*LLAMA3_NAMED_SPECIAL_TOKENS, *reserved])


def tiktoken_backend(ranks: dict[bytes, int], split_pattern: str, special_tokens: list[str]) -> BackendTokenizer:
    """A tiktoken encoding (its ranks and split pattern) as the byte-level BPE transformers' TikTokenConverter
    makes of it, the special tokens numbered after the ranks, in order."""
    # latin-1 turns each byte into the character with that code, which the byte spelling then maps.
    spelling = _gpt2_byte_spelling()
    spelled = {token: token.decode("latin-1").translate(spelling) for token in ranks}
    vocab = {spelled[token]: rank for token, rank in ranks.items()}
    merges = [(spelled[left], spelled[right]) for left, right in _tiktoken_merges(ranks)]
    # tiktoken looks a whole pre-token up in the ranks before merging: BPE's ignore_merges does the same.
    backend = _byte_level_backend(vocab, merges, split_pattern, ignore_merges=True)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return backend


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of a token into two tokens, ordered by the token's rank (TikTokenConverter's order:
    within one token, by the ranks of its left then right part)."""
    merges = []
    lengths = {len(token) for token in ranks}
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        merges += sorted(_two_part_splits(token, ranks, lengths), key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    return merges


def _sentencepiece_model_backend(path: Path, config: dict) -> tuple[BackendTokenizer, str | None, str | None]:
    """Llama 2's SentencePiece tokenizer.model, with its BOS and EOS pieces."""
    # Imported here: protobuf (which sentencepiece's schema needs) serves only this format.
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except DecodeError as error:
        raise CheckpointError(f"{path}: neither a SentencePiece model nor a tiktoken file ({error})") from error
    if not model.pieces:
        raise CheckpointError(f"{path}: neither a SentencePiece model nor a tiktoken file (no pieces)")
    if model.trainer_spec.model_type != model.trainer_spec.BPE:
        raise CheckpointError(f"{path}: a SentencePiece model, but only BPE ones (Llama's) are supported")

    pieces = [piece.piece for piece in model.pieces]
    # transformers' SentencePieceExtractor orders these merges by token id, not by score.
    merges = _sentencepiece_merges({piece: index for index, piece in enumerate(pieces)})
    prepend_scheme = "first"  # transformers' LlamaTokenizer: legacy=False unless the config says so
    if not config.get("add_prefix_space", True):
        prepend_scheme = "never"
    elif config.get("legacy", False):
        prepend_scheme = "always"
    backend = _sentencepiece_backend(pieces, [piece.type for piece in model.pieces], merges, prepend_scheme)
    spec = model.trainer_spec
    bos = pieces[spec.bos_id] if 0 <= spec.bos_id < len(pieces) else None
    eos = pieces[spec.eos_id] if 0 <= spec.eos_id < len(pieces) else None
    return backend, bos, eos


# ---------------------------------------------------------------------------------------------------
# GGUF


def tokenizer_from_gguf(metadata: dict, source="GGUF file") -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (values as `GGUFReader` fields' `contents()`, numeric
    arrays as numpy arrays); every value checked, an error naming the key."""
    fields = Fields(metadata, source)
    if "tokenizer.ggml.model" not in fields or "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError(f"{source}: GGUF metadata holds no vocabulary (tokenizer.ggml.model / "
                              f"tokenizer.ggml.tokens)")
    kind = fields.text("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise fields.fail("tokenizer.ggml.tokens", "an array of strings", type(tokens).__name__)
    architecture = metadata.get("general.architecture")
    types = fields.get("tokenizer.ggml.token_type", None)
    types = [NORMAL] * len(tokens) if types is None else types
    if len(types) != len(tokens):
        raise fields.fail("tokenizer.ggml.token_type", f"an array of {len(tokens)} token types", f"{len(types)} of them")
    merges = fields.get("tokenizer.ggml.merges", None)
    if merges is not None:
        if not isinstance(merges, list) or not all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges):
            raise fields.fail("tokenizer.ggml.merges", "an array of 'left right' strings", type(merges).__name__)
        merges = [tuple(merge.split(" ")) for merge in merges]

    if kind == "gpt2":
        backend = _gguf_byte_level_backend(tokens, types, merges or [], metadata.get("tokenizer.ggml.pre"))
    elif kind == "llama" and architecture not in GGUF_SENTENCEPIECE_VARIANTS:
        if merges is None:  # llama.cpp's converter stores scores, not merges, for SentencePiece vocabularies
            if "tokenizer.ggml.scores" not in metadata or len(metadata["tokenizer.ggml.scores"]) != len(tokens):
                raise CheckpointError(f"{source}: a GGUF SentencePiece vocabulary needs merges or one score per "
                                      f"token")
            vocab = {token: index for index, token in enumerate(tokens)}
            merges = _sentencepiece_merges(vocab, dict(zip(tokens, metadata["tokenizer.ggml.scores"])))
        # llama.cpp's add_space_prefix: SentencePiece's add_dummy_prefix, true unless the file says not
        prepend = "first" if fields.flag("tokenizer.ggml.add_space_prefix", True) else "never"
        backend = _sentencepiece_backend(tokens, types, merges, prepend_scheme=prepend)
    else:
        raise CheckpointError(
            f"{source}: GGUF tokenizer {kind!r} for architecture {architecture!r} is not supported "
            "(trillm reads 'gpt2' vocabularies and Llama-style 'llama' ones)"
        )

    def token_id(key: str) -> int | None:
        return fields.integer(f"tokenizer.ggml.{key}", None, minimum=0) if f"tokenizer.ggml.{key}" in fields else None

    def token_named(key: str) -> str | None:
        token_id_ = token_id(key)
        return tokens[token_id_] if token_id_ is not None and token_id_ < len(tokens) else None

    stop_ids = [token_id(key) for key in ("eot_token_id", "eom_token_id")]
    return Tokenizer(
        backend,
        bos_token=token_named("bos_token_id"),
        eos_token=token_named("eos_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise; transformers follows.
        add_bos=fields.flag("tokenizer.ggml.add_bos_token", kind == "llama"),
        add_eos=fields.flag("tokenizer.ggml.add_eos_token", False),
        chat_template=fields.text("tokenizer.chat_template", None) if "tokenizer.chat_template" in fields else None,
        other_special_tokens=(token_named("unknown_token_id"), token_named("padding_token_id")),
        other_stop_ids=[i for i in stop_ids if i is not None],
        dummy_prefix=_has_dummy_prefix(backend),
    )


def _has_dummy_prefix(backend: BackendTokenizer) -> bool:
    """Whether the backend is one of ours for SentencePiece that puts `▁` before the text."""
    pre = backend.pre_tokenizer
    return isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme != "never"


def _gguf_byte_level_backend(tokens: list[str], types: list[int], merges: list, pre: str | None) -> BackendTokenizer:
    """A GGUF "gpt2" vocabulary: byte-level BPE, split by the pattern `tokenizer.ggml.pre` names."""
    spelling = _gpt2_byte_spelling()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; one that is not (a user-defined "\n\n", say) is respelled.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    backend = _byte_level_backend(vocab, merges, GGUF_SPLIT_PATTERNS.get(pre), pre in GGUF_WHOLE_WORD_FIRST)
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet]
    user_defined = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return backend


# ---------------------------------------------------------------------------------------------------
# The two BPE shapes every format above reduces to


def _byte_level_backend(vocab: dict[str, int], merges: list, split_pattern: str | tuple[str, ...] | None,
                        ignore_merges: bool):
    """GPT-2 style byte-level BPE: text split by a regex (or several in turn), each byte spelled as one
    printable character."""
    backend = BackendTokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges, dropout=None))
    if split_pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own pattern
    else:
        patterns = (split_pattern,) if isinstance(split_pattern, str) else split_pattern
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(pieces: list[str], types: list[int], merges: list, prepend_scheme: str):
    """Llama's SentencePiece BPE as transformers' LlamaTokenizer rebuilds it: spaces spelled `▁` with one
    put before the text, bytes of unknown characters as `<0xNN>` tokens, no normalizer."""
    vocab = {piece: index for index, piece in enumerate(pieces)}
    backend = BackendTokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":
        steps.append(decoders.Strip(content=" ", left=1))  # the space put before the text
    backend.decoder = decoders.Sequence(steps)
    # Control and unknown tokens are special (matched in text, skippable in decode); user-defined ones
    # are matched whole in text but are ordinary text otherwise, as in sentencepiece and llama.cpp.
    special = [p for p, kind in zip(pieces, types) if kind in (UNKNOWN, CONTROL)]
    user_defined = [p for p, kind in zip(pieces, types) if kind == USER_DEFINED]
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    backend.add_tokens([AddedToken(p, special=False, normalized=False) for p in user_defined])
    return backend


def _sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies, in transformers' `generate_merges` order: every split
    of a token into two tokens, ranked by the token's score (highest first) or, without scores, by its id;
    ties by the parts' lengths."""
    merges = []
    lengths = {len(token) for token in vocab}
    for token, rank in (scores or vocab).items():
        splits = sorted(_two_part_splits(token, vocab, lengths), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(left, right, rank) for left, right in splits]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in merges]


def _two_part_splits(token, vocab, lengths: set[int]) -> list[tuple]:
    """Every (left, right) with left + right = token, both in the vocabulary (`lengths`: the lengths its
    entries have). A cut is sliced only where both parts have a length some entry has: one slice per
    character would make a long token cost its length squared (a 60,000-character token: 3.8 GB)."""
    return [(token[:cut], token[cut:]) for cut in range(1, len(token))
            if cut in lengths and len(token) - cut in lengths and token[:cut] in vocab and token[cut:] in vocab]


@functools.cache
def _gpt2_byte_of_character() -> dict[str, int]:
    return {character: byte for byte, character in _gpt2_byte_spelling().items()}


def _gpt2_byte_spelling() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(b for b in range(256) if b not in spelling):
        spelling[byte] = chr(256 + shift)
    return spelling


def _bos_eos_template(bos: str | None, eos: str | None, backend: BackendTokenizer) -> processors.TemplateProcessing:
    """BOS before and EOS after the text (either may be None), as transformers' `update_post_processor`."""
    template = ["$A"]
    if bos is not None:
        template.insert(0, bos)
    if eos is not None:
        template.append(eos)
    specials = {token: backend.token_to_id(token) for token in (bos, eos) if token is not None}
    return processors.TemplateProcessing(single=template, special_tokens=list(specials.items()))


def _token_id(backend: BackendTokenizer, token: str | None) -> int | None:
    return backend.token_to_id(token) if token is not None else None
