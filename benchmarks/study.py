"""The study: steps, tokens and time to a target validation loss, per optimizer and
batch size, on real text (the bundled Shakespeare corpus), driven by the runner.

1. AdamW at the largest batch size (or ``--target-batch``), over its learning-rate
   grid: the target is the best validation loss it reaches within the step budget.
2. Every method at every batch size, over its learning-rate grid (the same grid
   size and step budget for every method; GN's grid is its inner learning rate),
   with the same AdamW warm-up, stopping at the target. For each (method, batch
   size) the best learning rate is the one reaching the target in the fewest steps;
   where it is at an edge of the grid, one more learning rate 3x further out is
   tried (the same rule for every method).
3. With ``--refine``: two more runs per method at the largest batch, the same extra
   budget for every method. A baseline tries its best learning rate times and
   divided by 3^(1/2); GN keeps its learning rate and tries 2x and 4x the
   micro-batches K at the same tokens per step (more, smaller inner steps, which
   the paper's notes found to matter).
4. With ``--seeds N > 1``: each method's chosen configuration at the largest batch
   again with N - 1 more seeds (model initialisation and data order), against the
   same target, to show how far steps-to-target moves with the seed alone.
5. A table (stdout and JSON) and plots: steps-to-target against tokens per step on
   log-log axes (the critical-batch-size picture), and validation loss against
   steps and time at the largest batch.

Results: ``--out`` holds one ``study.json`` (the target, the study's settings,
tables, claims, and every run: its configuration, summary, steps/tokens/time to
the target and its curves); the plots (in ``--plots-dir``, default ``--out``) are
drawn from it. Each run trains in its own directory under ``--runs-dir`` (default
``runs/study/<name of --out>``, not tracked). A run is not trained again when its
directory has a ``summary.json`` or ``study.json`` already holds it, so the study
resumes where it stopped (across sessions too) and ``--report-only`` redraws the
tables and plots from ``study.json`` alone, on a fresh clone.

Methods are ``adamw``, ``muon``, ``soap`` and ``gn[-layerwise][-prox|-cg]``
(`method_config` gives the runner's fields for each).

    python benchmarks/study.py                                  # CPU, tiny model
    python benchmarks/study.py --steps 300 --eval-batches 16 --refine --seeds 3
    python benchmarks/study.py --model small --seq 256 --batch-sizes 64,128,256,1024
"""

import argparse
import json
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_GRIDS = {
    "adamw": (3e-3, 1e-2, 3e-2),
    "muon": (1e-2, 3e-2, 1e-1),
    "soap": (3e-3, 1e-2, 3e-2),
    "gn": (1e-2, 3e-2, 1e-1),
    "gn-layerwise": (1e-2, 3e-2, 1e-1),
    "gn-prox": (1e-2, 3e-2, 1e-1),
}
BASELINES = ("adamw", "muon", "soap")
# The old runner folded GN's block structure and solver into the optimizer name.
_OLD_GN_NAMES = {"gn-layerwise": ("layerwise", "inner"), "gn-prox": ("full", "prox")}


def method_config(method: str) -> dict:
    """The runner's ``TrainConfig`` fields for a method name: a baseline's name is
    its optimizer; ``gn[-layerwise][-prox|-cg]`` is ``optimizer="gn"`` with
    ``blocks`` ``"full"`` (default) or ``"layerwise"`` and ``solver`` ``"inner"``
    (default), ``"prox"`` or ``"cg"``."""
    if method in BASELINES:
        return {"optimizer": method}
    parts = method.split("-")
    blocks, solver = "full", "inner"
    if parts[0] == "gn" and parts[1:2] == ["layerwise"]:
        blocks, parts = "layerwise", parts[:1] + parts[2:]
    if parts[0] == "gn" and len(parts) == 2 and parts[1] in ("prox", "cg"):
        solver, parts = parts[1], parts[:1]
    if parts != ["gn"]:
        raise ValueError(
            f"unknown method {method!r}; use adamw, muon, soap or "
            "gn[-layerwise][-prox|-cg]"
        )
    return {"optimizer": "gn", "blocks": blocks, "solver": solver}


