"""Loss curves of training runs for a paper: validation and training loss against
optimizer steps, tokens read and training time, as PNG, PDF or SVG files.

`plot_runs` draws the runs of run, compare and study directories (read by
`eqx_gn.lm.results._saved_runs.load_runs`). The tokens axis counts every token a run read:
training tokens plus, for GN, the tokens of its line-search batches.

Figures are drawn with matplotlib's Agg canvas directly (no ``pyplot``), so
plotting works without a display and leaves no global state behind.
"""

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..run._console import corpus_name
from ._saved_runs import (
    METHODS,
    Run,
    labels_for,
    load_metrics as load_metrics,  # re-exported for eqx_gn.lm
    load_runs,
)

#: The x axes drawn, as (file suffix, axis label).
AXES: tuple[tuple[str, str], ...] = (
    ("steps", "optimizer step"),
    ("tokens", "tokens read (training + line search)"),
    ("time", "training time (s)"),
)
#: The file formats `plot_runs` writes.
FORMATS = ("png", "pdf", "svg")
#: One colour per method, whichever methods a figure shows (gray, C7, is kept
#: for the reference lines).
METHOD_COLORS = dict(
    zip(METHODS, ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"), strict=True)
)
WARMUP_LABEL = "end of AdamW warm-up"


def series(run: Run, axis: str) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """``(x, train_loss, x_val, val_loss)`` of ``run`` on ``axis`` (``"steps"``,
    ``"tokens"``: training plus line-search tokens, or ``"time"``)."""
    curve = run.curve
    if axis == "steps":
        x = list(curve["step"])
    elif axis == "tokens":
        x = [
            t + (ls or 0)
            for t, ls in zip(curve["tokens"], curve["ls_tokens"], strict=True)
        ]
    elif axis == "time":
        x = list(curve["time_s"])
    else:
        raise ValueError(f"axis must be one of steps, tokens, time; got {axis!r}")
    train = [
        (a, y) for a, y in zip(x, curve["train_loss"], strict=True) if y is not None
    ]
    val = [(a, y) for a, y in zip(x, curve["val_loss"], strict=True) if y is not None]
    return (
        [a for a, _ in train],
        [y for _, y in train],
        [a for a, _ in val],
        [y for _, y in val],
    )


def _distinct(values: Sequence[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None})


def default_title(runs: Sequence[Run], note: str | None = None) -> str:
    """``"tiny model, 4,096 tokens per step (64 sequences), Shakespeare"``: what
    the runs share (or their distinct values, joined by ``/``), and ``note`` on a
    second line."""

    def joined(values: Sequence[Any], spec: str = "{}") -> str | None:
        values = _distinct(values)
        return "/".join(spec.format(v) for v in values) if values else None

    parts = []
    model = joined([r.config.get("model") or r.summary.get("model") for r in runs])
    if model:
        parts.append(f"{model} model")
    per_step = joined([r.resolved.get("tokens_per_step") for r in runs], "{:,}")
    batch = joined([r.batch_size for r in runs], "{:,}")
    if per_step:
        parts.append(
            f"{per_step} tokens per step" + (f" ({batch} sequences)" if batch else "")
        )
    elif batch:
        parts.append(f"{batch} sequences per step")
    corpora = joined([corpus_name(r.config.get("text")) for r in runs if r.config])
    if corpora:
        parts.append(corpora)
    title = ", ".join(parts) or "loss curves"
    return f"{title}\n{note}" if note else title


def _colors(runs: Sequence[Run]) -> list[str]:
    """One colour per run: its method's when every run is of another method, else
    the first free one (never gray, C7, kept for reference lines)."""
    unique_methods = len({r.label for r in runs}) == len(runs)
    palette = [c for c in (f"C{i}" for i in range(10)) if c != "C7"]
    used: list[str] = []
    for i, run in enumerate(runs):
        color = METHOD_COLORS.get(run.label) if unique_methods else None
        if color is None or color in used:
            free = [c for c in palette if c not in used]
            color = free[0] if free else palette[i % len(palette)]
        used.append(color)
    return used


def gn_step_records(run: Run) -> list[dict[str, Any]]:
    """The metrics records of ``run``'s GN main steps that carry a trust scale
    (runs from before the trust rule have none); ``[]`` without a metrics file."""
    if not (Path(run.path) / "metrics.jsonl").is_file():
        return []
    return [r for r in load_metrics(run.path) if r.get("trust_scale") is not None]


def gn_steps_figure(runs: Sequence[Run], *, labels: Sequence[str], title: str):
    """The `matplotlib.figure.Figure` of GN's step decisions: per main step, the
    step size the line search chose (a rejection as an x at the axis' floor) and
    the trust scale the step's subproblem was solved at, log2 axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    rows = [
        (gn_step_records(run), label, color)
        for run, label, color in zip(runs, labels, _colors(runs), strict=True)
    ]
    sizes = [r["step_size"] for records, _, _ in rows for r in records]
    floor = min([s for s in sizes if s > 0], default=1.0) / 2
    for records, label, color in rows:
        if not records:
            continue
        steps = [r["step"] for r in records]
        taken = [r for r in records if r["step_size"] > 0]
        top.plot(
            [r["step"] for r in taken],
            [r["step_size"] for r in taken],
            color=color,
            marker=".",
            label=label,
        )
        rejected = [r["step"] for r in records if r["step_size"] <= 0]
        if rejected:
            top.plot(rejected, [floor] * len(rejected), "x", color=color)
        bottom.plot(steps, [r["trust_scale"] for r in records], color=color)
    top.set_yscale("log", base=2)
    top.set_ylabel("step size chosen\n(x: rejected)")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    bottom.set_yscale("log", base=2)
    bottom.set_ylabel("trust scale")
    bottom.set_xlabel("optimizer step")
    bottom.grid(True, alpha=0.3)
    fig.suptitle("\n".join(textwrap.fill(line, 80) for line in title.splitlines()))
    return fig


def curvature_records(run: Run) -> list[dict[str, Any]]:
    """The metrics records of ``run`` that carry a curvature record (``eqx-gn train
    --curvature-every``); ``[]`` without a metrics file or without such records."""
    if not (Path(run.path) / "metrics.jsonl").is_file():
        return []
    return [r for r in load_metrics(run.path) if r.get("curvature_top") is not None]


def curvature_series(run: Run) -> dict[str, Any]:
    """What `curvature_figure` draws of ``run``: ``step``, ``top`` (per record the
    largest eigenvalues of the GN matrix, largest first), ``trace`` and
    ``trace_stderr``, and for a layerwise run ``blocks`` (the block names) and
    ``block_traces`` (``{name: [trace per record]}``; absent otherwise)."""
    records = curvature_records(run)
    out: dict[str, Any] = {
        "step": [r["step"] for r in records],
        "top": [list(r["curvature_top"]) for r in records],
        "trace": [r["curvature_trace"] for r in records],
        "trace_stderr": [r["curvature_trace_stderr"] for r in records],
    }
    names = [r.get("curvature_blocks") for r in records]
    # A run's blocks are fixed by its model: every record names the same ones.
    if names and names[0] and all(n == names[0] for n in names):
        out["blocks"] = list(names[0])
        out["block_traces"] = {
            name: [r["curvature_block_traces"][k] for r in records]
            for k, name in enumerate(names[0])
        }
    return out


def curvature_figure(runs: Sequence[Run], *, labels: Sequence[str], title: str):
    """The `matplotlib.figure.Figure` of the curvature records against the step,
    log y axes: the largest eigenvalue of the GN matrix (solid, markers), the next
    ones (thin) and the Hutchinson trace (dashed) in one panel, one colour per run;
    with a layerwise run, a second panel of its blocks' traces (one colour per
    block, one line style per run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [
        (curvature_series(run), label, color)
        for run, label, color in zip(runs, labels, _colors(runs), strict=True)
    ]
    rows = [row for row in rows if row[0]["step"]]
    with_blocks = [row for row in rows if "blocks" in row[0]]
    fig = Figure(figsize=(7.0, 7.0 if with_blocks else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if with_blocks else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    for data, label, color in rows:
        steps = data["step"]
        count = min(len(t) for t in data["top"])
        for i in range(count):
            first = i == 0
            top.plot(
                steps,
                [t[i] for t in data["top"]],
                color=color,
                marker="o" if first else None,
                markersize=3,
                linewidth=1.5 if first else 0.7,
                alpha=1.0 if first else 0.5,
                label=f"{label}: eigenvalues 1-{count}" if first else None,
            )
        top.plot(
            steps, data["trace"], color=color, linestyle="--", label=f"{label}: trace"
        )
    top.set_yscale("log")
    top.set_ylabel("GN matrix (first validation batch)")
    top.set_title("largest eigenvalues (solid) and trace (dashed)", fontsize=9)
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=8)
    if with_blocks:
        ax = axes[1]
        styles = ("-", "--", ":", "-.")
        for j, (data, label, _) in enumerate(with_blocks):
            for k, name in enumerate(data["blocks"]):
                ax.plot(
                    data["step"],
                    data["block_traces"][name],
                    color=f"C{k % 10}",
                    linestyle=styles[j % len(styles)],
                    marker=".",
                    label=name if len(with_blocks) == 1 else f"{label}: {name}",
                )
        ax.set_yscale("log")
        ax.set_ylabel("trace of the block")
        ax.set_title("layerwise blocks' traces", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("\n".join(textwrap.fill(line, 80) for line in title.splitlines()))
    return fig


def loss_figure(
    runs: Sequence[Run],
    axis: str,
    *,
    labels: Sequence[str],
    title: str,
    log_y: bool = False,
    targets: Sequence[float] = (),
):
    """The `matplotlib.figure.Figure` of ``runs`` against ``axis`` (see `series`):
    validation loss with markers, training loss faint, one colour per method; a
    gray dashed line per target loss and, on the steps and tokens axes, a gray
    dotted line at the end of the AdamW warm-up (one per distinct step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, FuncFormatter

    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lows, highs = [], []
    for run, label, color in zip(runs, labels, _colors(runs), strict=True):
        x, train, x_val, val = series(run, axis)
        if train:
            ax.plot(x, train, color=color, alpha=0.3, linewidth=0.8)
        if val:
            ax.plot(x_val, val, color=color, marker="o", markersize=3, label=label)
        else:
            ax.plot([], [], color=color, label=label)
        # Training-loss spikes would squash the curves: the y range is set by the
        # validation losses and the first training loss of each run.
        lows += val + train
        highs += val + train[:1]
    if axis in ("steps", "tokens"):
        ends = []
        for run in runs:
            end = run.warmup_end
            if end is not None:
                index = run.curve["step"].index(end)
                ends.append(end if axis == "steps" else series(run, axis)[0][index])
        ends = _distinct(ends)
        for end in ends:
            label = WARMUP_LABEL if len(ends) == 1 else f"{WARMUP_LABEL} ({end:,})"
            ax.axvline(end, color="gray", linestyle=":", linewidth=1.0, label=label)
    for target in _distinct(targets):
        ax.axhline(
            target,
            color="gray",
            linestyle="--",
            linewidth=0.8,
            label=f"target loss {target:.4g}",
        )
        lows.append(target)
    if lows and highs:
        low, high = min(lows), max(highs)
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(low / 1.03, high * 1.03)
            # Plain numbers (2, 3, 4) rather than 2 x 10^0 on a loss axis.
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        else:
            margin = 0.03 * max(high - low, 1e-3)
            ax.set_ylim(low - margin, high + margin)
    elif log_y:
        ax.set_yscale("log")
    if axis == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(dict(AXES)[axis])
    ax.set_ylabel("loss (nats per token)")
    fig.suptitle("\n".join(textwrap.fill(line, 80) for line in title.splitlines()))
    ax.set_title("validation loss (markers), training loss (faint)", fontsize=9)
    ax.grid(True, which="both" if log_y else "major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_runs(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    log_y: bool = False,
    formats: Sequence[str] = ("png",),
    labels: Sequence[str] | None = None,
    batch_size: int | None = None,
    select: str = "best",
) -> list[Path]:
    """Plot the runs of ``sources`` (run, compare or study directories, see
    `load_runs`) into ``out_dir``; return the paths written.

    Writes ``loss_vs_steps``, ``loss_vs_tokens`` (training plus line-search
    tokens), ``loss_vs_time`` and, when a GN run recorded its trust scale,
    ``gn_steps`` (`gn_steps_figure`) and, when a run has curvature records,
    ``curvature`` (`curvature_figure`) in each of ``formats`` (``png``, ``pdf``,
    ``svg``), with a logarithmic loss axis if ``log_y``. The title defaults to
    what the runs share (model, tokens per step, corpus) and, for a study, which
    of its runs are shown. Labels default to `labels_for`.
    """
    if not sources:
        raise ValueError("no run directories to plot")
    formats = list(formats)
    for f in formats:
        if f not in FORMATS:
            raise ValueError(
                f"unknown plot format {f!r}; choose from {', '.join(FORMATS)}"
            )
    if not formats:
        raise ValueError("no plot format given")
    loaded = [load_runs(s, batch_size=batch_size, select=select) for s in sources]
    runs = [run for source in loaded for run in source.runs]
    if not runs:
        raise ValueError(f"no runs to plot in {', '.join(map(str, sources))}")
    if labels is None:
        labels = labels_for(runs)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    if title is None:
        notes = _distinct([s.note for s in loaded])
        title = default_title(runs, "; ".join(notes) or None)
    targets = [r.target for r in runs] + [s.target for s in loaded]
    targets = [t for t in targets if t is not None]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        f"loss_vs_{axis}": loss_figure(
            runs, axis, labels=labels, title=title, log_y=log_y, targets=targets
        )
        for axis, _ in AXES
    }
    if any(gn_step_records(run) for run in runs):
        figures["gn_steps"] = gn_steps_figure(runs, labels=labels, title=title)
    if any(curvature_records(run) for run in runs):
        figures["curvature"] = curvature_figure(runs, labels=labels, title=title)
    paths = []
    for name, fig in figures.items():
        for f in formats:
            path = out / f"{name}.{f}"
            fig.savefig(path, dpi=150 if f == "png" else None)
            paths.append(path)
    return paths
