"""How wide a learning-rate range each method trains well in: steps to a target
against the (inner, for GN) learning rate, from 1/8 to 8 times the default in
factors of 2.

Methods: GN with the adaptive trust rule (the runner's default), GN with the paper's
fixed rule (``--trust fixed``), Muon and AdamW, every other setting at the runner's
defaults, on ``--model`` at each of ``--batch-sizes`` sequences a step.

The rule, declared before the runs:

- **Target**, per batch size: the validation loss AdamW at its default learning
  rate reaches at the end of a run of ``--target-steps`` (40) steps, run first.
- **Steps to target**: the first step at which the validation loss, evaluated at
  every step, is at or below the target (warm-up included; the run stops there),
  in runs of ``--steps`` (80) steps, so that every method has room to reach the
  target away from its best learning rate. A run that does not reach it within
  ``--steps`` has missed it.
- **Good range** of a method: the learning rates, contiguous around its best run
  (fewest steps; the larger learning rate on ties), whose steps to target are
  within ``--within`` (1.25) times the best. Its **width** is the ratio of its
  largest to its smallest learning rate (1 when only the best qualifies); a range
  that reaches an end of the grid is marked ``open`` (its width is a lower bound).

Every token a GN run reads (its line-search batches too) counts in
``tokens_to_target``. One seed per run: the widths are read on a factor-2 grid, and
the JSON holds every run for a reader who wants to check them.

Writes ``benchmarks/results/lr_robustness_<model>.json`` and beside it
``lr_robustness_<model>.png``, steps to target against the learning-rate factor
(``eqx-gn study --report`` puts both on the results page). ``--figure-only`` redraws
the figure from the JSON.

    python benchmarks/lr_robustness.py                      # tiny, 32 and 128
    python benchmarks/lr_robustness.py --batch-sizes 32 --out /tmp/lr.json
"""

import argparse
import datetime
import json
import math
import platform
import tempfile
from pathlib import Path

import jax

from eqx_gn import lm

RESULTS = Path(__file__).parent / "results"
#: Method name -> the TrainConfig settings that make it.
METHODS = {
    "gn-adaptive": dict(optimizer="gn", trust="adaptive"),
    "gn-fixed": dict(optimizer="gn", trust="fixed"),
    "muon": dict(optimizer="muon"),
    "adamw": dict(optimizer="adamw"),
}
FACTORS = [2.0**e for e in range(-3, 4)]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--text", default=None, help="default: the bundled corpus")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--target-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--within", type=float, default=1.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--figure-only", action="store_true")
    p.add_argument("--runs-dir", type=Path, help="default: a temporary directory")
    return p.parse_args()


def config_for(args, method: str, batch: int, factor: float, root: Path, **extra):
    extra = {"steps": args.steps, **extra}
    settings = METHODS[method]
    default = lm.DEFAULT_LEARNING_RATES[settings["optimizer"]]
    text = {} if args.text is None else {"text": args.text}
    return lm.TrainConfig(
        **text,
        model=args.model,
        batch_size=batch,
        lr=default * factor,
        eval_every=1,
        seed=args.seed,
        out=str(root / f"{method}_b{batch}_x{factor:g}"),
        checkpoint_every=0,
        overwrite=True,
        progress=False,
        **settings,
        **extra,
    )