def method_name(config: dict) -> str:
    """The method name of a run's configuration (``config.json``'s ``"config"``),
    old (``optimizer="gn-layerwise"``) or new (``optimizer="gn"``, ``blocks``,
    ``solver``); the inverse of `method_config`."""
    optimizer = config["optimizer"]
    if optimizer in _OLD_GN_NAMES:
        blocks, solver = _OLD_GN_NAMES[optimizer]
    elif optimizer == "gn":
        blocks, solver = "full", "inner"
    else:
        return optimizer
    blocks = config.get("blocks") or blocks
    solver = config.get("solver") or solver
    layerwise = "-layerwise" if blocks == "layerwise" else ""
    return "gn" + layerwise + ("" if solver == "inner" else f"-{solver}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch-sizes", default="32,64,128,512", help="sequences per step")
    p.add_argument("--methods", default=",".join(DEFAULT_GRIDS))
    p.add_argument(
        "--steps", type=int, default=120, help="step budget, warm-up included"
    )
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--micro-batches", type=int, default=8, help="GN: K")
    p.add_argument("--ls-batches", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--grid-size", type=int, default=3, help="learning rates per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--target-batch",
        type=int,
        default=None,
        help="the batch size at which AdamW sets the target (default: the largest); "
        "lets a later invocation add a larger batch against the same target",
    )
    p.add_argument(
        "--tag",
        default="",
        help="a report over another subset of the runs, kept in study.json under "
        "reports[TAG] (the runs are shared); plots get the suffix TAG",
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="two more runs per method at the largest batch: learning rate x/÷ 3^(1/2) "
        "for the baselines, 2x and 4x the micro-batches K for GN",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds for each method's chosen configuration at the largest batch",
    )
    p.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results" / "study"),
        help="where study.json goes (and the plots, without --plots-dir)",
    )
    p.add_argument(
        "--runs-dir",
        default=None,
        help="per-run directories (default: runs/study/<name of --out>, untracked)",
    )
    p.add_argument("--plots-dir", default=None, help="default: --out")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="tabulate and plot finished runs (from --runs-dir or study.json)",
    )
    return p.parse_args(argv)


# The study's settings recorded in study.json: the arguments that define the runs
# and the report, not where the files go.
_NOT_SETTINGS = ("out", "runs_dir", "plots_dir", "report_only")


def settings_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}


def run_name(method, batch, lr, seed_offset=0, k=None) -> str:
    """``{method}_b{batch}_lr{lr}``, then ``_K{k}`` for a GN run whose number of
    micro-batches is not the study's default, and ``_seed+{offset}`` for a repeat."""
    name = f"{method}_b{batch}_lr{lr:g}"
    if k is not None:
        name += f"_K{k}"
    if seed_offset:
        name += f"_seed+{seed_offset}"
    return name


#: A run's curve in study.json: one value per step (``val_loss`` None where the
#: step had no evaluation; ``ls_tokens`` 0 for a first-order run).
CURVE_KEYS = ("step", "phase", "tokens", "ls_tokens", "time_s", "train_loss")
CURVE_KEYS += ("val_loss",)


def curve_of(records) -> dict:
    """The curve of a run from its ``metrics.jsonl`` records."""
    defaults = {"ls_tokens": 0}
    return {k: [r.get(k, defaults.get(k)) for r in records] for k in CURVE_KEYS}


def reached(curve: dict, target: float | None) -> dict:
    """Step, tokens and training time of the first evaluation at or below target."""
    for i, loss in enumerate(curve["val_loss"]):
        if target is not None and loss is not None and loss <= target:
            return {
                "target_reached": True,
                "steps_to_target": curve["step"][i],
                "tokens_to_target": curve["tokens"][i],
                "time_to_target": curve["time_s"][i],
            }
    return {
        "target_reached": False,
        "steps_to_target": None,
        "tokens_to_target": None,
        "time_to_target": None,
    }


def read_run_dir(path: Path) -> dict | None:
    """A finished run's record (see `record`) from its directory, or None when it
    has no ``summary.json``."""
    if not (path / "summary.json").exists():
        return None
    summary = json.loads((path / "summary.json").read_text())
    config = json.loads((path / "config.json").read_text())
    lines = (path / "metrics.jsonl").read_text().splitlines()
    curve = curve_of([json.loads(line) for line in lines])
    return record(path.name, config["config"], config["resolved"], summary, curve)


def record(name, config, resolved, summary, curve, target=None) -> dict:
    """A run as study.json holds it; steps/tokens/time to ``target`` from its
    curve (`with_target` recomputes them for another target)."""
    hit = reached(curve, target)
    return {
        "name": name,
        "method": method_name(config),
        "batch_size": config["batch_size"],
        "seed": config["seed"],
        "hyperparameters": {
            "lr": config["lr"],
            "micro_batches": config["micro_batches"],
        },
        "config": config,
        "resolved": resolved,
        "steps_to_target": hit["steps_to_target"],
        "tokens_to_target": hit["tokens_to_target"],
        "time_to_target": hit["time_to_target"],
        "final_val_loss": summary.get("final_val_loss"),
        "best_val_loss": summary.get("best_val_loss"),
        "summary": summary,
        "curve": curve,
    }


