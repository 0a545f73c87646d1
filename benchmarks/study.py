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

Every run lives in its own directory under ``--out``; a run whose ``summary.json``
exists is not run again, so the study resumes where it stopped (across sessions
too) and partial results can be committed as they come.

    python benchmarks/study.py                                  # CPU, tiny model
    python benchmarks/study.py --steps 300 --eval-batches 16 --refine --seeds 3
    python benchmarks/study.py --model small --seq 256 --batch-sizes 64,128,256,1024
"""

import argparse
import json
import time
from pathlib import Path

import jax

from eqx_gn import lm

DEFAULT_GRIDS = {
    "adamw": (3e-3, 1e-2, 3e-2),
    "muon": (1e-2, 3e-2, 1e-1),
    "soap": (3e-3, 1e-2, 3e-2),
    "gn": (1e-2, 3e-2, 1e-1),
    "gn-layerwise": (1e-2, 3e-2, 1e-1),
    "gn-prox": (1e-2, 3e-2, 1e-1),
}


def parse():
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
        help="suffix for the report files (study{tag}.json and the plots), so "
        "reports over different subsets of the runs can sit side by side",
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
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "study"))
    p.add_argument("--report-only", action="store_true", help="tabulate existing runs")
    return p.parse_args()


def run_dir(out: Path, method, batch, lr, seed_offset=0, k=None) -> Path:
    """``{method}_b{batch}_lr{lr}``, then ``_K{k}`` for a GN run whose number of
    micro-batches is not the study's default, and ``_seed+{offset}`` for a repeat."""
    name = f"{method}_b{batch}_lr{lr:g}"
    if k is not None:
        name += f"_K{k}"
    if seed_offset:
        name += f"_seed+{seed_offset}"
    return out / name


