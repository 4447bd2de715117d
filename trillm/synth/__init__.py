"""Synthetic checkpoints: random weights in the exact layouts of real releases, for tests and benchmarks
where the real weights cannot be had (`trillm synth`). One file per family (bitnet.py); files.py writes
large safetensors files piece by piece, vocabulary.py gives them the real Llama 3 vocabulary."""

from trillm.synth.bitnet import GGUF_LAYOUTS, LAYOUTS, PRESETS, write_preset
from trillm.synth.vocabulary import has_llama3_vocabulary

__all__ = ["GGUF_LAYOUTS", "LAYOUTS", "PRESETS", "has_llama3_vocabulary", "write_preset"]
