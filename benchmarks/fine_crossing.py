"""Rerun each method's chosen configuration at the largest batch of a finished study
with an evaluation after every step, to read off the exact step at which it crosses
the target (the study evaluates every few steps).

Evaluation does not touch the training data or randomness, so each rerun trains
exactly as the study's run did (the script checks the training losses match), and
its ``time_s`` excludes evaluation.

    python benchmarks/fine_crossing.py benchmarks/results/study_300
"""

import argparse
import json
from pathlib import Path

from eqx_gn import lm


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a study's --out directory (with study.json)")
    p.add_argument("--out", default=None, help="default: STUDY/fine")
    args = p.parse_args()
    study_dir = Path(args.study)
    study = json.loads((study_dir / "study.json").read_text())
    largest = str(max(int(b) for b in study["args"]["batch_sizes"].split(",")))
    out = Path(args.out) if args.out else study_dir / "fine"
    out.mkdir(parents=True, exist_ok=True)
    warmup = study["warmup_steps"]
    rows = {}
    for method, by_batch in study["table"].items():
        chosen = by_batch[largest].get("refined", by_batch[largest])
        name = f"{method}_b{largest}_lr{chosen['lr']:g}"
        if chosen.get("micro_batches"):
            name += f"_K{chosen['micro_batches']}"
        source = study_dir / name
        config = json.loads((source / "config.json").read_text())["config"]
        config.update(eval_every=1, out=str(out / name), overwrite=True)
        summary = lm.train(lm.TrainConfig(**config))
        coarse = {
            r["step"]: r["train_loss"]
            for r in map(
                json.loads, (source / "metrics.jsonl").read_text().splitlines()
            )
        }
        fine = {
            r["step"]: r["train_loss"]
            for r in map(
                json.loads, (out / name / "metrics.jsonl").read_text().splitlines()
            )
        }
        same = all(fine[s] == loss for s, loss in coarse.items() if s in fine)
        rows[method] = {
            "run": name,
            "steps_to_target": summary["steps_to_target"],
            "time_to_target": summary["time_to_target"],
            "coarse_steps_to_target": chosen["steps_to_target"],
            "training_identical_to_study_run": same,
        }
        print(
            f"{method:<14} {summary['steps_to_target']!s:>5} steps "
            f"(study: {chosen['steps_to_target']}), identical training: {same}",
            flush=True,
        )
    best_baseline = min(
        (rows[m]["steps_to_target"] for m in ("adamw", "muon", "soap") if m in rows),
        default=None,
    )
    gn = rows.get("gn", {}).get("steps_to_target")
    result = {
        "study": str(study_dir),
        "target_loss": study["target_loss"],
        "batch_size": int(largest),
        "warmup_steps": warmup,
        "rows": rows,
        "best_baseline_steps_over_gn": best_baseline / gn
        if best_baseline and gn
        else None,
        "best_baseline_steps_over_gn_after_warmup": (
            (best_baseline - warmup) / (gn - warmup) if best_baseline and gn else None
        ),
    }
    (out / "fine_crossing.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
