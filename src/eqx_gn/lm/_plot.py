"""Loss curves of training runs: validation and training loss against optimizer
steps, training tokens and training time, as PNG files.

Figures are drawn with matplotlib's Agg canvas directly (no ``pyplot``), so
plotting works without a display and leaves no global state behind.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The x axes drawn, as (file suffix, metrics field, axis label).
AXES: tuple[tuple[str, str, str], ...] = (
    ("steps", "step", "optimizer step"),
    ("tokens", "tokens", "training tokens"),
    ("time", "time_s", "training time (s)"),
)


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order.

    **Raises:** `FileNotFoundError` if the file is missing, `ValueError` if a line
    is not JSON or the file has no records.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
    if not records:
        raise ValueError(f"{path} has no records yet")
    return records


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("config", {})


def _labels(run_dirs: Sequence[Path], configs: Sequence[dict[str, Any]]) -> list[str]:
    optimizers = [config.get("optimizer") for config in configs]
    if all(optimizers) and len(set(optimizers)) == len(optimizers):
        return [str(o) for o in optimizers]
    names = [d.name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Plot the runs in ``run_dirs`` into ``out_dir``; return the PNG paths.

    Writes ``loss_vs_steps.png``, ``loss_vs_tokens.png`` and ``loss_vs_time.png``:
    validation loss (lines with markers) and training loss (faint lines) of every
    run, one colour per run, labelled by optimizer (or by directory name when
    optimizers repeat). A dashed line marks the target loss when the runs have one,
    a dotted one the end of the warm-up on the step axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run_dirs:
        raise ValueError("no run directories to plot")
    dirs = [Path(d) for d in run_dirs]
    runs = [load_metrics(d) for d in dirs]
    configs = [_run_config(d) for d in dirs]
    if labels is None:
        labels = _labels(dirs, configs)
    if len(labels) != len(dirs):
        raise ValueError(f"{len(labels)} labels for {len(dirs)} runs")
    targets = {c.get("target_loss") for c in configs} - {None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, field, axis_label in AXES:
        fig = Figure(figsize=(7.0, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (records, label) in enumerate(zip(runs, labels, strict=True)):
            color = f"C{i % 10}"
            train = [(r[field], r["train_loss"]) for r in records if "train_loss" in r]
            val = [(r[field], r["val_loss"]) for r in records if "val_loss" in r]
            if train:
                x, y = zip(*train, strict=True)
                ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
            if val:
                x, y = zip(*val, strict=True)
                ax.plot(x, y, color=color, marker="o", markersize=3, label=label)
            elif train:
                ax.plot([], [], color=color, label=label)
            warmup = [r["step"] for r in records if r.get("phase") == "warmup"]
            if field == "step" and warmup:
                ax.axvline(max(warmup), color=color, linestyle=":", linewidth=0.8)
        # Training-loss spikes would squash the curves: the y range is set by the
        # validation losses and the first training loss of each run.
        ceiling = [
            r["val_loss"] for records in runs for r in records if "val_loss" in r
        ]
        ceiling += [records[0]["train_loss"] for records in runs]
        floor = [
            r[name]
            for records in runs
            for r in records
            for name in ("val_loss", "train_loss")
            if name in r
        ]
        low, high = min(floor), max(ceiling)
        margin = 0.03 * max(high - low, 1e-3)
        ax.set_ylim(low - margin, high + margin)
        for target in sorted(targets):
            ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel(axis_label)
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title or "validation loss (markers) and training loss (faint)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out / f"loss_vs_{suffix}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths
