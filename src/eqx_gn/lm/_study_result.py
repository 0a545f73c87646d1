"""``study.json``'s content from a study's runs (`eqx_gn.lm._study`): the chosen
run per method and batch size, budgets, seeds, layouts, the claims, and the text.
"""

import json
import math
import re
import statistics
from typing import Any

from ._study_protocol import (
    BASELINES,
    RULE,
    Point,
    _point_of,
    choose,
    plan_grid,
    search_space,
)
from ._study_records import Settings, run_name, with_target

#: The study.json format written by `build_result`.
FORMAT = "eqx-gn study 2"


def _ratio(a, b, offset: int = 0):
    if a is None or b is None or b - offset <= 0:
        return None
    return (a - offset) / (b - offset)


def claims(chosen: dict[str, dict[str, dict]], batch: int, warmup: int,
           seeds: dict[str, list] | None = None) -> dict[str, Any]:  # fmt: skip
    """The issue's checks at one batch size from the chosen runs ``chosen[method]
    [str(batch)]``: the best baseline's steps over GN's (all steps, and after the
    shared warm-up), GN's time to the target over the fastest baseline's, and
    layerwise GN's steps over full GN's. ``None`` where a run did not reach the
    target. With ``seeds`` (steps to target per seed, by method), the same
    ratios of the median over seeds."""

    def at(method, key):
        entry = chosen.get(method, {}).get(str(batch))
        return None if entry is None else entry[key]

    def best_of(key):
        values = [(at(m, key), m) for m in BASELINES if at(m, key) is not None]
        return min(values, default=(None, None))

    steps, best = best_of("steps_to_target")
    seconds, fastest = best_of("time_to_target")
    gn = at("gn", "steps_to_target")
    layerwise = at("gn-layerwise", "steps_to_target")
    result = {
        "batch_size": batch,
        "warmup_steps": warmup,
        "best_baseline": best,
        "best_baseline_steps": steps,
        "gn_steps": gn,
        "best_baseline_steps_over_gn": _ratio(steps, gn),
        "best_baseline_steps_over_gn_after_warmup": _ratio(steps, gn, warmup),
        "fastest_baseline": fastest,
        "fastest_baseline_time_s": seconds,
        "gn_time_s": at("gn", "time_to_target"),
        "gn_time_over_fastest_baseline": _ratio(at("gn", "time_to_target"), seconds),
        "layerwise_steps": layerwise,
        "layerwise_steps_over_gn": _ratio(layerwise, gn),
        "layerwise_steps_over_gn_after_warmup": _ratio(layerwise, gn, warmup),
    }
    if seeds:
        # A seed that misses the target counts as past every step budget.
        median = {}
        for m, values in seeds.items():
            mid = statistics.median(math.inf if v is None else v for v in values)
            median[m] = None if math.isinf(mid) else mid
        base = [(median[m], m) for m in BASELINES if median.get(m) is not None]
        b_steps, b_name = min(base, default=(None, None))
        result["seeds"] = {
            "median_steps": median,
            "best_baseline": b_name,
            "best_baseline_steps_over_gn": _ratio(b_steps, median.get("gn")),
            "best_baseline_steps_over_gn_after_warmup": _ratio(
                b_steps, median.get("gn"), warmup
            ),
            "layerwise_steps_over_gn": _ratio(
                median.get("gn-layerwise"), median.get("gn")
            ),
        }
    return result


