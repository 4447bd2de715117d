"""`trillm inspect`: what a checkpoint holds, read from its headers (and, to verify packed weights, from the
data of the sampled layers only), as a structure analysis of a release would show it by hand.

Sections: the config; every tensor; statistics by category; one layer's structure and whether all layers
share it; the linear layers of one block for hardware planning (sizes at 1.58-8 bits, bytes a decoded token
reads, the bandwidth a decode speed needs); dtypes; verification of packed weights; the module tree that
trillm builds. Parameters count logical weights: a packed byte of 4 ternary weights is 4, an MXFP4 byte 2.
"""

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trillm.checkpoint import open_checkpoint
from trillm.checkpoint.gguf_file import GGUFCheckpoint, row_bytes
from trillm.errors import CheckpointError

SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                     "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
# Name patterns of each category, first match wins (Hugging Face and GGUF names).
CATEGORIES = [
    ("Embedding", r"embed_tokens|token_embd\.|\bwte\b|tok_embeddings"),
    ("Output head", r"lm_head|^output\.weight"),
    ("Router", r"\.router\.|ffn_gate_inp"),
    ("Experts", r"\.experts\.|_exps\."),
    ("Sinks", r"sinks"),
    ("Norms", r"norm"),
    ("Attention Q", r"q_proj|attn_q\."),
    ("Attention K", r"k_proj|attn_k\."),
    ("Attention V", r"v_proj|attn_v\."),
    ("Attention O", r"o_proj|attn_output\."),
    ("MLP gate", r"gate_proj|ffn_gate\."),
    ("MLP up", r"up_proj|ffn_up\."),
    ("MLP down", r"down_proj|ffn_down\."),
]
LINEAR_CATEGORIES = ["Attention Q", "Attention K", "Attention V", "Attention O", "Router", "MLP gate", "MLP up",
                     "MLP down", "Experts"]  # in the order a block computes them
LAYER = re.compile(r"^(.*?(?:layers|blk|h)\.)(\d+)\.(.*)$")
PLANNING_BITS = (1.58, 2, 4, 8)


@dataclass
class Tensor:
    name: str
    shape: list[int]  # as stored, PyTorch order
    format: str  # the stored dtype (BF16, U8...) or GGML type; packed ones say what they pack
    bytes: int
    params: int  # logical weights
    logical_shape: list[int]  # (out, in) of a packed matrix, (experts, out, in) of a bank
    category: str


def category_of(name: str) -> str:
    return next((category for category, pattern in CATEGORIES if re.search(pattern, name)), "Other")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


# ---- Reading the headers ------------------------------------------------------------------------------

def folder_tensors(checkpoint) -> list[Tensor]:
    """A Hugging Face folder's tensors from the safetensors headers (no data read)."""
    from trillm.checkpoint.hf_folder import open_safetensors

    bitnet = (checkpoint.config.get("quantization_config") or {}).get("quant_method") == "bitnet"
    tensors, opened = [], {}
    for name, path in checkpoint.tensor_files.items():
        if path not in opened:
            opened[path] = open_safetensors(path)
        try:
            view = opened[path].get_slice(name)
            shape, dtype = list(view.get_shape()), view.get_dtype()
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read the header of tensor {name!r} ({error})") from None
        numel = math.prod(shape)
        stored_format, params, logical = dtype, numel, shape
        if dtype == "U8" and bitnet and name.endswith("_proj.weight") and len(shape) == 2:
            stored_format, params, logical = "U8 ternary (4 a byte)", 4 * numel, [4 * shape[0], shape[1]]
        elif dtype == "U8" and name.endswith("_blocks"):
            stored_format, params, logical = "U8 MXFP4 codes (2 a byte)", 2 * numel, [*shape[:-2], shape[-2] * 32]
        elif dtype == "U8" and name.endswith("_scales"):
            stored_format = "U8 MXFP4 scales (e8m0)"
        tensors.append(Tensor(name, shape, stored_format, numel * SAFETENSORS_BYTES.get(dtype, 1), params, logical,
                              category_of(name)))
    return sorted(tensors, key=lambda t: natural_key(t.name))


