"""`trillm train`: the loop. AdamW under the two-stage schedules (recipe.py), gradient accumulation to the
batch size in tokens, gradient clipping, a progress bar with loss, tokens/s and ETA, validation loss every
N steps, the log as JSON lines, and a checkpoint every N steps (model, optimizer, step; the data positions
follow from the step) that a later run with the same --out resumes exactly. Ctrl-C saves one first.
Under torchrun the processes share each step's micro-batches: DDP (each holds the whole model), or with
--shard FSDP2 (torch.distributed.fsdp.fully_shard: each holds its share of every layer's parameters,
gradients and optimizer state, gathered for a layer's forward and backward), for a model one process
cannot hold."""

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trillm.errors import TrillmError
from trillm.native.build import cpu_flags
from trillm.train.data import TokenBatches, tokenize_sources, train_tokenizer
from trillm.train.recipe import BETAS, PRESETS, WARMUP_STEPS, WEIGHT_DECAY, BitNetModel, ModelShape, \
    TwoStageSchedule, decay_groups, preset_shape

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    data: list[str]
    out: str
    preset: str | None = None  # the model's shape (PRESETS), or --init-from
    init_from: str | None = None  # or a LLaMA checkpoint to start from (train/init_from.py), in place of a preset
    blend: int | None = None  # steps over which the quantizers blend in; None: --warmup's with --init-from, else 0
    steps: int = 200
    batch_tokens: int = 16384  # per optimizer step
    seq_len: int = 256
    micro_batch: int = 8  # sequences a forward
    lr: tuple[float, float] | None = None  # the two peaks; None: the preset's
    warmup: int = WARMUP_STEPS
    weight_decay: float = WEIGHT_DECAY
    clip: float = 1.0
    val_every: int = 50
    val_batches: int = 4
    checkpoint_every: int = 100
    val_fraction: float = 0.02
    seed: int = 0
    precision: str = "ternary"  # or "full": the same architecture in full precision, the baseline
    tokenizer: str | None = None  # a model folder or GGUF whose tokenizer to use; None: the default model's
    train_tokenizer: int | None = None  # or a byte-level BPE vocabulary of this size learned from the data
    shard: bool = False  # under torchrun: FSDP2 rather than DDP
    autocast: str = "auto"  # "bf16": the forward's matmuls in bfloat16 (torch.autocast); "auto": where the CPU
    # multiplies bfloat16 natively (AVX512-BF16, AMX), 1.4x the steps a second there (tiny preset, Zen 4)


# Peak learning rates of a model started from a LLaMA checkpoint: the 700M preset's two thirds, not tuned (one run
# on SmolLM2-135M: see the README).
INIT_FROM_LR = (1e-3, 5e-4)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, AMX): where --autocast auto takes bf16."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def check_settings(s: TrainSettings):
    if (s.preset is None) == (s.init_from is None):
        raise TrillmError("trillm train needs either --preset or --init-from")
    if s.preset is not None and s.preset not in PRESETS:
        raise TrillmError(f"unknown preset {s.preset!r} (choose from {', '.join(PRESETS)})")
    if s.init_from is not None and (s.tokenizer or s.train_tokenizer):
        raise TrillmError("--init-from keeps the model's own tokenizer: drop --tokenizer / --train-tokenizer")
    if s.blend is not None and s.blend < 0:
        raise TrillmError("--blend must be 0 or more steps")
    if s.precision not in ("ternary", "full"):
        raise TrillmError(f"--precision {s.precision!r}: choose ternary or full")
    for name in ("steps", "batch_tokens", "seq_len", "micro_batch", "val_every", "val_batches", "checkpoint_every"):
        if getattr(s, name) < 1:
            raise TrillmError(f"--{name.replace('_', '-')} must be at least 1")
    if s.autocast not in ("auto", "none", "bf16"):
        raise TrillmError(f"--autocast {s.autocast!r}: choose auto, none or bf16")
    if s.lr and not s.lr[0] > s.lr[1] > 0:
        raise TrillmError(f"--lr {s.lr[0]:g} {s.lr[1]:g}: the second stage's peak must be positive and lower than "
                          f"the first's")
    if s.preset is not None:
        check_context(s, ModelShape.__dataclass_fields__["max_position_embeddings"].default)
    if s.batch_tokens < s.seq_len:
        raise TrillmError(f"--batch-tokens {s.batch_tokens} is less than one sequence (--seq-len {s.seq_len})")
    if not 0 < s.val_fraction < 0.5:
        raise TrillmError("--val-fraction must be between 0 and 0.5")


