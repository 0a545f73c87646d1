"""A study's plots (`eqx_gn.lm.study`), drawn from ``study.json``'s content
alone, and their copy for the results page.
"""

import json
import shutil
from pathlib import Path
from typing import Any

COLORS = {
    "adamw": "C0",
    "muon": "C1",
    "soap": "C2",
    "psgd": "C6",
    "shampoo": "C7",
    "gn": "C3",
    "gn-layerwise": "C4",
    "gn-prox": "C5",
}


def draw_plots(result: dict[str, Any], out: Path) -> list[str]:
    """``steps_to_target.png`` (`steps_figure`) and ``loss_curves.png``
    (`curves_figure`), from ``result`` alone."""
    import matplotlib.pyplot as plt

    names = []
    for name, figure in (
        ("steps_to_target.png", steps_figure(result)),
        ("loss_curves.png", curves_figure(result)),
    ):
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        names.append(name)
    return names


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def steps_figure(result: dict[str, Any]):
    """The critical-batch-size figure: each method's median steps to the target
    over its seeds against the batch size, log-log, with the seeds' range as an
    error bar. Where the median missed the target within the run's budget, an
    open triangle stands at the budget (the steps are more than that: a lower
    bound), in the method's colour and without a line."""
    matplotlib, plt = _pyplot()
    settings, target = result["settings"], result["target"]
    budgets = result.get("budgets", {})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    any_missed = False
    # The methods that missed at each batch, so that their triangles, all at the
    # same budget, stand side by side (a few percent apart along the batch axis).
    missed_at: dict[str, list[str]] = {}
    for method, row in result["chosen"].items():
        for b, e in row.items():
            if e.get("median_steps") is None and e.get("missed_seeds"):
                missed_at.setdefault(b, []).append(method)
    for index, (method, row) in enumerate(result["chosen"].items()):
        color = _color(method, index)
        pts = sorted(
            (int(b), e["median_steps"], e["min_steps"], e["max_steps"])
            for b, e in row.items()
            if e.get("median_steps") is not None
        )
        missed = sorted(
            (_beside(int(b), missed_at[b].index(method), len(missed_at[b])), budgets[b])
            for b, e in row.items()
            if method in missed_at.get(b, ()) and b in budgets
        )
        if missed:
            any_missed = True
            ax.plot(*zip(*missed, strict=True), linestyle="none", marker="^",
                    markerfacecolor="none", markersize=8, color=color,
                    label=None if pts else method)  # fmt: skip
        if not pts:
            continue
        xs, ys, lows, highs = zip(*pts, strict=True)
        low = [
            y - (lo if lo is not None else y) for y, lo in zip(ys, lows, strict=True)
        ]
        high = [
            (hi if hi is not None else y) - y for y, hi in zip(ys, highs, strict=True)
        ]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, label=method,
                    color=color)  # fmt: skip
    if any_missed:
        ax.plot([], [], linestyle="none", marker="^", markerfacecolor="none",
                color="black", label="missed: at its budget")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = [int(b) for b in settings["batch_sizes"]]
    ax.set_xlim(min(batches) / 1.5, max(batches) * 1.5)
    _plain_ticks(ax.xaxis, matplotlib)
    _plain_ticks(ax.yaxis, matplotlib)
    ax.set_xlabel("batch size (sequences per step)")
    ax.set_ylabel("steps to target (median over seeds)")
    ax.set_title(f"{settings['model']} model: steps to validation loss {target:.3f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def curves_figure(result: dict[str, Any]):
    """The chosen runs (first seed) at the largest batch: validation loss against
    steps and training time, the target and the end of the warm-up drawn and
    labelled, the limits holding every loss from the end of the warm-up on."""
    _, plt = _pyplot()
    settings, target = result["settings"], result["target"]
    runs = {r["name"]: r for r in result["runs"]}
    largest = str(max(settings["batch_sizes"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = [target]  # every loss drawn, so that no curve is clipped
    warmups = set()
    for index, (method, row) in enumerate(result["chosen"].items()):
        entry = row.get(largest)
        if entry is None:
            continue
        warmup = entry.get("warmup_steps") or 0
        warmups.add(warmup)
        curve = runs[entry["run"]]["curve"]
        idx = [i for i, v in enumerate(curve["val_loss"]) if v is not None]
        losses = [curve["val_loss"][i] for i in idx]
        shown += [
            v for i, v in zip(idx, losses, strict=True) if curve["step"][i] >= warmup
        ]
        color = _color(method, index)
        a1.plot([curve["step"][i] for i in idx], losses, label=method, color=color)
        a2.plot([curve["time_s"][i] for i in idx], losses, label=method, color=color)
    finite = [v for v in shown if v == v and abs(v) != float("inf")]
    low, high = min(finite), max(finite)
    pad = 0.05 * (high - low) or 0.05
    for a, xlabel in ((a1, "step"), (a2, "training time (s)")):
        a.set_xlabel(xlabel)
        a.set_ylabel("validation loss")
        a.grid(True, alpha=0.3)
        a.axhline(target, color="grey", linestyle=":", linewidth=1,
                  label=f"target {target:.3f}")  # fmt: skip
        a.set_ylim(low - pad, high + pad)
    for warmup in sorted(warmups - {0}):
        a1.axvline(warmup, color="grey", linewidth=0.8, label="end of warm-up")
    a1.set_title(f"chosen runs, batch {largest} sequences")
    a1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _beside(x: int, k: int, n: int) -> float:
    """The ``k``-th of ``n`` points at ``x`` on a log axis, 6% apart, centred."""
    return x * 2.0 ** (0.08 * (k - (n - 1) / 2))


def _color(method: str, index: int) -> str:
    """A method's colour: its own, or the ``index``-th of the cycle (the methods
    of one figure each take their own index)."""
    return COLORS.get(method, f"C{index % 10}")


def _plain_ticks(axis, matplotlib) -> None:
    """Ticks of a log axis as plain numbers (20, 40, 60), not 2 x 10^1."""
    axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axis.get_major_formatter().set_scientific(False)
    axis.get_minor_formatter().set_scientific(False)


def copy_plots(study_dir: Path, assets: Path) -> list[Path]:
    """Copy a study's plots into ``assets`` (for the results page)."""
    assets.mkdir(parents=True, exist_ok=True)
    study = json.loads((study_dir / "study.json").read_text())
    copied = []
    names = study.get("plots") or [
        n
        for n in ("steps_to_target.png", "loss_curves.png")
        if (study_dir / n).exists()
    ]
    for name in names:
        shutil.copyfile(study_dir / name, assets / name)
        copied.append(assets / name)
    return copied
