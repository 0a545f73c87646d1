"""The default GN against the best fixed inner learning rate (issue 34's measure).

On ``tiny`` and the bundled text, with the second-edition study's data, model,
warm-up, evaluation and line-search settings and its target (1.8197, the
validation loss of ``benchmarks/results/study2_tiny``), for each batch size of
``--batch-sizes`` and each K of ``--ks`` (``quarter``: K = batch/4, the study's
micro-batch of 4 sequences; a number: that K):

- **default**: ``eqx-gn train --optimizer gn`` as a user runs it (no ``--lr``, no
  trust or inner-step flags: the model's inner step length, scaled by the
  default fraction of ``eqx_gn.lm.model_step_fraction``, 1 from micro-batches of
  768 tokens up and tokens / 768 below; the fixed rule), on seeds 0, 1 and 2;
- **tuned**: the paper's inner step (``--inner-step lr --trust fixed``), its inner
  learning rate chosen by the study's one tuning rule (`eqx_gn.lm.study`'s
  ``next_point``: a x3 grid around the start, walked until the best run has worse
  runs on both sides, then half a x3 step toward the better side; at most
  ``--max-runs`` runs) on seed 0, then the chosen rate on seeds 1 and 2. The walk
  of the first cell starts at ``--start`` (0.0073: the best fixed rate of issue 34's
  first measurement at 256 sequences, K = 64); each later cell starts at the rate
  chosen for the cell before it.

The budget of a run is the study's: the tokens of 160 steps at 256 sequences. A
run stops at the target; during the walk a run gives up at the step where the best
run so far reached it (it can then at best tie). Evaluated every
``--eval-every`` steps, and at every step near the target (the study's
``eval_resolution``), so steps to the target are exact to one step.

Per cell the JSON holds every run (its steps to the target, its rejected steps,
its trust scale's range and the fraction of main steps at which a scale or damping
sat at a bound) and ``ratio``: the default's median steps over the tuned rate's
median steps (issue 34 asks for at most 1.15); where the default's fraction is
not 1, ``fraction1`` holds the fraction 1 (the earlier default) on the same seeds
and ``fraction1_ratio`` its ratio. Then the same rule walks the
fraction of the model's step (``--inner-step model --lr F``, from 1) on seed 0,
to show which fraction each cell prefers (``chosen_fraction``). Finished runs are reused from
``--runs-dir`` (the script can be stopped and started again); the JSON is written
after every run.

    python benchmarks/default_gn.py --runs-dir /tmp/default_gn_runs
    python benchmarks/default_gn.py --batch-sizes 256 --ks quarter 8
"""

import argparse
import contextlib
import datetime
import json
import platform
import statistics
from pathlib import Path

import jax

from eqx_gn import lm
from eqx_gn.lm.study._protocol import Point, next_point, rank
from eqx_gn.lm.study._records import Settings

RESULTS = Path(__file__).parent / "results"
STUDY2 = RESULTS / "study2_tiny" / "study.json"
SEEDS = (0, 1, 2)