def check_context(s: TrainSettings, context: int):
    if s.seq_len > context:
        raise TrillmError(f"--seq-len {s.seq_len} is beyond the model's context of {context} positions")


def load_tokenizer(source: str | None):
    from trillm.checkpoint import open_checkpoint

    tokenizer = open_checkpoint(source).tokenizer()
    if tokenizer is None:
        raise TrillmError(f"--tokenizer {source}: that model has no tokenizer")
    return tokenizer


def evaluate(model, batches: TokenBatches, settings: TrainSettings) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for index in range(settings.val_batches):
            batch = batches.batch(0, index, settings.micro_batch, "validation")
            logits = model(batch[:, :-1])
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """The whole model's state dict, and the optimizer's keyed by parameter names, also from a sharded model
    (every process must then ask: the shares are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    return (get_model_state_dict(model, options=options),
            None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options))


def save_checkpoint(path: Path, model, optimizer, step: int, settings: TrainSettings, rank: int):
    """Every process calls it (a sharded model's state is gathered), rank 0 writes."""
    model_state, optimizer_state = full_state(model, optimizer)
    if rank != 0:
        return
    partial = path.with_suffix(".partial")
    torch.save({"model": model_state, "optimizer": optimizer_state, "step": step,
                "settings": asdict(settings), "shape": model.shape.to_dict()}, partial)
    os.replace(partial, path)


def distributed() -> tuple[int, int]:
    """(rank, world size): a run started by torchrun joins its process group, gloo (the model trains on the CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def train(settings: TrainSettings, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) the training; `stop_after` ends this run after that step, checkpoint saved, as an
    interrupted one would end. Under torchrun each of the processes takes every world-th micro-batch of
    each step's batch, DDP (or FSDP2, `shard`) averages the gradients, and rank 0 alone logs and writes
    checkpoints: the same steps as one process with the same batch, up to the order of the float sums."""
    from tqdm import tqdm

    check_settings(settings)
    rank, world = distributed()
    out = Path(settings.out)
    start_weights = None
    if settings.init_from:
        from trillm.train.init_from import llama_start

        shape, start_weights, tokenizer = llama_start(settings.init_from)
        check_context(settings, shape.max_position_embeddings)
    if rank != 0:  # rank 0 makes the vocabulary and the token file, the others then read them
        torch.distributed.barrier()
    if settings.train_tokenizer:
        tokenizer = train_tokenizer(settings.data, settings.train_tokenizer, out / "tokenizer")
    elif not settings.init_from:
        tokenizer = load_tokenizer(settings.tokenizer)
    tokens = tokenize_sources(settings.data, tokenizer, out / "data")
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    batches = TokenBatches(tokens, settings.seq_len, settings.val_fraction, settings.seed)
    if not settings.init_from:
        shape = preset_shape(settings.preset, tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                             eos_token_id=tokenizer.eos_id)
    torch.manual_seed(settings.seed)
    model = BitNetModel(shape, ternary=settings.precision == "ternary")
    if start_weights is not None:
        model.load_state_dict(start_weights)
    peaks = settings.lr or (INIT_FROM_LR if settings.init_from else PRESETS[settings.preset]["lr"])
    schedule = TwoStageSchedule(settings.steps, peaks, settings.warmup, settings.weight_decay)
    blend_steps = settings.blend if settings.blend is not None else schedule.warmup if settings.init_from else 0
    start, state = 0, None
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.is_file():  # resume: weights_only, so nothing but tensors and plain values is unpickled
        state = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(state["model"])
        start = state["step"]
    sharded = settings.shard and world > 1
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(decay_groups(model, schedule.decay(0)), lr=schedule.learning_rate(0), betas=BETAS)
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    out.mkdir(parents=True, exist_ok=True)
    sequences = settings.batch_tokens // settings.seq_len
    micro_batches = math.ceil(sequences / settings.micro_batch)
    if micro_batches < world:
        raise TrillmError(f"{micro_batches} micro-batches a step cannot keep {world} processes busy: raise "
                          f"--batch-tokens or lower --micro-batch")
    bf16 = settings.autocast == "bf16" or settings.autocast == "auto" and native_bf16()
    stepper = model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        stepper = DistributedDataParallel(model)

    def gradient_sync(last: bool):
        """The gradients are summed over the processes' micro-batches once, at the last one."""
        if world == 1:
            return contextlib.nullcontext()
        if sharded:
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else stepper.no_sync()

    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=settings.steps, initial=start, desc="training", unit="step", disable=not progress or rank != 0)
    completed, loss_value = start, float("nan")  # steps whose update the model holds
    val_loss, measured = None, None  # the latest validation loss, and (step, lambda) it measured
    if start_weights is not None and start == 0 and model.ternary:
        # The starting point: the model as it was (lambda 0) and ternarized without training (lambda 1).
        record = {"step": 0}
        for key, blend in (("val_loss_full_precision", 0.0), ("val_loss_ternarized", 1.0)):
            model.set_blend(blend)
            record[key] = evaluate(model, batches, settings)  # every process: a sharded model needs them all
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if progress and rank == 0:
            tqdm.write(f"validation loss before training: {record['val_loss_full_precision']:.4f} as it was, "
                       f"{record['val_loss_ternarized']:.4f} ternarized")
    try:
        model.train()
        for step in range(start, min(settings.steps, stop_after or settings.steps)):
            began = time.perf_counter()
            blend = min(1.0, (step + 1) / blend_steps) if blend_steps else 1.0
            model.set_blend(blend)
            lr, decay = schedule.learning_rate(step), schedule.decay(step)
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = decay
            total = torch.zeros(())
            mine = range(rank, micro_batches, world)
            for index, micro in enumerate(mine):
                count = min(settings.micro_batch, sequences - micro * settings.micro_batch)
                batch = batches.batch(step, micro, count)
                # DDP and FSDP average the processes' gradients: hence the factor world.
                with gradient_sync(index == len(mine) - 1), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    logits = stepper(batch[:, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) * count / sequences
                    (loss * world).backward()
                total += loss.detach()
            if world > 1:
                torch.distributed.all_reduce(total)
            total = total.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed, loss_value = step + 1, total
            record = {"step": step + 1, "loss": total, "lr": lr, "weight_decay": decay, "blend": blend,
                      "tokens_per_s": sequences * settings.seq_len / (time.perf_counter() - began)}
            if (step + 1) % settings.val_every == 0 or step + 1 == settings.steps:
                record["val_loss"] = val_loss = evaluate(model, batches, settings)
                measured = (step + 1, blend)
            if rank == 0:
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if completed % settings.checkpoint_every == 0:
                save_checkpoint(checkpoint_path, model, optimizer, completed, settings, rank)
    except KeyboardInterrupt:
        save_checkpoint(checkpoint_path, model, optimizer, completed, settings, rank)  # a later run resumes there
        raise
    finally:
        bar.close()
        if log:
            log.close()
    if completed != start and completed % settings.checkpoint_every:  # else saved already
        save_checkpoint(checkpoint_path, model, optimizer, completed, settings, rank)
    model.set_blend(1.0)  # the model as exported, also where the run ended inside the blend
    if measured != (completed, 1.0):  # else the last step measured this very model
        val_loss = evaluate(model, batches, settings)
    if sharded:  # the whole model, for the export
        whole = BitNetModel(shape, ternary=model.ternary)
        whole.load_state_dict(full_state(model)[0])
        model = whole
    return {"model": model, "tokenizer": tokenizer, "loss": loss_value, "rank": rank, "val_loss": val_loss}


def run_tokenizer(out: str | Path, settings: dict):
    """The tokenizer a run trained with (`settings` as its checkpoint holds them)."""
    from trillm.train.data import train_tokenizer

    trained = Path(out) / "tokenizer"
    if (trained / "tokenizer.json").is_file():
        return train_tokenizer([], 0, trained)
    return load_tokenizer(settings.get("init_from") or settings.get("tokenizer"))


def model_from_checkpoint(out: str | Path) -> tuple[BitNetModel, dict]:
    """The run's model (in eval mode) and its settings."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise TrillmError(f"{out}: no training checkpoint ({CHECKPOINT}) to export")
    state = torch.load(path, weights_only=True)
    model = BitNetModel(ModelShape(**state["shape"]), ternary=state["settings"]["precision"] == "ternary")
    model.load_state_dict(state["model"])
    return model.eval(), state["settings"]
