"""Rerun each method's chosen configuration at the largest batch of a finished study
with an evaluation after every step, to read off the exact step at which it crosses
the target (the study evaluates every few steps).

Evaluation does not touch the training data or randomness, so each rerun trains
exactly as the study's run did (the script checks the training losses against the
study run's curve in study.json), and its ``time_s`` excludes evaluation.

Writes ``STUDY/fine_crossing.json``: the exact crossings, the ratios, and the
reruns in study.json's run format (curves included). The reruns train under
``--runs-dir`` (default ``runs/study/<name of STUDY>/fine``, not tracked); a rerun
whose directory has a ``summary.json``, or that ``fine_crossing.json`` already
holds, is not trained again.

    python benchmarks/fine_crossing.py benchmarks/results/study_tiny
"""

import argparse
import dataclasses
import json
from pathlib import Path

from eqx_gn.lm import parse_method
from eqx_gn.lm.study._protocol import BASELINES
from eqx_gn.lm.study._records import read_run_dir, with_target
from eqx_gn.lm.study._result import dumps

REPO = Path(__file__).resolve().parents[1]


def known_runs(previous: dict, runs_dir: Path) -> dict:
    """The reruns fine_crossing.json holds, updated from their directories."""
    known = {rec["name"]: rec for rec in previous.get("runs", [])}
    if runs_dir.is_dir():
        for path in sorted(runs_dir.iterdir()):
            rec = read_run_dir(path, "fine", None) if path.is_dir() else None
            if rec is not None:
                known[rec["name"]] = rec
    return known


def rerun_config(source: dict, out: Path):
    """The runner's configuration of a study run (``config.json``'s ``"config"``,
    old or new), evaluating after every step and writing to ``out``."""
    from eqx_gn import lm

    fields = {f.name for f in dataclasses.fields(lm.TrainConfig)}
    config = {k: v for k, v in source["config"].items() if k in fields}
    config.update(parse_method(source["method"]))
    config.update(eval_every=1, out=str(out), overwrite=True)
    return lm.TrainConfig(**config)


def train_losses(curve: dict) -> dict:
    """Training loss by step."""
    return dict(zip(curve["step"], curve["train_loss"], strict=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a study's --out directory (with study.json)")
    p.add_argument(
        "--runs-dir", default=None, help="default: runs/study/<name of STUDY>/fine"
    )
    args = p.parse_args()
    study_dir = Path(args.study)
    study = json.loads((study_dir / "study.json").read_text())
    study_runs = {rec["name"]: rec for rec in study["runs"]}
    largest = str(max(study["settings"]["batch_sizes"]))
    runs_dir = Path(args.runs_dir or REPO / "runs" / "study" / study_dir.name / "fine")
    result_file = study_dir / "fine_crossing.json"
    previous = json.loads(result_file.read_text()) if result_file.exists() else {}
    known = known_runs(previous, runs_dir)
    target, warmup = study["target"], study["warmup_steps"]
    rows = {}
    for method, by_batch in study["chosen"].items():
        chosen = by_batch[largest]
        name = chosen["run"]
        source = study_runs[name]
        if name not in known:
            from eqx_gn import lm

            lm.train(rerun_config(source, runs_dir / name))
            known[name] = read_run_dir(runs_dir / name, "fine", target)
        fine = known[name] = with_target(known[name], target)
        coarse = train_losses(source["curve"])
        fine_losses = train_losses(fine["curve"])
        same = all(
            fine_losses[s] == loss for s, loss in coarse.items() if s in fine_losses
        )
        rows[method] = {
            "run": name,
            "steps_to_target": fine["steps_to_target"],
            "time_to_target": fine["time_to_target"],
            "coarse_steps_to_target": chosen["steps_to_target"],
            "training_identical_to_study_run": same,
        }
        print(
            f"{method:<14} {fine['steps_to_target']!s:>5} steps "
            f"(study: {chosen['steps_to_target']}), identical training: {same}",
            flush=True,
        )
    best_baseline = min(
        (rows[m]["steps_to_target"] for m in BASELINES if m in rows),
        default=None,
    )
    gn = rows.get("gn", {}).get("steps_to_target")
    try:
        study_path = str(study_dir.resolve().relative_to(REPO))
    except ValueError:
        study_path = str(study_dir)
    result = {
        "target": target,
        "settings": {"study": study_path, "batch_size": int(largest)},
        "study": study_path,
        "target_loss": target,
        "batch_size": int(largest),
        "warmup_steps": warmup,
        "rows": rows,
        "best_baseline_steps_over_gn": best_baseline / gn
        if best_baseline and gn
        else None,
        "best_baseline_steps_over_gn_after_warmup": (
            (best_baseline - warmup) / (gn - warmup) if best_baseline and gn else None
        ),
        "runs": [known[row["run"]] for row in rows.values()],
    }
    result_file.write_text(dumps(result))
    summary = {k: v for k, v in result.items() if k not in ("rows", "runs")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