def parse():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 128, 32])
    p.add_argument("--ks", nargs="+", default=["quarter", "8"])
    p.add_argument("--start", type=float, default=0.0073)
    p.add_argument("--max-runs", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument(
        "--no-fraction-walk",
        dest="fraction_walk",
        action="store_false",
        help="skip the walk over the model step's fraction",
    )
    p.add_argument("--runs-dir", type=Path, default=Path("default_gn_runs"))
    p.add_argument("--out", type=Path, default=RESULTS / "default_gn_tiny.json")
    return p.parse_args()


def study_settings(eval_every: int) -> tuple[Settings, float]:
    """The second-edition tiny study's settings and target."""
    study = json.loads(STUDY2.read_text())
    values = dict(study["settings"])
    values.update(
        methods=tuple(values["methods"]),
        batch_sizes=tuple(values["batch_sizes"]),
        eval_every=eval_every,
        layout_check=False,
        timing_rounds=0,
    )
    return Settings(**values), study["target"]


def outcome(out: Path) -> dict | None:
    """A finished run's record from its directory, or None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return None
    if not summary.get("completed") and summary.get("diverged_at") is None:
        return None
    records = [json.loads(line) for line in lines if line.strip()]
    main = [r for r in records if r.get("phase") == "main"]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    scales = [r["trust_scale"] for r in main if r.get("trust_scale") is not None]
    damping = [r["damping"] for r in main if r.get("damping") is not None]
    return {
        "lr": config["resolved"]["learning_rate"],
        "inner_step": config["config"].get("inner_step"),
        "seed": config["config"]["seed"],
        "steps_to_target": summary.get("steps_to_target"),
        "tokens_to_target": summary.get("tokens_to_target"),
        "gave_up_at": summary.get("gave_up_at"),
        "diverged_at": summary.get("diverged_at"),
        "steps_run": records[-1]["step"] if records else 0,
        "best_val_loss": min(vals) if vals else None,
        "main_steps": len(main),
        "rejected_steps": sum(bool(r.get("rejected")) for r in main),
        "trust_scale_range": [min(scales), max(scales)] if scales else None,
        "damping_range": [min(damping), max(damping)] if damping else None,
        # A scale or damping "at a bound" is one held at the rule's clip; the
        # fixed rule (used by every run here) has neither, so 0 unless it moved.
        "at_bound_fraction": _at_bound(scales, damping),
    }


def _at_bound(scales: list[float], damping: list[float]) -> float:
    """Fraction of main steps at which the trust scale or the damping equals its
    extreme over the run while that extreme differs from its start (a rule held
    at a clip); 0 for a constant scale and damping."""
    worst = 0.0
    for series in (scales, damping):
        if not series or min(series) == max(series):
            continue
        for bound in (min(series), max(series)):
            if bound != series[0]:
                held = sum(abs(x - bound) <= 1e-9 * abs(bound) for x in series)
                worst = max(worst, held / len(series))
    return worst


def train(config: lm.TrainConfig) -> dict:
    out = Path(config.out)
    record = outcome(out)
    if record is None:
        with contextlib.suppress(lm.Diverged):  # a miss; its summary is written
            lm.train(config)
        record = outcome(out)
    return record


def median(values: list[int | None]) -> float | None:
    """The median steps, a missed run counting as infinitely many; None if it is
    a miss."""
    xs = sorted(float("inf") if v is None else v for v in values)
    m = statistics.median(xs)
    return None if m == float("inf") else m


def walk(
    args, settings, batch, k, start, root, inner_step, base, entry, write, known=()
):
    """The tuning rule's runs on seed 0 from ``start``: the inner learning rate
    (``inner_step="lr"``, the paper's step) or the fraction of the model's step
    (``"model"``), under the fixed rule; ``entry[f"walk_{inner_step}"]`` holds
    them; ``known`` are runs already made (the default's seed 0 is the fraction
    1). Returns ``[(Point, record)]``."""
    tried = list(known)
    while (point := next_point(start, tried, k, args.max_runs)) is not None:
        reached = [o["steps_to_target"] for _, o in tried if o["steps_to_target"]]
        give_up = min(reached) if reached else None
        name = "lr" if inner_step == "lr" else "fraction"
        config = settings.train_config(
            "gn",
            batch,
            point,
            root / f"{name}{point.lr:g}_s0",
            inner_step=inner_step,
            trust="fixed",
            give_up_after=give_up,
            **base,
        )
        tried.append((point, train(config)))
        entry[f"walk_{inner_step}"] = [record for _, record in tried]
        write(entry)
    return tried


def cell(args, settings, target, batch, k, start, write) -> dict:
    budget = settings.budget(batch)
    root = args.runs_dir / f"b{batch}_k{k}"
    entry = {"batch_size": batch, "micro_batches": k, "budget": budget, "start": start}
    base = dict(target_loss=target, eval_resolution=settings.eval_resolution)
    entry["default"] = []
    for seed in SEEDS:
        config = settings.train_config(
            "gn", batch, Point(None, k), root / f"default_s{seed}", seed=seed, **base
        )
        # The default's fraction at this cell's micro-batch (model_step_fraction);
        # runs of another fraction (an earlier default) are kept apart.
        fraction = config.learning_rate
        if fraction != 1:
            config = config.replace(out=str(root / f"default_f{fraction:.4g}_s{seed}"))
        entry["default"].append(train(config))
        entry["default_fraction"] = fraction
        write(entry)
    if entry["default_fraction"] != 1:
        # The earlier default, the model's step whole, on the same seeds.
        entry["fraction1"] = []
        for seed in SEEDS:
            config = settings.train_config(
                "gn", batch, Point(1.0, k), root / f"default_s{seed}", seed=seed, **base
            )
            config = config.replace(inner_step="model", trust="fixed")
            entry["fraction1"].append(train(config))
            write(entry)
    tried = walk(args, settings, batch, k, start, root, "lr", base, entry, write)
    best = min(tried, key=lambda t: rank(t[1]))
    entry["chosen_lr"] = best[0].lr
    entry["tuned"] = [best[1]]
    for seed in SEEDS[1:]:
        config = settings.train_config(
            "gn",
            batch,
            best[0],
            root / f"lr{best[0].lr:g}_s{seed}",
            seed=seed,
            inner_step="lr",
            trust="fixed",
            **base,
        )
        entry["tuned"].append(train(config))
        write(entry)
    d = median([r["steps_to_target"] for r in entry["default"]])
    t = median([r["steps_to_target"] for r in entry["tuned"]])
    entry["default_median_steps"] = d
    entry["tuned_median_steps"] = t
    entry["ratio"] = None if d is None or t is None else d / t
    if "fraction1" in entry:
        f1 = median([r["steps_to_target"] for r in entry["fraction1"]])
        entry["fraction1_median_steps"] = f1
        entry["fraction1_ratio"] = None if f1 is None or t is None else f1 / t
    entry["default_max_at_bound_fraction"] = max(
        r["at_bound_fraction"] for r in entry["default"]
    )
    write(entry)
    if args.fraction_walk:
        # From the fraction 1 (the model's step whole), on seed 0.
        whole = entry.get("fraction1", entry["default"])[0]
        fractions = walk(
            args,
            settings,
            batch,
            k,
            1.0,
            root,
            "model",
            base,
            entry,
            write,
            [(Point(1.0, k), whole)],
        )
        entry["chosen_fraction"] = min(fractions, key=lambda t: rank(t[1]))[0].lr
    entry["complete"] = True  # a cell without it was stopped part way
    write(entry)
    print(
        f"b{batch} K={k}: default {[r['steps_to_target'] for r in entry['default']]}"
        f" tuned lr {best[0].lr:g} {[r['steps_to_target'] for r in entry['tuned']]}"
        f" ratio {entry['ratio']}",
        flush=True,
    )
    return entry


def main():
    args = parse()
    settings, target = study_settings(args.eval_every)
    result = {
        "what": "the default GN against the best fixed inner learning rate "
        "(benchmarks/default_gn.py; issue 34)",
        "target": target,
        "target_source": str(STUDY2.relative_to(RESULTS.parent.parent)),
        "settings": settings.to_dict(),
        "seeds": list(SEEDS),
        "max_runs": args.max_runs,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}",
        "date": datetime.date.today().isoformat(),
        "cells": {},
    }
    if args.out.exists():  # keep the cells of earlier invocations
        result["cells"] = json.loads(args.out.read_text()).get("cells", {})
    start = args.start
    for batch in args.batch_sizes:
        for k in dict.fromkeys(
            batch // 4 if k == "quarter" else int(k) for k in args.ks
        ):
            name = f"b{batch}_k{k}"

            def write(entry, name=name):
                result["cells"][name] = entry
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")

            start = cell(args, settings, target, batch, k, start, write)["chosen_lr"]
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
