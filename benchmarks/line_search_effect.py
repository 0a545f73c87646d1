"""What GN's warm line-search walk does to steps-to-target, against the exhaustive
grid: the same runs with ``line_search="grid"`` and ``line_search="warm"``.

Each run is a study run of GN as ``eqx-gn study`` chose it (read from a committed
``study.json``: its settings, its target loss, and for each batch size the chosen
inner learning rate and K), trained twice: once with the paper's exhaustive grid and
once with the warm walk (`eqx_gn.GridLineSearch(stop_on_increase=True,
warm_start=True)`). Everything else is equal, the line-search batches included (the
walk reads the same tokens; it evaluates fewer step sizes on them). Reported per run:
steps, tokens and training time to the target, the final validation loss, the mean
number of line-search loss evaluations per GN step, rejected steps, and how often the
two runs chose the same step size while their paths coincided.

Writes ``benchmarks/results/line_search_effect_<model>.json``.

    python benchmarks/line_search_effect.py                  # tiny study, 5 batches
    python benchmarks/line_search_effect.py --batch-sizes 32 --seeds 0 1 2
"""

import argparse
import datetime
import json
import statistics
import tempfile
from pathlib import Path

import jax

from eqx_gn import lm

RESULTS = Path(__file__).parent / "results"


def _display(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=RESULTS / "study_tiny" / "study.json")
    p.add_argument("--method", default="gn")
    p.add_argument("--batch-sizes", type=int, nargs="*", help="default: the study's")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--out", type=Path)
    return p.parse_args()


def run(study: dict, method: str, batch: int, seed: int, rule: str, root: Path):
    s, chosen = study["settings"], study["chosen"][method][str(batch)]
    out = root / f"{method}_b{batch}_s{seed}_{rule}"
    config = lm.TrainConfig(
        text=s["text"],
        tokenizer=s["tokenizer"],
        vocab_size=s["vocab_size"],
        model=s["model"],
        seq_len=s["seq_len"],
        steps=s["steps"],
        batch_size=batch,
        lr=chosen["lr"],
        micro_batches=chosen["micro_batches"],
        warmup_fraction=s["warmup_fraction"],
        eval_every=s["eval_every"],
        eval_batches=s["eval_batches"],
        eval_batch_size=s["eval_batch_size"],
        ls_batches=s["ls_batches"],
        target_loss=study["target"],
        seed=s["seed"] + seed,
        out=str(out),
        checkpoint_every=0,
        overwrite=True,
        progress=False,
        line_search=rule,
        **lm.parse_method(method),
    )
    lm.train(config)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    main = [r for r in records if r["phase"] == "main"]
    warmup = [r for r in records if r["phase"] == "warmup"]
    return {
        "steps_to_target": summary["steps_to_target"],
        "tokens_to_target": summary["tokens_to_target"],
        "time_to_target_s": summary["time_to_target"],
        "final_val_loss": summary["final_val_loss"],
        "steps": summary["steps"],
        "rejected_steps": summary["rejected_steps"],
        "mean_line_search_evaluations": statistics.mean(
            r["line_search_evaluations"] for r in main
        ),
        "main_time_per_step_s": (main[-1]["time_s"] - warmup[-1]["time_s"]) / len(main),
        "step_sizes": [r["step_size"] for r in main],
    }


def main():
    args = parse()
    study = json.loads(args.study.read_text())
    batches = args.batch_sizes or study["settings"]["batch_sizes"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            for seed in args.seeds:
                pair = {
                    rule: run(study, args.method, batch, seed, rule, Path(tmp))
                    for rule in ("grid", "warm")
                }
                same = 0
                for a, b in zip(
                    pair["grid"]["step_sizes"], pair["warm"]["step_sizes"], strict=False
                ):
                    if a != b:
                        break  # from here on the two runs are at different points
                    same += 1
                rows.append(
                    {
                        "batch_size": batch,
                        "seed": seed,
                        **pair,
                        "identical_leading_steps": same,
                    }
                )
                g, w = pair["grid"], pair["warm"]
                print(
                    f"b={batch:<4} seed={seed}  steps to target grid "
                    f"{g['steps_to_target']} warm {w['steps_to_target']}  final "
                    f"{g['final_val_loss']:.4f} / {w['final_val_loss']:.4f}  evals "
                    f"{g['mean_line_search_evaluations']:.2f} / "
                    f"{w['mean_line_search_evaluations']:.2f}  s/step "
                    f"{g['main_time_per_step_s']:.3f} / "
                    f"{w['main_time_per_step_s']:.3f}  same leading steps {same}",
                    flush=True,
                )
    model = study["settings"]["model"]
    path = args.out or RESULTS / f"line_search_effect_{model}.json"
    record = {
        "benchmark": "line_search_effect",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "study": _display(args.study),
        "method": args.method,
        "target": study["target"],
        "runs": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
