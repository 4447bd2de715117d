"""Hostile files, options and environments: each ends in one clear line (or a warning), never in a crash,
a hang, a runaway allocation, a read outside the model folder or lost work. One test per way in."""

import base64
import tracemalloc

from trillm.tokenizer import load_tokenizer, tokenizer_from_gguf


# ---- Memory that grows with the file, not with its square -------------------------------------------------

def peak_python_memory(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


LONG_TOKEN = "ab" * 10_000  # one 20,000-character vocabulary entry: 400 MB of prefix/suffix pairs, built whole


def test_a_long_sentencepiece_token_costs_its_length():
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "▁", LONG_TOKEN]
    metadata = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [0.0] * 3 + [-1.0, -2.0, -0.5, -3.0, -9.0],
                "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1]}
    assert peak_python_memory(lambda: tokenizer_from_gguf(metadata)) < 20_000_000
    assert tokenizer_from_gguf(metadata).encode("ab", add_special_tokens=False) == [6, 5]  # ▁ ab


def test_a_long_tiktoken_token_costs_its_length(tmp_path):
    ranks = [b"a", b"b", b"ab", LONG_TOKEN.encode()]
    (tmp_path / "tokenizer.model").write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank
                                                        for rank, token in enumerate(ranks)))
    assert peak_python_memory(lambda: load_tokenizer(tmp_path)) < 20_000_000