def run(config: lm.TrainConfig) -> dict:
    try:
        summary = lm.train(config)
    except lm.Diverged:  # a missed target like any other; the summary is written
        summary = json.loads((Path(config.out) / "summary.json").read_text())
    lines = (Path(config.out) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    main = [r for r in records if r["phase"] == "main"]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    out = {
        "lr": config.lr,
        "steps_to_target": summary["steps_to_target"],
        "tokens_to_target": summary["tokens_to_target"],
        "steps_run": records[-1]["step"],
        "last_val_loss": vals[-1],
    }
    if config.is_gn:
        out["rejected_steps"] = sum(bool(r["rejected"]) for r in main)
        out["mean_step_size"] = sum(r["step_size"] for r in main) / len(main)
    return out


def good_range(runs: list[dict], within: float) -> dict:
    """The contiguous good range around the best run (see the module docstring)."""
    steps = [r["steps_to_target"] for r in runs]
    reached = [i for i, s in enumerate(steps) if s is not None]
    if not reached:
        return {"best_factor": None, "best_steps": None, "width": None}
    best = min(reached, key=lambda i: (steps[i], -i))
    ok = [s is not None and s <= within * steps[best] for s in steps]
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(runs) - 1 and ok[hi + 1]:
        hi += 1
    return {
        "best_factor": runs[best]["factor"],
        "best_lr": runs[best]["lr"],
        "best_steps": steps[best],
        "low_factor": runs[lo]["factor"],
        "high_factor": runs[hi]["factor"],
        "width": runs[hi]["factor"] / runs[lo]["factor"],
        "open": lo == 0 or hi == len(runs) - 1,
    }


def figure(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(result["batch_sizes"])
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8))
    axes = [axes] if len(batches) == 1 else axes
    for ax, batch in zip(axes, batches, strict=True):
        entry = result["batch_sizes"][batch]
        top = result["steps"] + 4
        for method, runs in entry["runs"].items():
            xs = [math.log2(r["factor"]) for r in runs]
            ys = [r["steps_to_target"] or top for r in runs]
            (line,) = ax.plot(xs, ys, marker="o", label=method)
            missed = [
                (x, y)
                for x, y, r in zip(xs, ys, runs, strict=True)
                if r["steps_to_target"] is None
            ]
            if missed:
                ax.plot(*zip(*missed, strict=True), "x", color=line.get_color(), ms=9)
        ax.axhline(result["steps"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{batch} sequences a step; target {entry['target']:.3f}")
        ax.set_xlabel("log2(learning rate / default)")
        ax.set_ylabel("steps to target (x: missed)")
        ax.set_yscale("log")
        ticks = [t for t in (5, 10, 15, 20, 30, 40, 60, 80, 120) if t <= top]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    args = parse()
    out = args.out or RESULTS / f"lr_robustness_{args.model}.json"
    if args.figure_only:
        figure(json.loads(out.read_text()), out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
        return
    root = args.runs_dir or Path(tempfile.mkdtemp(prefix="lr_robustness_"))
    result = {
        "what": "steps to target against the learning rate, x1/8 to x8 the "
        "default in factors of 2 (benchmarks/lr_robustness.py)",
        "rule": {
            "target": "AdamW's validation loss at its default learning rate at "
            f"the end of a {args.target_steps}-step run, per batch size",
            "budget": f"{args.steps} steps a run",
            "steps_to_target": "first step with validation loss <= target, "
            "evaluated at every step, warm-up included",
            "good_range": f"contiguous learning rates around the best run with "
            f"steps to target <= {args.within} x the best; width = largest / "
            "smallest; open = reaches an end of the grid (width a lower bound)",
        },
        "model": args.model,
        "text": args.text or "bundled",
        "steps": args.steps,
        "target_steps": args.target_steps,
        "seed": args.seed,
        "defaults": {
            m: lm.DEFAULT_LEARNING_RATES[s["optimizer"]] for m, s in METHODS.items()
        },
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}",
        "date": datetime.date.today().isoformat(),
        "batch_sizes": {},
    }
    for batch in args.batch_sizes:
        reference = run(
            config_for(
                args, "adamw", batch, 1.0, root / "reference", steps=args.target_steps
            )
        )
        target = reference["last_val_loss"]
        print(
            f"batch {batch}: target {target:.4f} (AdamW x1, {args.target_steps} steps)"
        )
        entry = {"target": target, "runs": {}, "good_range": {}}
        for method in args.methods:
            runs = []
            for factor in FACTORS:
                config = config_for(
                    args, method, batch, factor, root, target_loss=target
                )
                rec = {"factor": factor, **run(config)}
                runs.append(rec)
                print(
                    f"  {method:12s} x{factor:<6g} lr {rec['lr']:.5g}: "
                    f"{rec['steps_to_target']} steps"
                    + (
                        f", {rec['rejected_steps']} rejected"
                        if "rejected_steps" in rec
                        else ""
                    ),
                    flush=True,
                )
            entry["runs"][method] = runs
            entry["good_range"][method] = good_range(runs, args.within)
            print(f"  {method}: {entry['good_range'][method]}", flush=True)
        result["batch_sizes"][batch] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after each batch size
    for batch, entry in result["batch_sizes"].items():
        widths = {m: g["width"] for m, g in entry["good_range"].items()}
        print(
            f"batch {batch}: widths "
            + ", ".join(
                f"{m} {'-' if w is None else f'{w:g}x'}" for m, w in widths.items()
            )
        )
    print(f"wrote {out}")
    figure(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
