"""Synthetic checkpoints: random weights in the exact layouts of real releases, for tests and benchmarks
where the real weights cannot be had (`trillm synth`). One file per family (bitnet.py, gpt_oss.py); files.py
writes large safetensors files piece by piece and checkpoints whole or not at all, vocabulary.py gives them
the real Llama 3 and o200k_harmony vocabularies."""

from pathlib import Path

from trillm.errors import TrillmError
from trillm.synth import bitnet, gpt_oss
from trillm.synth.files import write_whole
from trillm.synth.vocabulary import has_llama3_vocabulary

# family module -> (its layouts, the first the default; those written as one .gguf file; its writer's options)
FAMILIES = {bitnet: (bitnet.LAYOUTS, tuple(bitnet.GGUF_LAYOUTS), ("gguf_embedding",)),
            gpt_oss: (gpt_oss.LAYOUTS, ("gguf",), ("dense_type",))}
PRESETS = {preset: family for family in FAMILIES for preset in family.PRESETS}
LAYOUTS = tuple(dict.fromkeys(layout for layouts, _, _ in FAMILIES.values() for layout in layouts))


def layouts_of(preset: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the preset's layouts, the first its default; those that are one .gguf file)."""
    return FAMILIES[PRESETS[preset]][:2]


def write_preset(preset: str, out: str | Path, layout: str | None = None, seed: int = 0, force: bool = False,
                 **options) -> Path:
    """Write a preset in one of its family's layouts (default: the release's), whole or not at all, over an
    existing non-empty `out` only with `force` (see write_whole); `options` go to the family's writer
    (bitnet: gguf_embedding; gpt-oss: dense_type)."""
    family = PRESETS[preset]
    layouts, gguf_layouts, option_names = FAMILIES[family]
    layout = layout or layouts[0]
    if layout not in layouts:
        raise TrillmError(f"{preset} has no layout {layout!r} (choose from {', '.join(layouts)})")
    if layout in gguf_layouts and Path(out).suffix != ".gguf":
        raise TrillmError(f"with --layout {layout}, OUT is the .gguf file to write, not {str(out)!r}")
    unknown = set(options) - set(option_names)
    if unknown:
        raise TrillmError(f"{', '.join(sorted(unknown))} does not apply to {preset}")
    return write_whole(out, lambda path: family.write_preset(preset, path, layout, seed, **options), force)


__all__ = ["LAYOUTS", "PRESETS", "has_llama3_vocabulary", "layouts_of", "write_preset"]
