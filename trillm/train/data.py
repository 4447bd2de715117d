"""Training text: files, folders of them, or JSON lines (a "text" field a line), tokenized once into a
memory-mapped file of uint32 token ids (documents separated by EOS) beside a small JSON record of what it
holds, and reused while the sources and the tokenizer are unchanged. The last `val_fraction` of the tokens
are held out for validation. Batches are windows at positions drawn from the step number and the seed, so
a run resumed at step n reads what the uninterrupted run read there."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from trillm.errors import TrillmError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def source_files(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
        elif path.is_file():
            files.append(path)
        else:
            raise TrillmError(f"--data {path}: no such file or folder")
    if not files:
        raise TrillmError(f"--data {' '.join(paths)}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}, .jsonl)")
    return files


def documents(path: Path):
    """The texts of one file: a JSON lines file's "text" fields, else the whole file."""
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise TrillmError(f"{path}:{number}: not a JSON object with a \"text\" field") from None
                yield str(text)
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise TrillmError(f"{path}: not UTF-8 text ({error})") from None


def tokenize_sources(paths: list[str], tokenizer, cache: Path) -> np.ndarray:
    """The token ids of all sources (memory-mapped uint32), made once per sources and tokenizer."""
    from tqdm import tqdm

    files = source_files(paths)
    fingerprint = hashlib.sha256()
    for file in files:
        stat = file.stat()
        fingerprint.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    fingerprint.update(tokenizer.backend.to_str().encode())
    key = fingerprint.hexdigest()[:16]
    tokens_path, record_path = cache / f"tokens-{key}.bin", cache / f"tokens-{key}.json"
    if record_path.is_file() and tokens_path.is_file():
        return np.memmap(tokens_path, dtype=np.uint32, mode="r")
    cache.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    partial = tokens_path.with_suffix(".partial")
    count = 0
    with open(partial, "wb") as out, tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                                          desc="tokenizing", delay=1.0) as bar:
        for file in files:
            for text in documents(file):
                if not text.strip():
                    continue
                ids = tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])
                np.asarray(ids, dtype=np.uint32).tofile(out)
                count += len(ids)
            bar.update(file.stat().st_size)
    if count == 0:
        partial.unlink()
        raise TrillmError(f"--data {' '.join(paths)}: the files hold no text")
    os.replace(partial, tokens_path)
    record_path.write_text(json.dumps({"files": [str(f) for f in files], "tokens": count}) + "\n")
    return np.memmap(tokens_path, dtype=np.uint32, mode="r")


class TokenBatches:
    """Windows of seq_len + 1 tokens of the train or validation part, at positions drawn from (seed, step)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int):
        validation = max(int(len(tokens) * val_fraction), seq_len + 1)
        if len(tokens) - validation < seq_len + 1:
            raise TrillmError(f"the data holds {len(tokens)} tokens: too few for --seq-len {seq_len} and a validation "
                              f"part (at least {2 * (seq_len + 1)})")
        self.train, self.validation = tokens[:-validation], tokens[-validation:]
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, micro: int, batch_size: int, split: str = "train") -> torch.Tensor:
        data = self.train if split == "train" else self.validation
        # A seed of its own for each (run seed, split, step, micro-batch): Python's hash() of strings varies by process.
        generator = torch.Generator().manual_seed(((self.seed * 2 + (split != "train")) * 1_000_003 + step) * 4099 + micro)
        starts = torch.randint(0, len(data) - self.seq_len, (batch_size,), generator=generator).tolist()
        return torch.from_numpy(np.stack([data[s:s + self.seq_len + 1].astype(np.int64) for s in starts]))


# A trained vocabulary's one special token, between documents; and a plain "Role: text" chat template, as
# BitNet 2B4T's, so that `trillm chat` runs the exported model.
END_OF_TEXT = "<|endoftext|>"
PLAIN_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
                       "\n{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


def train_tokenizer(paths: list[str], vocab_size: int, folder: Path):
    """A byte-level BPE vocabulary of vocab_size entries learned from the data by `tokenizers` (made once,
    kept as folder/tokenizer.json)."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from trillm.tokenizer import Tokenizer

    path = folder / "tokenizer.json"
    if path.is_file():
        backend = BackendTokenizer.from_file(str(path))
    else:
        if vocab_size < 300:
            raise TrillmError(f"--train-tokenizer {vocab_size}: a byte-level vocabulary needs at least 300 entries")
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        texts = (text for file in source_files(paths) for text in documents(file))
        backend.train_from_iterator(texts, trainer)
        folder.mkdir(parents=True, exist_ok=True)
        backend.save(str(path))
    return Tokenizer(backend, bos_token=None, eos_token=END_OF_TEXT, add_bos=False, add_eos=False,
                     chat_template=PLAIN_CHAT_TEMPLATE)
