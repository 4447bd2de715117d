"""Loss curves of one or more runs (their log.jsonl) in one PNG: training loss and validation loss by
step, the learning rate beneath, so that the stage-two change of the schedule lines up with the curves."""

import json
from pathlib import Path

from trillm.errors import TrillmError


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise TrillmError(f"{run}: no training log (log.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: dict[str, str | Path], png: str | Path, title: str = "") -> Path:
    """`runs`: label -> run folder (or log file)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot

    figure, (losses, rates) = pyplot.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for label, run in runs.items():
        log = read_log(run)
        records = [r for r in log if "loss" in r]  # the steps (a run from a LLaMA checkpoint logs its start too)
        steps = [r["step"] for r in records]
        line, = losses.plot(steps, [r["loss"] for r in records], linewidth=0.8, alpha=0.6, label=f"{label} train")
        validation = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        start = [r for r in log if "val_loss_ternarized" in r]
        if start:  # where it started: the model as it was, and ternarized without training
            validation.insert(0, (0, start[0]["val_loss_ternarized"]))
            losses.plot([0], [start[0]["val_loss_full_precision"]], marker="*", markersize=9, linestyle="none",
                        color=line.get_color(), label=f"{label}: the model as it was")
        if validation:
            losses.plot(*zip(*validation), marker="o", markersize=3, color=line.get_color(), label=f"{label} validation")
        rates.plot(steps, [r["lr"] for r in records], color=line.get_color(), label=label)
    losses.set_ylabel("cross-entropy (nats)")
    losses.legend()
    losses.grid(alpha=0.3)
    rates.set_ylabel("learning rate")
    rates.set_xlabel("step")
    rates.grid(alpha=0.3)
    if title:
        losses.set_title(title)
    figure.tight_layout()
    png = Path(png)
    figure.savefig(png, dpi=120)
    pyplot.close(figure)
    return png