def timed_claims(result: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """Main-phase time to the target at the largest batch from the interleaved
    timing: (steps to the target - warm-up steps) x median seconds per step, for
    each method's chosen run (the warm-up, the same AdamW steps for all, left
    out); GN's over the fastest baseline's, with the baselines in their own
    layout (one batch) and in GN's (gradient accumulation over K)."""
    largest = str(timing["batch_size"])
    warmup = result["warmup_steps"] or 0
    median = timing["median_seconds_per_step"]
    times: dict[str, float | None] = {}
    for label, seconds in median.items():
        method = label.split(" ")[0]
        entry = result["chosen"].get(method, {}).get(largest)
        steps = None if entry is None else entry["steps_to_target"]
        times[label] = None if steps is None else (steps - warmup) * seconds

    def fastest(accumulated: bool):
        pool = [
            (t, label)
            for label, t in times.items()
            if t is not None
            and label.split(" ")[0] in BASELINES
            and (" A" in label) == accumulated
        ]
        return min(pool, default=(None, None))

    gn = times.get("gn")
    own, own_label = fastest(False)
    same, same_label = fastest(True)
    return {
        "main_time_to_target_s": times,
        "fastest_baseline": own_label,
        "gn_over_fastest_baseline": _ratio(gn, own),
        "fastest_baseline_in_gn_layout": same_label,
        "gn_over_fastest_baseline_in_gn_layout": _ratio(gn, same),
        "psgd_over_adamw_seconds_per_step": _ratio(
            median.get("psgd"), median.get("adamw")
        ),
    }


def build_result(settings: Settings, target, searched, known) -> dict[str, Any]:
    """study.json's content: settings, search spaces, rule, target, the chosen run
    per method and batch size, budgets, seeds, layouts, claims and every run."""
    largest = max(settings.batch_sizes)
    chosen: dict[str, dict[str, dict]] = {}
    budget: dict[str, dict[str, int]] = {}
    for method, by_batch in searched.items():
        for batch, records in sorted(by_batch.items()):
            budget.setdefault(method, {})[str(batch)] = len(records)
            best = choose(records)
            if best is not None:
                chosen.setdefault(method, {})[str(batch)] = _summary_entry(best)
    runs = [with_target(known[n], target) for n in sorted(known)]
    by_name = {r["name"]: r for r in runs}
    seeds: dict[str, list] = {}
    for method in settings.methods:
        entry = chosen.get(method, {}).get(str(largest))
        if entry is None:
            continue
        point = Point(entry["lr"], entry["micro_batches"])
        names = [run_name(method, largest, point, s) for s in range(settings.seeds)]
        values = [by_name[n]["steps_to_target"] for n in names if n in by_name]
        if len(values) == settings.seeds:
            seeds[method] = values
    layouts = {}
    for r in runs:
        if r["role"] == "layout":
            base = by_name.get(run_name(r["method"], r["batch_size"], _point_of(r)))
            layouts[r["method"]] = {
                "batch_size": r["batch_size"],
                "grad_accumulation": r["hyperparameters"]["grad_accumulation"],
                "time_per_step_one_batch": None if base is None else base["time_per_step"],
                "time_per_step_accumulated": r["time_per_step"],
                "run_one_batch": None if base is None else base["name"],
                "run_accumulated": r["name"],
            }  # fmt: skip
    warmups = {r["resolved"].get("warmup_steps") for r in runs} - {None}
    warmup = warmups.pop() if len(warmups) == 1 else None
    sizes = sorted(settings.batch_sizes)
    return {
        "format": FORMAT,
        "settings": settings.to_dict(),
        "search_spaces": {m: search_space(m).to_dict() for m in settings.methods},
        "grids": {
            m: [vars(p) for p in plan_grid(m, settings.runs)] for m in settings.methods
        },
        "rule": RULE,
        "target": target,
        "target_rule": (
            "given with --target"
            if settings.target is not None
            else f"AdamW's best validation loss over its runs at batch {largest}"
        ),
        "warmup_steps": warmup,
        "runs_per_method_and_batch": budget,
        "chosen": chosen,
        "steps_to_target_by_seed": seeds,
        "layouts": layouts,
        "claims": {
            "by_batch": {str(b): claims(chosen, b, warmup or 0) for b in sizes},
            "largest": claims(chosen, largest, warmup or 0, seeds),
        },
        "runs": runs,
    }


def _summary_entry(record: dict) -> dict[str, Any]:
    keys = (
        "steps_to_target",
        "tokens_to_target",
        "time_to_target",
        "final_val_loss",
        "best_val_loss",
        "time_per_step",
    )
    h = record["hyperparameters"]
    return {
        "run": record["name"],
        "lr": h["lr"],
        "micro_batches": h["micro_batches"],
        **{k: record[k] for k in keys},
    }


def dumps(result: dict[str, Any]) -> str:
    """study.json's text: indented, each curve's list on one line."""
    lists: dict[str, str] = {}
    runs = []
    for rec in result.get("runs", []):
        curve = {}
        for key, values in rec["curve"].items():
            curve[key] = f"@curve{len(lists)}@"
            lists[curve[key]] = json.dumps(values, separators=(",", ":"))
        runs.append({**rec, "curve": curve})
    text = json.dumps({**result, "runs": runs}, indent=1)
    return re.sub(r'"(@curve\d+@)"', lambda m: lists[m.group(1)], text) + "\n"