def gguf_tensors(checkpoint: GGUFCheckpoint) -> list[Tensor]:
    tensors = []
    for name, (ggml_type, dims, offset) in checkpoint.infos.items():
        shape = list(reversed(dims))
        size = math.prod(dims[1:]) * row_bytes(ggml_type, dims)
        if checkpoint.data_start + offset + size > len(checkpoint.file):
            raise CheckpointError(f"{checkpoint.path}: tensor {name!r} ({ggml_type.name} {shape}) ends past the end of "
                                  f"the file: it is truncated")
        tensors.append(Tensor(name, shape, ggml_type.name, size, math.prod(dims), shape, category_of(name)))
    return sorted(tensors, key=lambda t: natural_key(t.name))


def natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def gguf_config(metadata: dict, tensors: list[Tensor]) -> dict:
    arch = metadata.get("general.architecture", "?")
    get = lambda key, default=None: metadata.get(f"{arch}.{key}", default)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = metadata.get("tokenizer.ggml.tokens")
    names = {t.name for t in tensors}
    return {
        "architecture": arch, "hidden_size": hidden,
        "intermediate_size": get("expert_feed_forward_length", get("feed_forward_length")),
        "layers": get("block_count"), "attention_heads": heads, "kv_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads if hidden and heads else None),
        "vocab_size": get("vocab_size", len(tokens) if tokens is not None else None),
        "context": get("context_length"),
        "activation": {"llama": "silu (SwiGLU)", "bitnet": "relu2 (squared-ReLU GLU)",
                       "gpt-oss": "clamped SwiGLU"}.get(arch, "?"),
        "rope": get("rope.scaling.type", "default"), "experts": get("expert_count"),
        "experts_per_token": get("expert_used_count"), "quantization": file_type(metadata, tensors),
        "dtype": most_common_format(tensors), "tied_embeddings": "output.weight" not in names,
    }


