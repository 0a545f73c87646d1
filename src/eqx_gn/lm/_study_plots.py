"""A study's plots (`eqx_gn.lm._study`), drawn from ``study.json``'s content
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
    "gn": "C3",
    "gn-layerwise": "C4",
    "gn-prox": "C5",
}


def draw_plots(result: dict[str, Any], out: Path) -> list[str]:
    """``steps_to_target.png`` (chosen runs, steps against tokens per step) and
    ``loss_curves.png`` (chosen runs at the largest batch: validation loss against
    steps and training time), from ``result`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, target = result["settings"], result["target"]
    runs = {r["name"]: r for r in result["runs"]}
    seq = next(iter(runs.values()))["resolved"].get("seq_len") if runs else None
    seq = seq or 1
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, row in result["chosen"].items():
        pts = sorted(
            (int(b) * seq, e["steps_to_target"])
            for b, e in row.items()
            if e["steps_to_target"] is not None
        )
        if pts:
            ax.plot(
                *zip(*pts, strict=False), "o-", label=method, color=COLORS.get(method)
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_ticks(ax.yaxis, matplotlib)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("steps to target")
    ax.set_title(f"{settings['model']} model: steps to validation loss {target:.3f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(out / "steps_to_target.png", dpi=110)
    plt.close(fig)

    largest = str(max(settings["batch_sizes"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = [target]  # every loss drawn, so that no curve is clipped
    warmup = result.get("warmup_steps") or 0
    for method, row in result["chosen"].items():
        entry = row.get(largest)
        if entry is None:
            continue
        curve = runs[entry["run"]]["curve"]
        idx = [i for i, v in enumerate(curve["val_loss"]) if v is not None]
        losses = [curve["val_loss"][i] for i in idx]
        shown += [
            v for i, v in zip(idx, losses, strict=True) if curve["step"][i] >= warmup
        ]
        color = COLORS.get(method)
        a1.plot([curve["step"][i] for i in idx], losses, label=method, color=color)
        a2.plot([curve["time_s"][i] for i in idx], losses, label=method, color=color)
    finite = [v for v in shown if v == v and abs(v) != float("inf")]
    low, high = min(finite), max(finite)
    pad = 0.05 * (high - low) or 0.05
    for a, xlabel in ((a1, "step"), (a2, "training time (s)")):
        a.set_xlabel(xlabel)
        a.set_ylabel("validation loss")
        a.grid(True, alpha=0.3)
        a.axhline(
            target,
            color="grey",
            linestyle=":",
            linewidth=1,
            label=f"target {target:.3f}",
        )
        # From the end of the warm-up down: the curves whole, the target inside.
        a.set_ylim(low - pad, high + pad)
    if warmup:
        a1.axvline(warmup, color="grey", linewidth=0.8, label="end of warm-up")
    a1.set_title(f"chosen runs, batch {largest} sequences")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    return ["steps_to_target.png", "loss_curves.png"]


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
