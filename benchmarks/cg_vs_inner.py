"""GN with CG against GN with its inner solver at 256 sequences (issue 34): does
Hessian-free train as well as the paper's solver, and does its damping stay off
its bounds?

``tiny`` on the bundled text, 256 sequences of 64 bytes, K = ``--micro-batches``
micro-batches (64 by default, the study's), seed ``--seed`` (0), 100 steps of which
10 AdamW warm-up, validation every 10 steps; every other setting the runner's
default. The runs:

- ``inner_default``: ``eqx-gn train`` with GN's defaults (the inner solver);
- ``cg_damping_X``: ``--solver cg --cg-damping X`` for X from 1e-4 to 1 (CG's
  other defaults: Martens' diagonal preconditioner, warm start 0.95,
  Levenberg-Marquardt damping from X, 20 iterations): the damping's start
  bracketed; ``chosen_damping`` is the best final loss, ``bracketed`` whether
  worse runs lie on both sides of it;
- ``cg_fixed``: the runner's CG with ``--trust fixed`` (the damping stays put);
- ``cg_plain``: the CG of before (``--cg-preconditioner none --cg-warm-start 0``).

Each run is the CLI in a subprocess; finished runs in ``--runs-dir`` are reused,
and ``--only`` names the runs to run (the others are recorded when finished, and
left out otherwise). The JSON holds each run's validation curve, final validation
loss, tokens, wall time, and for CG the damping's range and the fraction of main
steps at which the Levenberg-Marquardt scale sat at a bound; ``ratio_to_inner``
is each final loss over the inner solver's.

    python benchmarks/cg_vs_inner.py --runs-dir /tmp/cg_runs
    python benchmarks/cg_vs_inner.py --runs-dir /tmp/cg_runs_k8 --micro-batches 8
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import jax

from eqx_gn import LevenbergMarquardt, lm

RESULTS = Path(__file__).parent / "results"


def common_flags(micro_batches: int, seed: int) -> list[str]:
    """The flags every run shares: 256 sequences, K micro-batches, 100 steps."""
    return [
        "--batch-size", "256", "--micro-batches", str(micro_batches),
        "--steps", "100", "--eval-every", "10", "--seed", str(seed),
    ]  # fmt: skip


RUNS = {
    "inner_default": [],
    **{
        f"cg_damping_{x}": ["--solver", "cg", "--cg-damping", x]
        for x in ("1e-4", "1e-3", "1e-2", "1e-1", "1")
    },
    "cg_fixed": ["--solver", "cg", "--trust", "fixed"],
    "cg_plain": [
        "--solver",
        "cg",
        "--cg-preconditioner",
        "none",
        "--cg-warm-start",
        "0",
    ],
}
#: The Levenberg-Marquardt rule's bounds on its scale (the runner's defaults).
BOUNDS = (LevenbergMarquardt().min_scale, LevenbergMarquardt().max_scale)


def record(out: Path, cg: bool) -> dict | None:
    """What a finished run in ``out`` measured (with CG's damping), or ``None``."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return None
    if not summary.get("completed"):
        return None
    rows = [json.loads(line) for line in lines]
    main = [r for r in rows if r["phase"] == "main"]
    result = {
        "final_val_loss": summary["final_val_loss"],
        "val_curve": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
        "steps": summary["steps"],
        "tokens_read": summary["tokens_read"],
        "rejected_steps": summary.get("rejected_steps"),
        "wall_s": summary["wall_s"],
    }
    if cg:
        dampings = [r["damping"] for r in main]
        scales = [r["trust_scale"] for r in main]
        # At a bound: within 1% of it (the rule multiplies by 1.5 per step).
        at_bound = sum(s <= BOUNDS[0] * 1.01 or s >= BOUNDS[1] / 1.01 for s in scales)
        result |= {
            "damping_first_last_min_max": [
                dampings[0],
                dampings[-1],
                min(dampings),
                max(dampings),
            ],
            "scale_at_bound_fraction": at_bound / len(scales),
        }
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("cg_vs_inner_runs"))
    p.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--micro-batches", type=int, default=64, help="K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        help="default: results/cg_vs_inner_tiny.json at K = 64 and seed 0, else "
        "results/cg_vs_inner_tiny_k<K>_s<seed>.json",
    )
    args = p.parse_args()
    if args.out is None:
        name = (
            "cg_vs_inner_tiny"
            if (args.micro_batches, args.seed) == (64, 0)
            else f"cg_vs_inner_tiny_k{args.micro_batches}_s{args.seed}"
        )
        args.out = RESULTS / f"{name}.json"
    common = common_flags(args.micro_batches, args.seed)
    result = {
        "what": "GN with CG against GN's inner solver at 256 sequences, K = "
        f"{args.micro_batches}, seed {args.seed}, on tiny "
        "(benchmarks/cg_vs_inner.py; issue 34)",
        "common_flags": common,
        "wall_s_note": "wall_s is as measured, with other runs sharing the 2 cores "
        "for some runs: not a timing comparison",
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}",
        "date": datetime.date.today().isoformat(),
        "runs": {},
    }
    for name, flags in RUNS.items():
        out = args.runs_dir / name
        cg = "cg" in flags
        if record(out, cg) is None and name in args.only:
            command = ["eqx-gn", "train", *common, *flags, "--out", str(out)]
            if out.exists():
                command.append("--resume")
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True, stdout=sys.stderr)
        if (measured := record(out, cg)) is not None:
            result["runs"][name] = {"flags": flags, **measured}
    dampings = {
        float(r["flags"][-1]): r["final_val_loss"]
        for name, r in result["runs"].items()
        if name.startswith("cg_damping_")
    }
    if dampings:
        grid = sorted(dampings)
        best = min(grid, key=dampings.get)
        result["cg_default_damping"] = lm.TrainConfig(solver="cg").cg_damping
        result["chosen_damping"] = best
        result["bracketed"] = 0 < grid.index(best) < len(grid) - 1
    inner = result["runs"].get("inner_default")
    for name, r in result["runs"].items():
        if inner:
            r["ratio_to_inner"] = r["final_val_loss"] / inner["final_val_loss"]
        print(f"{name}: val {r['final_val_loss']:.4f}", r.get("ratio_to_inner", ""))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