def with_target(rec: dict, target) -> dict:
    """``rec`` with its steps, tokens and time to ``target`` recomputed."""
    hit = reached(rec["curve"], target)
    keys = ("steps_to_target", "tokens_to_target", "time_to_target")
    return {**rec, **{key: hit[key] for key in keys}}


def known_runs(study: dict, runs_dir: Path) -> dict:
    """Every finished run, by name: those in a previous ``study.json``, updated
    from the per-run directories under ``runs_dir`` where they exist."""
    known = {rec["name"]: rec for rec in study.get("runs", [])}
    if runs_dir.is_dir():
        for path in sorted(runs_dir.iterdir()):
            rec = read_run_dir(path) if path.is_dir() else None
            if rec is not None:
                known[rec["name"]] = rec
    return known


def _summary_of(entry):
    """The fields of a run summary that ``_rank`` and the tables read, from a table
    entry."""
    keys = ("steps_to_target", "tokens_to_target", "time_to_target", "best_val_loss")
    return {key: entry[key] for key in keys}


def _rank(summary):
    steps = summary["steps_to_target"]
    return (steps if steps is not None else float("inf"), summary["best_val_loss"])


def run(args, known, runs_dir, method, batch, lr, target, seed_offset=0, k=None):
    """The run's summary, with steps/tokens/time to ``target`` read off its curve.

    A finished run (in ``known``) is reused when it ran its whole step budget, or
    stopped at a target no higher than this one (so its curve shows when it crossed
    this one). With ``--report-only``, a run that would have to be trained gives
    None. A trained run is added to ``known``.
    """
    name = run_name(method, batch, lr, seed_offset, k)
    rec = known.get(name)
    if rec is not None:
        summary = rec["summary"]
        stopped_at = summary.get("target_loss")
        whole_budget = summary.get("steps") == args.steps
        lower = target is not None and stopped_at is not None and stopped_at <= target
        if summary.get("completed", True) and (whole_budget or lower):
            return {**summary, **reached(rec["curve"], target)}
    if args.report_only:
        return None
    from eqx_gn import lm

    config = lm.TrainConfig(
        model=args.model,
        seq_len=args.seq,
        **method_config(method),
        steps=args.steps,
        batch_size=batch,
        micro_batches=args.micro_batches if k is None else k,
        ls_batches=args.ls_batches,
        lr=lr,
        warmup_fraction=args.warmup_fraction,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        target_loss=target,
        seed=args.seed + seed_offset,
        out=str(runs_dir / name),
        checkpoint_every=0,
        overwrite=True,
        progress=False,
    )
    start = time.perf_counter()
    lm.train(config)
    rec = known[name] = read_run_dir(runs_dir / name)
    summary = {**rec["summary"], **reached(rec["curve"], target)}
    print(
        f"{method:>13} b={batch:<5} lr={lr:<7g} "
        + (f"K={config.micro_batches} " if method.startswith("gn") else "")
        + f"seed={config.seed} final {summary['final_val_loss']:.4f} "
        f"target@{summary['steps_to_target']} ({time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return summary


# One colour per method in every plot, whichever methods a report includes.
COLORS = {"adamw": "C0", "muon": "C1", "soap": "C2", "gn": "C3"}
COLORS |= {"gn-layerwise": "C4", "gn-prox": "C5"}


def claims(table, batches, refined=False, warmup=0):
    """The issue's four checks, as ratios (None where a run is missing or a target was
    not reached): the best baseline's steps over GN's at the largest batch, GN's
    time to target over the fastest baseline's, layerwise GN's steps over full GN's,
    and each method's steps at the second-largest batch over its steps at the
    largest (above 1: still gaining from the larger batch). Step counts include the
    shared AdamW warm-up; the ``*_after_warmup`` ratios count the steps after it,
    as the paper counts steps after its AdamW pre-training. With ``refined``, the
    largest batch's entries are the refined ones, and the batch-size check is left
    out (the smaller batches had no refinement, so it would compare protocols)."""
    large, second = str(batches[-1]), str(batches[-2]) if len(batches) > 1 else None

    def at(method, batch, key):
        entry = table.get(method, {}).get(batch)
        if entry is None:
            return None
        if refined and batch == large:
            entry = entry.get("refined", entry)
        return entry[key]

    def ratio(a, b, offset=0):
        return None if a is None or b is None else (a - offset) / (b - offset)

    baseline_steps = [at(m, large, "steps_to_target") for m in BASELINES]
    baseline_steps = [v for v in baseline_steps if v is not None]
    baseline_times = [at(m, large, "time_to_target") for m in BASELINES]
    baseline_times = [v for v in baseline_times if v is not None]
    best_baseline = min(baseline_steps, default=None)
    gn, layerwise = (at(m, large, "steps_to_target") for m in ("gn", "gn-layerwise"))
    checks = {
        "best_baseline_steps_over_gn": ratio(best_baseline, gn),
        "best_baseline_steps_over_gn_after_warmup": ratio(best_baseline, gn, warmup),
        "gn_time_over_fastest_baseline": ratio(
            at("gn", large, "time_to_target"), min(baseline_times, default=None)
        ),
        "layerwise_steps_over_gn": ratio(layerwise, gn),
        "layerwise_steps_over_gn_after_warmup": ratio(layerwise, gn, warmup),
    }
    if not refined:
        checks["steps_second_largest_over_largest"] = {
            method: ratio(
                at(method, second, "steps_to_target"),
                at(method, large, "steps_to_target"),
            )
            for method in table
        }
    return checks


def plot(out: Path, table, known, methods, batches, tokens_per_seq, target, tag):
    """The two figures, from the table and the runs' curves (study.json alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in methods:
        xs, ys = [], []
        for batch in batches:
            entry = table.get(method, {}).get(str(batch))
            if entry is not None and entry["steps_to_target"] is not None:
                xs.append(batch * tokens_per_seq)
                ys.append(entry["steps_to_target"])
        if xs:
            (line,) = ax.plot(xs, ys, "o-", label=method, color=COLORS.get(method))
            refined = table[method].get(str(max(batches)), {}).get("refined")
            if refined is not None and refined["steps_to_target"] is not None:
                ax.plot(
                    [max(batches) * tokens_per_seq],
                    [refined["steps_to_target"]],
                    "*",
                    markersize=11,
                    color=line.get_color(),
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("steps to target validation loss")
    ax.set_title("Steps to target against batch size (*: refined)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(out / f"steps_to_target{tag}.png", dpi=120)
    plt.close(fig)

    largest = str(max(batches))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in methods:
        entry = table.get(method, {}).get(largest)
        if entry is None:
            continue
        curve = known[entry.get("refined", entry)["run"]]["curve"]
        evals = [i for i, loss in enumerate(curve["val_loss"]) if loss is not None]
        steps = [curve["step"][i] for i in evals]
        times = [curve["time_s"][i] for i in evals]
        losses = [curve["val_loss"][i] for i in evals]
        a1.plot(steps, losses, label=method, color=COLORS.get(method))
        a2.plot(times, losses, label=method, color=COLORS.get(method))
    for a, xlabel in ((a1, "step"), (a2, "training time (s)")):
        a.set_xlabel(xlabel)
        a.set_ylabel("validation loss")
        a.grid(True, alpha=0.3)
        a.axhline(target, color="grey", linestyle=":", linewidth=1)
        a.set_ylim(target - 0.1, target + 1.5)
    a1.set_title(f"Validation loss, batch {largest} sequences")
    a1.legend()
    fig.tight_layout()
    fig.savefig(out / f"loss_curves{tag}.png", dpi=120)
    plt.close(fig)


def main():
    args = parse()
    out = Path(args.out)
    runs_dir = Path(args.runs_dir or REPO / "runs" / "study" / out.name)
    plots_dir = Path(args.plots_dir or out)
    methods = args.methods.split(",")
    try:
        grids = {m: grid_of(m)[: args.grid_size] for m in methods}
    except ValueError as error:
        raise SystemExit(f"--methods: {error}") from None
    batches = sorted(int(b) for b in args.batch_sizes.split(","))
    largest = batches[-1]
    study_file = out / "study.json"
    previous = json.loads(study_file.read_text()) if study_file.exists() else {}
    known = known_runs(previous, runs_dir)

    def run_(method, batch, lr, target, seed_offset=0, k=None):
        return run(args, known, runs_dir, method, batch, lr, target, seed_offset, k)

    # 1. The target: AdamW's best validation loss at the largest batch.
    target_batch = largest if args.target_batch is None else args.target_batch
    adamw_grid = DEFAULT_GRIDS["adamw"][: args.grid_size]
    adamw = [run_("adamw", target_batch, lr, None) for lr in adamw_grid]
    adamw = [s for s in adamw if s is not None]
    if not adamw:
        raise SystemExit(
            f"no finished AdamW run at batch {target_batch} in {study_file} "
            f"or under {runs_dir}"
        )
    target = min(s["best_val_loss"] for s in adamw)
    print(
        f"target validation loss (AdamW's best at batch {target_batch}): {target:.4f}",
        flush=True,
    )

    # 2. Every method and batch size, stopping at the target.
    table = {}
    for batch in reversed(batches):
        for method in methods:
            grid = list(grids[method])
            entries = [(lr, run_(method, batch, lr, target)) for lr in grid]
            entries = [(lr, s) for lr, s in entries if s is not None]
            if not entries:  # --report-only, and none of these has run yet
                continue
            # The same rule for every method: when the best learning rate sits at an
            # edge of the grid, try one more, 3x further out.
            best = min(entries, key=lambda e: _rank(e[1]))[0]
            if best in (grid[0], grid[-1]):
                extra = best / 3 if best == grid[0] else best * 3
                summary = run_(method, batch, extra, target)
                if summary is not None:
                    entries.append((extra, summary))
            reached = [
                (s["steps_to_target"], s["final_val_loss"], lr, s)
                for lr, s in entries
                if s["target_reached"]
            ]
            if reached:
                steps, _, lr, s = min(reached, key=lambda r: (r[0], r[1]))
            else:
                lr, s = min(entries, key=lambda e: e[1]["best_val_loss"])
                steps = None
            table.setdefault(method, {})[str(batch)] = {
                "run": run_name(method, batch, lr),
                "lr": lr,
                "steps_to_target": steps,
                "tokens_to_target": s["tokens_to_target"],
                "time_to_target": s["time_to_target"],
                "best_val_loss": s["best_val_loss"],
                "time_per_step": s["time_s"] / max(s["steps"], 1),
                "lr_sweep": {f"{lr:g}": e["steps_to_target"] for lr, e in entries},
            }

    # 3. Two more runs per method at the largest batch (the same extra budget for
    # every method): a baseline's learning rate 3^(1/2) either side of its best; GN
    # keeps its learning rate and tries 2x and 4x the micro-batches K at the same
    # tokens per step (more, smaller inner steps).
    if args.refine:
        for method in methods:
            entry = table.get(method, {}).get(str(largest))
            if entry is None:
                continue
            lr = entry["lr"]
            candidates = [(lr, None, _summary_of(entry))]
            if method.startswith("gn"):
                extra = [
                    (lr, k) for k in (2 * args.micro_batches, 4 * args.micro_batches)
                ]
            else:
                extra = [(lr * 3**0.5, None), (lr / 3**0.5, None)]
            for new_lr, k in extra:
                summary = run_(method, largest, new_lr, target, k=k)
                if summary is not None:
                    candidates.append((new_lr, k, summary))
            lr, k, best = min(candidates, key=lambda c: _rank(c[2]))
            entry["refined"] = {
                "run": run_name(method, largest, lr, k=k),
                "lr": lr,
                "micro_batches": k,
                "steps_to_target": best["steps_to_target"],
                "tokens_to_target": best["tokens_to_target"],
                "time_to_target": best["time_to_target"],
                "best_val_loss": best["best_val_loss"],
                "candidates": [
                    {
                        "lr": c[0],
                        "micro_batches": c[1],
                        "steps": c[2]["steps_to_target"],
                    }
                    for c in candidates
                ],
            }

    # 4. More seeds for each method's chosen configuration at the largest batch.
    if args.seeds > 1:
        for method in methods:
            entry = table.get(method, {}).get(str(largest))
            if entry is None:
                continue
            chosen = entry.get("refined", entry)
            lr, k = chosen["lr"], chosen.get("micro_batches")
            per_seed = {str(args.seed): chosen["steps_to_target"]}
            for offset in range(1, args.seeds):
                s = run_(method, largest, lr, target, offset, k)
                if s is not None:
                    per_seed[str(args.seed + offset)] = s["steps_to_target"]
            chosen["steps_to_target_by_seed"] = per_seed

    tokens_per_seq = args.seq
    warmup = warmup_steps(args, table, known)

    def cell(method, batch, key, fmt="{}"):
        entry = table.get(method, {}).get(str(batch))
        if entry is None:
            return "not run"
        value = entry[key]
        return "None" if value is None else fmt.format(value)

    def print_table(title, key, fmt="{}"):
        print(f"\n{title}")
        header = "".join(f"{b * tokens_per_seq:>12,}" for b in batches)
        print(f"{'method':<14}{header}   <- tokens per step")
        for method in methods:
            row = "".join(f"{cell(method, b, key, fmt):>12}" for b in batches)
            print(f"{method:<14}{row}")

    print_table(
        f"steps to validation loss {target:.4f} (None: not within {args.steps} steps)",
        "steps_to_target",
    )
    print_table("time to target (s):", "time_to_target", "{:.1f}")
    print_table("learning rate chosen:", "lr", "{:g}")
    if args.refine or args.seeds > 1:
        print(f"\nat batch {largest}: chosen configuration, steps to target by seed")
        for method in methods:
            entry = table.get(method, {}).get(str(largest))
            if entry is None:
                continue
            chosen = entry.get("refined", entry)
            k = chosen.get("micro_batches") or (
                args.micro_batches if method.startswith("gn") else None
            )
            by_seed = chosen.get(
                "steps_to_target_by_seed", {str(args.seed): chosen["steps_to_target"]}
            )
            config = f"lr {chosen['lr']:.3g}" + (f", K {k}" if k else "")
            print(
                f"{method:<14}{config:<18}"
                + "".join(f"{v!s:>6}" for v in by_seed.values())
            )

    report = {
        "target": target,
        "settings": settings_of(args),
        **device_of(args, previous),
        "target_loss": target,
        "target_batch_size": target_batch,
        "tokens_per_sequence": tokens_per_seq,
        "table": table,
        "warmup_steps": warmup,
        "claims": claims(table, batches, warmup=warmup),
        "claims_refined": (
            claims(table, batches, refined=True, warmup=warmup) if args.refine else None
        ),
    }
    for name, checks in (
        ("claims", report["claims"]),
        ("refined", report["claims_refined"]),
    ):
        if checks is not None:
            print(f"\n{name}: " + json.dumps(checks, indent=1))
    tag = args.tag
    result = {k: v for k, v in previous.items() if k != "runs"}
    if tag:
        result.setdefault("reports", {})[tag] = report
        result.setdefault("target", target)
    else:
        result = {**report, **{k: v for k, v in result.items() if k not in report}}
    top = result["target"]
    result["runs"] = [with_target(known[name], top) for name in sorted(known)]
    out.mkdir(parents=True, exist_ok=True)
    study_file.write_text(dumps(result))
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot(plots_dir, table, known, methods, batches, tokens_per_seq, target, tag)
    print(
        f"\nwrote {study_file} ({len(known)} runs); steps_to_target{tag}.png, "
        f"loss_curves{tag}.png in {plots_dir}"
    )


def grid_of(method: str) -> tuple:
    """The learning-rate grid of a method (a GN variant without its own: GN's)."""
    optimizer = method_config(method)["optimizer"]
    return DEFAULT_GRIDS.get(method, DEFAULT_GRIDS[optimizer])


def warmup_steps(args, table, known) -> int:
    """The AdamW warm-up steps the reported runs had (from their resolved
    configurations; from the runner's rule when none records it)."""
    names = [e.get("refined", e)["run"] for row in table.values() for e in row.values()]
    found = {known[n]["resolved"].get("warmup_steps") for n in names} - {None}
    if len(found) == 1:
        return found.pop()
    from eqx_gn import lm

    return lm.TrainConfig(
        model=args.model, steps=args.steps, warmup_fraction=args.warmup_fraction
    ).warmup_steps


def device_of(args, previous) -> dict:
    """The device the runs trained on: this one, unless the report only
    tabulates runs recorded on another (then the recorded one)."""
    if args.report_only and "device" in previous:
        return {k: previous[k] for k in ("benchmark", "device", "backend", "jax")}
    import jax

    return {
        "benchmark": "study",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }


def dumps(result: dict) -> str:
    """study.json's text: indented, but each curve's list on one line."""
    lists = {}
    runs = []
    for rec in result.get("runs", []):
        curve = {}
        for key, values in rec["curve"].items():
            curve[key] = f"@curve{len(lists)}@"
            lists[curve[key]] = json.dumps(values, separators=(",", ":"))
        runs.append({**rec, "curve": curve})
    text = json.dumps({**result, "runs": runs}, indent=1)
    return re.sub(r'"(@curve\d+@)"', lambda m: lists[m.group(1)], text) + "\n"


if __name__ == "__main__":
    main()
