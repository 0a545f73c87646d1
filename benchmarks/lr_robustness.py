"""What a user meets who changes the learning rate: steps to the second-edition
study's target against the learning rate, from 1/64 to 64 times each method's
default in factors of 4 (issue 34, item 5).

On ``tiny`` and the bundled text, with the second-edition study's data, model,
warm-up, evaluation and line-search settings, its budget (the tokens of 160 steps
at 256 sequences) and its target (1.8197, the validation loss of
``benchmarks/results/study2_tiny``: the hard one, which tuned Muon reaches at 256
sequences only late), one seed (0):

- **GN** as a user runs it (``eqx-gn train --optimizer gn``: the model's inner
  step length, the fixed rule) with ``--lr`` at ``factor`` times its default, the
  fraction of the model's step of ``eqx_gn.lm.model_step_fraction`` (so x1 is the
  default run), at each batch size of ``--batch-sizes`` with K = 8 and K =
  batch/4 (the study's micro-batch of 4 sequences; one cell where they agree);
- **Muon** and **AdamW** at ``factor`` times their runner defaults at each batch
  size.

The rule, declared before the runs:

- **Steps to target**: the first step at which the validation loss is at or
  below the target (warm-up included; the run stops there), evaluated every
  ``--eval-every`` steps and at every step near the target (the study's
  ``eval_resolution``), so exact to one step. A run that does not reach it within
  the budget has missed it.
- **Good range** of a method: the learning rates, contiguous around its best run
  (fewest steps; the larger learning rate on ties), whose steps to target are
  within ``--within`` (1.25) times the best. Its **width** is the ratio of its
  largest to its smallest learning rate (1 when only the best qualifies); a range
  that reaches an end of the grid is marked ``open`` (its width is a lower bound).
  ``default_over_best`` is the default's steps over the best run's (the cost of
  not tuning, on this grid).

Every token a GN run reads (its line-search batches too) counts in
``tokens_to_target``. One seed per run: the JSON holds every run. GN's runs go
first, then Muon's, then AdamW's; the JSON is written after every run and
finished runs are reused from ``--runs-dir``, so the script can be stopped and
started again (and several invocations, each with its own ``--batch-sizes``,
``--ks`` or ``--baselines``, can share one ``--runs-dir``); a reused run is not
checked against today's code: after a change, use a new ``--runs-dir``.

Writes ``benchmarks/results/lr_robustness_tiny.json`` and beside it
``lr_robustness_tiny.png``, steps to target against the learning-rate factor
(``eqx-gn study --report`` puts both on the results page). ``--figure-only``
redraws the figure from the JSON.

    python benchmarks/lr_robustness.py --runs-dir /tmp/lr_robustness_runs
    python benchmarks/lr_robustness.py --batch-sizes 32 --out /tmp/lr.json
"""

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import jax
from default_gn import STUDY2, study_settings, train

from eqx_gn import lm
from eqx_gn.lm.study._protocol import Point

RESULTS = Path(__file__).parent / "results"
FACTORS = [4.0**e for e in range(-3, 4)]
BASELINES = ("muon", "adamw")


