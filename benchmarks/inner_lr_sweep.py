"""GN's inner learning rate for each inner optimizer (``--inner``): six rates x3
apart, GN's other defaults, tiny model on the bundled Shakespeare, 60 steps of 32
sequences with K = 4 micro-batches. Prints each run's final validation loss and
rejected GN steps and writes them to
``benchmarks/results/inner_lr_sweep_tiny.json`` (the source of
``eqx_gn.lm.run._methods.GN_INNER_LEARNING_RATES``).

    python benchmarks/inner_lr_sweep.py [--inners muon,adamw,soap,psgd] [--runs DIR]
"""

import argparse
import json
from pathlib import Path

from eqx_gn.lm import TrainConfig, train

RATES = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inners", default="muon,adamw,soap,psgd")
    p.add_argument("--runs", default="/tmp/inner_lr_sweep", help="run directories")
    args = p.parse_args()
    results = {}
    for inner in args.inners.split(","):
        for lr in RATES:
            config = TrainConfig(
                model="tiny", steps=60, batch_size=32, micro_batches=4,
                eval_every=0, eval_batches=4, eval_batch_size=32, progress=False,
                inner=inner, lr=lr, out=f"{args.runs}/{inner}-{lr}",
                overwrite=True, checkpoint_every=0,
            )  # fmt: skip
            summary = train(config)
            results[f"{inner} {lr}"] = (
                summary["final_val_loss"],
                summary.get("rejected_steps"),
            )
            print(inner, lr, results[f"{inner} {lr}"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "inner_lr_sweep_tiny.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