def reached(path: Path, target: float | None) -> dict:
    """Step, tokens and training time of the first evaluation at or below target."""
    for line in (path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        loss = record.get("val_loss")
        if target is not None and loss is not None and loss <= target:
            return {
                "target_reached": True,
                "steps_to_target": record["step"],
                "tokens_to_target": record["tokens"],
                "time_to_target": record["time_s"],
            }
    return {
        "target_reached": False,
        "steps_to_target": None,
        "tokens_to_target": None,
        "time_to_target": None,
    }


def _summary_of(entry):
    """The fields of a run summary that ``_rank`` and the tables read, from a table
    entry."""
    keys = ("steps_to_target", "tokens_to_target", "time_to_target", "best_val_loss")
    return {key: entry[key] for key in keys}


def _rank(summary):
    steps = summary["steps_to_target"]
    return (steps if steps is not None else float("inf"), summary["best_val_loss"])


def run(args, out, method, batch, lr, target, seed_offset=0, k=None):
    """The run's summary, with steps/tokens/time to ``target`` read off its metrics.

    A finished run is reused when it ran its whole step budget, or stopped at a target
    no higher than this one (so its metrics show when it crossed this one). With
    ``--report-only``, a run that would have to be trained gives None.
    """
    path = run_dir(out, method, batch, lr, seed_offset, k)
    summary_file = path / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        stopped_at = summary.get("target_loss")
        whole_budget = summary.get("steps") == args.steps
        if summary.get("completed", True) and (
            whole_budget or (target is not None and stopped_at <= target)
        ):
            return {**summary, **reached(path, target)}
    if args.report_only:
        return None
    config = lm.TrainConfig(
        model=args.model,
        seq_len=args.seq,
        optimizer=method,
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
        out=str(path),
        checkpoint_every=0,
        overwrite=True,
        progress=False,
    )
    start = time.perf_counter()
    summary = {**lm.train(config), **reached(path, target)}
    print(
        f"{method:>13} b={batch:<5} lr={lr:<7g} "
        + (f"K={config.micro_batches} " if method.startswith("gn") else "")
        + f"seed={config.seed} final {summary['final_val_loss']:.4f} "
        f"target@{summary['steps_to_target']} ({time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return summary


BASELINES = ("adamw", "muon", "soap")
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


def curves(path: Path):
    steps, times, losses = [], [], []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("val_loss") is not None:
            steps.append(record["step"])
            times.append(record["time_s"])
            losses.append(record["val_loss"])
    return steps, times, losses


def plot(out: Path, table, best_dirs, methods, batches, tokens_per_seq, target, tag):
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
        path = best_dirs.get((method, "refined"), best_dirs.get((method, largest)))
        if path is None:
            continue
        steps, times, losses = curves(path)
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
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    batches = sorted(int(b) for b in args.batch_sizes.split(","))
    grids = {m: DEFAULT_GRIDS[m][: args.grid_size] for m in methods}
    largest = batches[-1]

    # 1. The target: AdamW's best validation loss at the largest batch.
    target_batch = largest if args.target_batch is None else args.target_batch
    adamw_grid = DEFAULT_GRIDS["adamw"][: args.grid_size]
    adamw = [run(args, out, "adamw", target_batch, lr, None) for lr in adamw_grid]
    adamw = [s for s in adamw if s is not None]
    if not adamw:
        raise SystemExit(f"no finished AdamW run at batch {target_batch} under {out}")
    target = min(s["best_val_loss"] for s in adamw)
    print(
        f"target validation loss (AdamW's best at batch {target_batch}): {target:.4f}",
        flush=True,
    )

    # 2. Every method and batch size, stopping at the target.
    runs, table, best_dirs = [], {}, {}
    for batch in reversed(batches):
        for method in methods:
            grid = list(grids[method])
            entries = [(lr, run(args, out, method, batch, lr, target)) for lr in grid]
            entries = [(lr, s) for lr, s in entries if s is not None]
            if not entries:  # --report-only, and none of these has run yet
                continue
            # The same rule for every method: when the best learning rate sits at an
            # edge of the grid, try one more, 3x further out.
            best = min(entries, key=lambda e: _rank(e[1]))[0]
            if best in (grid[0], grid[-1]):
                extra = best / 3 if best == grid[0] else best * 3
                summary = run(args, out, method, batch, extra, target)
                if summary is not None:
                    entries.append((extra, summary))
            for lr, summary in entries:
                runs.append(
                    {
                        "method": method,
                        "batch_size": batch,
                        "lr": lr,
                        "seed": args.seed,
                        **summary,
                    }
                )
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
            best_dirs[(method, str(batch))] = run_dir(out, method, batch, lr)
            table.setdefault(method, {})[str(batch)] = {
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
                summary = run(args, out, method, largest, new_lr, target, k=k)
                if summary is None:
                    continue
                candidates.append((new_lr, k, summary))
                runs.append(
                    {
                        "method": method,
                        "batch_size": largest,
                        "lr": new_lr,
                        "micro_batches": k,
                        "seed": args.seed,
                        **summary,
                    }
                )
            lr, k, best = min(candidates, key=lambda c: _rank(c[2]))
            entry["refined"] = {
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
            best_dirs[(method, "refined")] = run_dir(out, method, largest, lr, k=k)

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
                s = run(args, out, method, largest, lr, target, offset, k)
                if s is None:
                    continue
                per_seed[str(args.seed + offset)] = s["steps_to_target"]
                runs.append(
                    {
                        "method": method,
                        "batch_size": largest,
                        "lr": lr,
                        "micro_batches": k,
                        "seed": args.seed + offset,
                        **s,
                    }
                )
            chosen["steps_to_target_by_seed"] = per_seed

    tokens_per_seq = args.seq
    warmup = lm.TrainConfig(
        model=args.model, steps=args.steps, warmup_fraction=args.warmup_fraction
    ).warmup_steps

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

    result = {
        "benchmark": "study",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "args": vars(args),
        "target_loss": target,
        "target_batch_size": target_batch,
        "tokens_per_sequence": tokens_per_seq,
        "table": table,
        "warmup_steps": warmup,
        "claims": claims(table, batches, warmup=warmup),
        "claims_refined": (
            claims(table, batches, refined=True, warmup=warmup) if args.refine else None
        ),
        "runs": runs,
    }
    for name, checks in (
        ("claims", result["claims"]),
        ("refined", result["claims_refined"]),
    ):
        if checks is not None:
            print(f"\n{name}: " + json.dumps(checks, indent=1))
    tag = args.tag
    (out / f"study{tag}.json").write_text(json.dumps(result, indent=2))
    plot(out, table, best_dirs, methods, batches, tokens_per_seq, target, tag)
    print(f"\nwrote study{tag}.json, steps_to_target{tag}.png, loss_curves{tag}.png")


if __name__ == "__main__":
    main()