def folder_config(config: dict, tensors: list[Tensor]) -> dict:
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    quantization = config.get("quantization_config") or {}
    return {
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
        "hidden_size": hidden, "intermediate_size": config.get("intermediate_size"),
        "layers": config.get("num_hidden_layers"), "attention_heads": heads,
        "kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": config.get("head_dim") or (hidden // heads if hidden and heads else None),
        "vocab_size": config.get("vocab_size"), "context": config.get("max_position_embeddings"),
        "activation": config.get("hidden_act"),
        "rope": (config.get("rope_scaling") or {}).get("rope_type") or (config.get("rope_scaling") or {}).get("type")
        or "default",
        "experts": config.get("num_local_experts") or config.get("num_experts"),
        "experts_per_token": config.get("num_experts_per_tok") or config.get("experts_per_token"),
        "quantization": quantization.get("quant_method", "none"),
        "dtype": config.get("torch_dtype") or config.get("dtype") or most_common_format(tensors),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def file_type(metadata: dict, tensors: list[Tensor]) -> str:
    """general.file_type by llama.cpp's name for it (MOSTLY_Q4_K_M...), else the most common format."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(metadata["general.file_type"]).name
    except (KeyError, ValueError):
        return most_common_format(tensors)


def most_common_format(tensors: list[Tensor]) -> str:
    by_bytes = {}
    for t in tensors:
        by_bytes[t.format] = by_bytes.get(t.format, 0) + t.bytes
    return max(by_bytes, key=by_bytes.get) if by_bytes else "?"


# ---- The analysis ---------------------------------------------------------------------------------------

def category_statistics(tensors: list[Tensor]) -> list[dict]:
    total = sum(t.bytes for t in tensors) or 1
    rows = {}
    for t in tensors:
        row = rows.setdefault(t.category, {"category": t.category, "tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += t.params
        row["bytes"] += t.bytes
    ordered = sorted(rows.values(), key=lambda row: -row["bytes"])
    for row in ordered:
        row["share"] = row["bytes"] / total
    return ordered


def layer_kinds(config: dict, metadata: dict | None, layers: int) -> list[str]:
    """What kind of attention each layer has, where the config says (gpt-oss: sliding and full)."""
    if config.get("layer_types"):
        return list(config["layer_types"])[:layers]
    if metadata and metadata.get("general.architecture") == "gpt-oss":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return [""] * layers


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 9] -> '0-2, 5, 7, 9'; [0, 2, 4, 6] -> '0, 2, ... 6 (every 2nd)'."""
    if len(indices) > 3 and len({b - a for a, b in zip(indices, indices[1:])}) == 1 and indices[1] - indices[0] > 1:
        step = indices[1] - indices[0]
        return f"{indices[0]}, {indices[1]}, ... {indices[-1]} (every {'other' if step == 2 else f'{step}th'} layer)"
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ", ".join(parts)


def layer_structure(tensors: list[Tensor], kinds: list[str]) -> dict:
    layers = {}
    for t in tensors:
        match = LAYER.match(t.name)
        if match:
            layers.setdefault(int(match[2]), []).append((match[3], t))
    if not layers:
        return {"layers": 0, "first": [], "groups": []}
    signatures = {}
    for index, entries in sorted(layers.items()):
        kind = kinds[index] if index < len(kinds) else ""
        signature = (kind, tuple((rel, tuple(t.shape), t.format) for rel, t in entries))
        signatures.setdefault(signature, []).append(index)
    first_index = min(layers)
    groups = [{"layers": indices, "range": ranges(indices), "kind": signature[0],
               "differs": sorted({rel for rel, _, _ in signature[1]}
                                 ^ {rel for rel, t in layers[first_index]})}
              for signature, indices in signatures.items()]
    first = [{"name": rel, "shape": t.shape, "format": t.format, "bytes": t.bytes} for rel, t in layers[first_index]]
    return {"layers": len(layers), "first_layer": first_index, "first": first, "groups": groups,
            "all_share": len(groups) == 1}


def linear_layers(tensors: list[Tensor], layer: int) -> list[dict]:
    """The matrices of one block (weights of the linear categories), with K, M and sizes at several widths."""
    rows = []
    for t in sorted(tensors, key=lambda t: LINEAR_CATEGORIES.index(t.category) if t.category in LINEAR_CATEGORIES else 0):
        match = LAYER.match(t.name)
        if not match or int(match[2]) != layer or t.category not in LINEAR_CATEGORIES or len(t.logical_shape) < 2:
            continue
        if t.name.endswith(("_scales", "weight_scale", "bias")):
            continue
        *experts, out_features, in_features = t.logical_shape
        rows.append({"name": match[3], "K": in_features, "M": out_features, "experts": math.prod(experts),
                     "params": t.params, "stored_bytes": t.bytes,
                     **{f"bytes_at_{bits}_bits": t.params * bits / 8 for bits in PLANNING_BITS}})
    return rows


def bytes_per_token(tensors: list[Tensor], routed_share: float) -> int:
    """What one decode step reads: every tensor once, expert banks for the routed experts only, and of the
    embedding one row when the model has an output head of its own."""
    has_head = any(t.category == "Output head" for t in tensors)
    total = 0.0
    for t in tensors:
        if t.category == "Embedding" and has_head:
            total += t.bytes / max(t.shape[0], 1)
        else:
            total += t.bytes * (routed_share if t.category == "Experts" else 1)
    return int(total)


def dtype_distribution(tensors: list[Tensor]) -> list[dict]:
    rows = {}
    for t in tensors:
        row = rows.setdefault(t.format, {"format": t.format, "tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += t.bytes
    return sorted(rows.values(), key=lambda row: -row["bytes"])


# ---- Verification of packed weights ---------------------------------------------------------------------

def ternary_code_counts(packed: torch.Tensor) -> list[int]:
    """Counts of the 2-bit codes 0..3 in packed bytes, from the bytes' histogram (one pass over the data)."""
    histogram = torch.bincount(packed.reshape(-1), minlength=256).double()
    codes = (torch.arange(256).unsqueeze(1) >> torch.tensor([0, 2, 4, 6])) & 3  # (byte, position)
    return [int((histogram.unsqueeze(1) * (codes == code)).sum()) for code in range(4)]


def ternary_report(counts: list[int], invalid_at: str | None = None) -> dict:
    """Shares of -1/0/+1 from the counts of codes w + 1 (0, 1, 2) and invalid ones (3)."""
    total = sum(counts) or 1
    report = {"kind": "ternary", "plus_one": counts[2] / total, "zero": counts[1] / total,
              "minus_one": counts[0] / total, "invalid_codes": counts[3]}
    if counts[3]:
        report["problem"] = f"{counts[3]} invalid ternary codes (0b11)" + (f"; the first at {invalid_at}" if invalid_at
                                                                         else "")
    return report


def first_invalid_location(packed: torch.Tensor) -> str | None:
    """Where the release layout's first code 3 is: as the loader reports it (row, column of the weight)."""
    from trillm.weights.ternary import check_ternary_codes

    try:
        check_ternary_codes(packed, "")
    except CheckpointError as error:
        return str(error).split("for the weight at ")[-1].split(" (")[0]
    return None


def mxfp4_report(scales: torch.Tensor, codes: torch.Tensor) -> dict:
    """The e8m0 scale exponents' histogram, the share of zero elements (codes 0 and 8, +0 and -0), and the
    scales that are NaN (255)."""
    exponents = torch.bincount(scales.reshape(-1), minlength=256)
    byte_counts = torch.bincount(codes.reshape(-1), minlength=256).double()
    values = torch.arange(256)
    zero_nibbles = (((values & 15) % 8 == 0).double() + ((values >> 4) % 8 == 0).double())
    total = scales.numel() or 1
    present = [e for e in range(256) if exponents[e]]
    report = {"kind": "mxfp4", "scale_exponents": {str(e - 127): int(exponents[e]) / total for e in present if e != 255},
              "exponent_range": [present[0] - 127, present[-1] - 127] if present else None,
              "zero_share": float((byte_counts * zero_nibbles).sum()) / (2 * codes.numel() or 1),
              "nan_scales": int(exponents[255])}
    if report["nan_scales"]:
        report["problem"] = f"{report['nan_scales']} NaN scales (e8m0 255)"
    return report


def value_report(values: torch.Tensor, kind: str) -> dict:
    finite = torch.isfinite(values)
    report = {"kind": kind, "min": float(values[finite].min()) if finite.any() else None,
              "max": float(values[finite].max()) if finite.any() else None,
              "non_finite": int((~finite).sum())}
    if report["non_finite"]:
        report["problem"] = f"{report['non_finite']} non-finite values (a non-finite block scale)"
    return report


def verify_tensor(checkpoint, t: Tensor, bitnet_master: bool) -> dict | None:
    """What the stored weights hold, for the packed formats (and a BitNet bf16 master's projections, as the
    packed form would hold them); None for what there is nothing to verify in."""
    from trillm.weights.ggml import BLOCK_LAYOUTS, GGMLTensor, dequantize_ggml
    from trillm.weights.mxfp4 import GGUF_BLOCK_BYTES
    from trillm.weights.ternary import TERNARY_BLOCK_BYTES, TERNARY_BLOCK_DECODERS, ternarize_absmean

    if t.format.startswith("U8 ternary"):
        packed = checkpoint.get(t.name)
        counts = ternary_code_counts(packed)
        return ternary_report(counts, first_invalid_location(packed) if counts[3] else None)
    if t.format.startswith("U8 MXFP4 codes"):
        return mxfp4_report(checkpoint.get(t.name[:-len("_blocks")] + "_scales"), checkpoint.get(t.name))
    stored = checkpoint.get(t.name) if isinstance(checkpoint, GGUFCheckpoint) else None
    if isinstance(stored, GGMLTensor):
        if stored.type.name == "MXFP4":
            blocks = stored.data.reshape(-1, GGUF_BLOCK_BYTES)
            return mxfp4_report(blocks[:, 0], blocks[:, 1:])
        if stored.type in TERNARY_BLOCK_DECODERS:
            codes, _ = TERNARY_BLOCK_DECODERS[stored.type](stored.data.reshape(-1, TERNARY_BLOCK_BYTES[stored.type]))
            counts = torch.bincount(codes.reshape(-1).long(), minlength=4).tolist()
            return ternary_report(counts[:3] + [sum(counts[3:])])
        if stored.type in BLOCK_LAYOUTS:
            return value_report(dequantize_ggml(stored), f"{stored.type.name} blocks")
        return None
    if bitnet_master and t.category in LINEAR_CATEGORIES and t.format == "BF16" and len(t.shape) == 2:
        ternary = ternarize_absmean(checkpoint.get(t.name).float())
        return {**ternary_report(ternary_code_counts(ternary.packed)), "kind": "bf16 master, ternarized (absmean)"}
    return None


def sampled_layers(layers: int, verify: str) -> list[int]:
    if verify == "all":
        return list(range(layers))
    count = min(int(verify), layers)
    if count <= 1:
        return [0][:count]
    return sorted({round(i * (layers - 1) / (count - 1)) for i in range(count)})


def verify(checkpoint, tensors: list[Tensor], layers: list[int], bitnet_master: bool) -> list[dict]:
    from tqdm import tqdm

    chosen = [t for t in tensors if (m := LAYER.match(t.name)) and int(m[2]) in layers]
    results = []
    for t in tqdm(chosen, desc="verifying", unit="tensor", delay=1.0, leave=False):
        report = verify_tensor(checkpoint, t, bitnet_master)
        if report is not None:
            results.append({"name": t.name, **report})
    return results


# ---- The whole report ----------------------------------------------------------------------------------

def inspect_checkpoint(source, verify_layers: str = "2", target_tps: float | None = None,
                       name_filter: str | None = None) -> dict:
    checkpoint = open_checkpoint(source)
    path = Path(checkpoint.path)
    if isinstance(checkpoint, GGUFCheckpoint):
        tensors = gguf_tensors(checkpoint)
        config = gguf_config(checkpoint.metadata, tensors)
        kinds = layer_kinds({}, checkpoint.metadata, config["layers"] or 0)
        files = [{"file": path.name, "bytes": path.stat().st_size}]
        bitnet_master = False
    else:
        tensors = folder_tensors(checkpoint)
        config = folder_config(checkpoint.config, tensors)
        kinds = layer_kinds(checkpoint.config, None, config["layers"] or 0)
        files = [{"file": file.name, "bytes": file.stat().st_size}
                 for file in sorted(set(checkpoint.tensor_files.values()))]
        bitnet_master = "BitNet" in config["architecture"]  # its bf16 projections: shown ternarized
    structure = layer_structure(tensors, kinds)
    experts, per_token = config.get("experts"), config.get("experts_per_token")
    routed_share = per_token / experts if experts and per_token else 1.0
    per_token_bytes = bytes_per_token(tensors, routed_share)
    block = linear_layers(tensors, structure.get("first_layer", 0))
    layer_numbers = sorted({int(match[2]) for match in map(LAYER.match, (t.name for t in tensors)) if match})
    all_linear = [row for layer in layer_numbers for row in linear_layers(tensors, layer)]
    planning = {
        "layer": structure.get("first_layer", 0), "linear_layers": block,
        "block_total": {key: sum(row[key] for row in block) for key in
                        ["params", "stored_bytes", *(f"bytes_at_{bits}_bits" for bits in PLANNING_BITS)]},
        "model_total": {key: sum(row[key] for row in all_linear) for key in
                        ["params", "stored_bytes", *(f"bytes_at_{bits}_bits" for bits in PLANNING_BITS)]},
        "bytes_per_decoded_token": per_token_bytes, "routed_expert_share": routed_share,
    }
    if target_tps:
        planning["target_tokens_per_s"] = target_tps
        planning["bandwidth_needed_gb_per_s"] = per_token_bytes * target_tps / 1e9
    listed = [t for t in tensors if not name_filter or re.search(name_filter, t.name)]
    verification = verify(checkpoint, tensors, sampled_layers(structure["layers"], verify_layers), bitnet_master)
    return {
        "path": str(path), "format": checkpoint.kind, "config": config, "files": files,
        "tensor_count": len(tensors), "total_params": sum(t.params for t in tensors),
        "total_bytes": sum(t.bytes for t in tensors),
        "tensors": [asdict(t) for t in listed], "categories": category_statistics(tensors),
        "structure": structure, "planning": planning, "formats": dtype_distribution(tensors),
        "verification": verification,
        "verification_failed": [row["name"] for row in verification if "problem" in row],
    }


# ---- Terminal tables -------------------------------------------------------------------------------------

def render(report: dict, show_tensors: bool = True):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:  # piped or redirected: wide enough that no column is cut
        console.width = 160

    def table(title: str, *columns: str, right: tuple[int, ...] = ()) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, column in enumerate(columns):
            t.add_column(column, justify="right" if i in right else "left")
        return t

    console.print(f"[bold]{report['path']}[/bold] ({report['format']})")
    config = table("", "config", "value")
    for key, value in report["config"].items():
        config.add_row(key.replace("_", " "), str(value))
    for file in report["files"]:
        config.add_row("file", f"{file['file']}  {human_bytes(file['bytes'])}")
    console.print(config)

    if show_tensors:
        listing = table(f"1. Tensors ({len(report['tensors'])} of {report['tensor_count']})", "name", "shape",
                        "format", "bytes", right=(3,))
        for t in report["tensors"]:
            listing.add_row(t["name"], str(t["shape"]), t["format"], human_bytes(t["bytes"]))
        console.print(listing)

    categories = table("2. By category", "category", "tensors", "parameters", "bytes", "share", right=(1, 2, 3, 4))
    for row in report["categories"]:
        categories.add_row(row["category"], str(row["tensors"]), f"{row['params']:,}", human_bytes(row["bytes"]),
                           f"{row['share']:.2%}")
    categories.add_row("[bold]total", f"[bold]{report['tensor_count']}", f"[bold]{report['total_params']:,}",
                       f"[bold]{human_bytes(report['total_bytes'])}", "[bold]100.00%")
    console.print(categories)

    structure = report["structure"]
    if structure["layers"]:
        layer = table(f"3. Layer {structure['first_layer']} of {structure['layers']}", "tensor", "shape", "format",
                      "bytes", right=(3,))
        for t in structure["first"]:
            layer.add_row(t["name"], str(t["shape"]), t["format"], human_bytes(t["bytes"]))
        console.print(layer)
        if structure["all_share"]:
            console.print(f"  all {structure['layers']} layers have this structure\n")
        else:
            for group in structure["groups"]:
                what = f"{group['kind']}" + (f"; tensors not in every layer: {', '.join(group['differs'])}"
                                             if group["differs"] else "")
                console.print(f"  layers {group['range']}: {what or 'the same tensors'}")
            console.print()

    planning = report["planning"]
    bits = [f"bytes_at_{b}_bits" for b in PLANNING_BITS]
    linear = table(f"4. Linear layers of block {planning['layer']} (hardware planning)", "layer", "K (in)", "M (out)",
                   "experts", "parameters", "stored", *(f"at {b} bits" for b in PLANNING_BITS),
                   right=tuple(range(1, 10)))
    for row in planning["linear_layers"]:
        linear.add_row(row["name"], f"{row['K']:,}", f"{row['M']:,}", str(row["experts"]), f"{row['params']:,}",
                       human_bytes(row["stored_bytes"]), *(human_bytes(row[key]) for key in bits))
    for label, totals in (("block total", planning["block_total"]), ("all blocks", planning["model_total"])):
        linear.add_row(f"[bold]{label}", "", "", "", f"[bold]{totals['params']:,}",
                       f"[bold]{human_bytes(totals['stored_bytes'])}", *(human_bytes(totals[key]) for key in bits))
    console.print(linear)
    routed = (f" (experts: {planning['routed_expert_share']:.1%} of each bank, the routed ones)"
              if planning["routed_expert_share"] < 1 else "")
    console.print(f"  a decoded token reads {human_bytes(planning['bytes_per_decoded_token'])}{routed}")
    if "target_tokens_per_s" in planning:
        console.print(f"  {planning['target_tokens_per_s']:g} tokens/s need {planning['bandwidth_needed_gb_per_s']:.1f} "
                      f"GB/s of memory bandwidth")
    console.print()

    formats = table("5. Formats", "format", "tensors", "bytes", right=(1, 2))
    for row in report["formats"]:
        formats.add_row(row["format"], str(row["tensors"]), human_bytes(row["bytes"]))
    console.print(formats)

    if report["verification"]:
        checks = table("6. Verification of packed weights", "tensor", "what", "result")
        for row in report["verification"]:
            checks.add_row(row["name"], row["kind"], verification_summary(row))
        console.print(checks)
        failed = report["verification_failed"]
        console.print(f"  [bold red]{len(failed)} tensors failed" if failed else "  [green]all verified tensors hold "
                      "what their format promises")


def verification_summary(row: dict) -> str:
    if "plus_one" in row:
        text = f"+1 {row['plus_one']:.1%}  0 {row['zero']:.1%}  -1 {row['minus_one']:.1%}"
    elif row["kind"] == "mxfp4":
        low, high = row["exponent_range"] or (None, None)
        common = sorted(row["scale_exponents"].items(), key=lambda item: -item[1])[:3]
        text = (f"scale exponents {low}..{high} (most: " + ", ".join(f"2^{e} {share:.0%}" for e, share in common)
                + f"); zeros {row['zero_share']:.1%}")
    else:
        text = f"values {row['min']:.4g}..{row['max']:.4g}"
    return text + (f"  [bold red]{row['problem']}" if "problem" in row else "")


# ---- --modules: the model as trillm builds it ------------------------------------------------------------

def weight_format(weight) -> tuple[list[int], str, int]:
    """(shape, format, bytes) of any weight a trillm module holds."""
    from trillm.weights.ggml import GGMLTensor
    from trillm.weights.mxfp4 import MXFP4Tensor, stored_bytes
    from trillm.weights.ternary import TernaryTensor

    if isinstance(weight, GGMLTensor):
        return list(weight.shape), f"{weight.type.name} blocks", weight.data.numel()
    if isinstance(weight, TernaryTensor):
        return list(weight.shape), "ternary, 2 bits", weight.packed.numel() + weight.scale.numel() * 4
    if isinstance(weight, MXFP4Tensor):
        return list(weight.shape), f"MXFP4 ({weight.layout} layout)", stored_bytes(weight)
    return list(weight.shape), str(weight.dtype).removeprefix("torch."), weight.numel() * weight.element_size()


def module_report(source) -> dict:
    import trillm

    network = trillm.load(source).network
    rows = []
    for name, module in network.named_modules():
        for attribute in ("weight", "bias"):
            value = getattr(module, attribute, None)
            if value is not None and hasattr(value, "shape"):
                shape, fmt, size = weight_format(value)
                rows.append({"name": f"{name}.{attribute}" if name else attribute, "module": type(module).__name__,
                             "shape": shape, "format": fmt, "bytes": size})
    return {"tree": repr(network), "weights": rows}


def render_modules(modules: dict):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 160
    console.print(modules["tree"], markup=False)
    t = Table(title="7. Weights as trillm holds them", title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for column in ("name", "module", "shape", "format", "bytes"):
        t.add_column(column, justify="right" if column == "bytes" else "left")
    for row in modules["weights"]:
        t.add_row(row["name"], row["module"], str(row["shape"]), row["format"], human_bytes(row["bytes"]))
    console.print(t)