def parse():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 128, 32])
    p.add_argument("--ks", nargs="*", default=["quarter", "8"])
    p.add_argument("--baselines", nargs="*", default=list(BASELINES))
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--within", type=float, default=1.25)
    p.add_argument("--runs-dir", type=Path, default=Path("lr_robustness_runs"))
    p.add_argument("--out", type=Path, default=RESULTS / "lr_robustness_tiny.json")
    p.add_argument("--figure-only", action="store_true")
    return p.parse_args()


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
    default = next((r for r in runs if r["factor"] == 1.0), None)
    return {
        "best_factor": runs[best]["factor"],
        "best_lr": runs[best]["lr"],
        "best_steps": steps[best],
        "low_factor": runs[lo]["factor"],
        "high_factor": runs[hi]["factor"],
        "width": runs[hi]["factor"] / runs[lo]["factor"],
        "open": lo == 0 or hi == len(runs) - 1,
        "default_over_best": None
        if default is None or default["steps_to_target"] is None
        else default["steps_to_target"] / steps[best],
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
        top = entry["budget"] * 1.15
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
        ax.axhline(entry["budget"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{batch} sequences a step; target {entry['target']:.4f}")
        ax.set_xlabel("learning rate / default")
        ax.set_ylabel("steps to target (x: missed)")
        ax.set_yscale("log")
        factors = result["factors"]
        ax.set_xticks(
            [math.log2(f) for f in factors],
            [f"{f:g}" if f >= 1 else f"1/{1 / f:g}" for f in factors],
        )
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def gn_config(settings, target, batch, k, factor, root) -> lm.TrainConfig:
    """GN as a user runs it at ``batch`` sequences and K = ``k``, its ``--lr`` at
    ``factor`` times the default (the fraction of the model's step)."""
    base = dict(target_loss=target, eval_resolution=settings.eval_resolution)
    config = settings.train_config("gn", batch, Point(None, k), root, **base)
    return config.replace(
        lr=factor * config.learning_rate, out=str(root / f"gn_k{k}_x{factor:g}")
    )


def baseline_config(settings, target, method, batch, factor, root) -> lm.TrainConfig:
    lr = factor * lm.DEFAULT_LEARNING_RATES[method]
    return settings.train_config(
        method,
        batch,
        Point(lr),
        root / f"{method}_x{factor:g}",
        target_loss=target,
        eval_resolution=settings.eval_resolution,
    )


def main():
    args = parse()
    if args.figure_only:
        figure(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
        return
    settings, target = study_settings(args.eval_every)
    result = {
        "what": "steps to the second-edition study's target against the learning "
        "rate, x1/64 to x64 each method's default in factors of 4 "
        "(benchmarks/lr_robustness.py; issue 34)",
        "rule": {
            "target": f"{target:.4f}, the second-edition tiny study's "
            f"({STUDY2.relative_to(RESULTS.parent.parent)})",
            "budget": "the study's: the tokens of 160 steps at 256 sequences",
            "steps_to_target": "first step with validation loss <= target, "
            f"evaluated every {args.eval_every} steps and at every step near the "
            "target, warm-up included",
            "good_range": f"contiguous learning rates around the best run with "
            f"steps to target <= {args.within} x the best; width = largest / "
            "smallest; open = reaches an end of the grid (width a lower bound)",
        },
        "model": settings.model,
        "text": settings.text or "bundled",
        "target": target,
        "settings": settings.to_dict(),
        "seed": settings.seed,
        "factors": FACTORS,
        "defaults": {
            "gn": "the fraction of the model's step of "
            "eqx_gn.lm.model_step_fraction(micro-batch tokens)",
            **{m: lm.DEFAULT_LEARNING_RATES[m] for m in args.baselines},
        },
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}",
        "date": datetime.date.today().isoformat(),
        "batch_sizes": {},
    }

    def entry_of(batch):
        return result["batch_sizes"].setdefault(
            str(batch),
            {
                "target": target,
                "budget": settings.budget(batch),
                "runs": {},
                "good_range": {},
            },
        )

    def record(batch, label, factor, config):
        runs = entry_of(batch)["runs"].setdefault(label, [])
        rec = {"factor": factor, **train(config)}
        runs.append(rec)
        if len(runs) == len(FACTORS):
            entry_of(batch)["good_range"][label] = good_range(runs, args.within)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(
            f"b{batch} {label:8s} x{factor:<8g} lr {rec['lr']:.4g}: "
            f"{rec['steps_to_target']} steps "
            f"({rec.get('rejected_steps', 0)} rejected)",
            flush=True,
        )

    for batch in args.batch_sizes:
        root = args.runs_dir / f"b{batch}"
        for k in dict.fromkeys(
            batch // 4 if k == "quarter" else int(k) for k in args.ks
        ):
            for factor in FACTORS:
                config = gn_config(settings, target, batch, k, factor, root)
                record(batch, f"gn K={k}", factor, config)
    for method in args.baselines:
        for batch in args.batch_sizes:
            root = args.runs_dir / f"b{batch}"
            for factor in FACTORS:
                config = baseline_config(settings, target, method, batch, factor, root)
                record(batch, method, factor, config)
    for batch, entry in result["batch_sizes"].items():
        print(
            f"batch {batch}: "
            + ", ".join(
                f"{m} width {g['width']}{'+' if g.get('open') else ''}"
                for m, g in entry["good_range"].items()
            )
        )
    print(f"wrote {args.out}")
    figure(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
