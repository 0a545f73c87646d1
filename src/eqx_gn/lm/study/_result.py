"""``study.json``'s content from a study's runs (`eqx_gn.lm.study`): the chosen
run per method and batch size, budgets, seeds, layouts, the claims, and the text.
"""

import json
import math
import re
import statistics
from typing import Any

from ._protocol import (
    BASELINES,
    TARGET_AT,
    TARGET_SEEDS,
    Point,
    _point_of,
    centre,
    choose,
    micro_batches,
    rule,
)
from ._records import Settings, run_name, with_target

#: The study.json format written by `build_result`: the third edition's protocol
#: (a declared cap of 12 runs; runs that all missed the target bracket nothing:
#: the walk goes on; the target is the median of 3 seeds).
FORMAT = "eqx-gn study 4"
#: The formats whose study.json the results page reads: the second edition's
#: (``"eqx-gn study 3"``, the committed studies) and this one.
READABLE_FORMATS = ("eqx-gn study 3", FORMAT)


def _ratio(a, b, offset: int = 0):
    if a is None or b is None or b - offset <= 0:
        return None
    return (a - offset) / (b - offset)


def _median(values: list) -> int | float | None:
    """The median over seeds; a seed that missed the target counts as past every
    budget (None when half or more missed). Of an odd number of step counts, a
    step count (an int)."""
    if not values:
        return None
    mid = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(mid) else mid


def claims(
    chosen: dict[str, dict[str, dict]], batch: int, budget: int
) -> dict[str, Any]:
    """The issue's checks at one batch size from the chosen configurations
    ``chosen[method][str(batch)]``, on the medians over seeds: the best
    baseline's steps over GN's (all steps, and after the shared warm-up), GN's
    time to the target over the fastest baseline's, and layerwise GN's steps over
    full GN's. ``None`` where the median missed the target. Where every baseline
    that ran missed it (all seeds run) and GN did not, each baseline needs more
    than the ``budget`` steps: ``..._at_least`` gives the bound budget / GN."""

    def at(method, key):
        entry = chosen.get(method, {}).get(str(batch))
        return None if entry is None else entry[key]

    def best_of(key):
        values = [(at(m, key), m) for m in BASELINES if at(m, key) is not None]
        return min(values, default=(None, None))

    warmups = {e["warmup_steps"] for row in chosen.values()
               for b, e in row.items() if b == str(batch)} - {None}  # fmt: skip
    warmup = warmups.pop() if len(warmups) == 1 else 0
    steps, best = best_of("median_steps")
    seconds, fastest = best_of("median_time_s")
    gn = at("gn", "median_steps")
    layerwise = at("gn-layerwise", "median_steps")
    ran = [m for m in BASELINES if at(m, "seeds_complete")]
    all_missed = bool(ran) and steps is None and gn is not None
    bound = budget if all_missed else None
    return {
        "batch_size": batch,
        "warmup_steps": warmup,
        "best_baseline": best,
        "best_baseline_steps": steps,
        "gn_steps": gn,
        "best_baseline_steps_over_gn": _ratio(steps, gn),
        "best_baseline_steps_over_gn_after_warmup": _ratio(steps, gn, warmup),
        # Every baseline missed: each would need more than the budget.
        "best_baseline_steps_over_gn_at_least": _ratio(bound, gn),
        "best_baseline_steps_over_gn_after_warmup_at_least": _ratio(bound, gn, warmup),
        "fastest_baseline": fastest,
        "fastest_baseline_time_s": seconds,
        "gn_time_s": at("gn", "median_time_s"),
        "gn_time_over_fastest_baseline": _ratio(at("gn", "median_time_s"), seconds),
        "layerwise_steps": layerwise,
        "layerwise_steps_over_gn": _ratio(layerwise, gn),
        "layerwise_steps_over_gn_after_warmup": _ratio(layerwise, gn, warmup),
    }


def timed_claims(result: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """Main-phase time to the target at the largest batch from the interleaved
    timing: (steps to the target - warm-up steps) x median seconds per step, for
    each method's chosen run (the warm-up, the same AdamW steps for all, left
    out); GN's over the fastest baseline's, with the baselines in their own
    layout (one batch) and in GN's (gradient accumulation over K). Where every
    baseline missed the target (median over seeds), each needs more than its
    main steps in the budget: ``..._at_most`` bounds GN's ratio from above with
    that time."""
    largest = str(timing["batch_size"])
    budget = result["budgets"][largest]
    median = timing["median_seconds_per_step"]
    times: dict[str, float | None] = {}
    floors: dict[str, float] = {}  # missed: more than the budget's main phase
    for label, seconds in median.items():
        method = label.split(" ")[0]
        entry = result["chosen"].get(method, {}).get(largest)
        steps = None if entry is None else entry["median_steps"]
        warmup = 0 if entry is None else entry["warmup_steps"] or 0
        times[label] = None if steps is None else (steps - warmup) * seconds
        if entry is not None and steps is None and entry.get("seeds_complete"):
            floors[label] = (budget - warmup) * seconds

    def fastest(accumulated: bool):
        pool = [
            (t, label)
            for label, t in times.items()
            if t is not None
            and label.split(" ")[0] in BASELINES
            and (" A" in label) == accumulated
        ]
        return min(pool, default=(None, None))

    def floor(accumulated: bool):
        """The fastest baseline's time is above this, if every baseline missed."""
        labels = [label for label in median
                  if label.split(" ")[0] in BASELINES
                  and (" A" in label) == accumulated]  # fmt: skip
        if not labels or any(label not in floors for label in labels):
            return None
        return min(floors[label] for label in labels)

    gn = times.get("gn")
    own, own_label = fastest(False)
    same, same_label = fastest(True)
    return {
        "main_time_to_target_s": times,
        "main_time_at_least_s": floors,
        "fastest_baseline": own_label,
        "gn_over_fastest_baseline": _ratio(gn, own),
        "gn_over_fastest_baseline_at_most": _ratio(gn, floor(False)),
        "fastest_baseline_in_gn_layout": same_label,
        "gn_over_fastest_baseline_in_gn_layout": _ratio(gn, same),
        "gn_over_fastest_baseline_in_gn_layout_at_most": _ratio(gn, floor(True)),
        "psgd_over_adamw_seconds_per_step": _ratio(
            median.get("psgd"), median.get("adamw")
        ),
    }


def build_result(settings: Settings, target, target_source, searched, tuning,
                 known) -> dict[str, Any]:  # fmt: skip
    """study.json's content: settings, the rule, the target and its source, each
    method's tuning runs per batch size, the chosen configuration with its seeds,
    layouts, claims and every run."""
    largest = max(settings.batch_sizes)
    runs = [with_target(known[n], target) for n in sorted(known)]
    by_name = {r["name"]: r for r in runs}
    chosen: dict[str, dict[str, dict]] = {}
    for method, by_batch in searched.items():
        for batch, records in sorted(by_batch.items()):
            best = choose(records)
            if best is None:
                continue
            point = _point_of(best)
            seeds = [by_name.get(run_name(method, batch, point, s))
                     for s in range(settings.seeds)]  # fmt: skip
            chosen.setdefault(method, {})[str(batch)] = _chosen_entry(
                best, [r for r in seeds if r is not None], settings.seeds
            )
    # GN at its runner default, where its runs exist (the first seed stands for
    # the configuration, as a chosen run does).
    defaults: dict[str, dict[str, dict]] = {}
    for method in settings.methods:
        for batch in sorted(settings.batch_sizes):
            k = micro_batches(method, batch, settings.gn_micro_batch)
            if k is None:
                continue
            seeds = [by_name.get(run_name(method, batch, Point(None, k), s))
                     for s in range(settings.seeds)]  # fmt: skip
            seeds = [r for r in seeds if r is not None]
            if seeds:
                defaults.setdefault(method, {})[str(batch)] = _chosen_entry(
                    seeds[0], seeds, settings.seeds
                )
    budgets = {b: settings.budget(b) for b in settings.batch_sizes}
    critical = {}
    for method, row in [*chosen.items(),
                        *((m + " default", r) for m, r in defaults.items())]:  # fmt: skip
        medians = {
            b: row[str(b)]["median_steps"]
            for b in settings.batch_sizes
            if str(b) in row and row[str(b)]["seeds_complete"]
        }
        if len(medians) >= 2:
            critical[method] = critical_batch(medians, budgets)
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
    sizes = sorted(settings.batch_sizes)
    return {
        "format": FORMAT,
        "settings": settings.to_dict(),
        "centres": {m: centre(m) for m in settings.methods},
        "gn_micro_batches": {
            str(b): micro_batches("gn", b, settings.gn_micro_batch) for b in sizes
        },
        "budgets": {str(b): settings.budget(b) for b in sizes},
        "rule": rule(settings.max_runs),
        "max_runs": settings.max_runs,
        "target": target,
        "target_rule": (
            "given with --target"
            if settings.target is not None
            else f"the median over {TARGET_SEEDS} seeds of the best tuned "
            f"first-order baseline's configuration (the lowest best loss over the "
            f"baselines' runs with no target), each run over the whole "
            f"{settings.budget(largest)}-step budget at batch {largest}, of their "
            f"validation losses at the evaluation nearest below {TARGET_AT:g} of "
            f"the budget"
        ),
        "target_source": target_source,
        "tuning": tuning,
        "chosen": chosen,
        "defaults": defaults,
        "critical_batch": critical,
        "layouts": layouts,
        "claims": {
            "by_batch": {str(b): claims(chosen, b, settings.budget(b)) for b in sizes},
            "largest": claims(chosen, largest, settings.budget(largest)),
        },
        "runs": runs,
    }


#: Zhang et al. (2024)'s measure of the critical batch size: the batch at which
#: the steps to the target exceed the linear-scaling line by this factor.
CRITICAL_EXCESS = 1.2


def critical_batch(
    steps: dict[int, int | float | None], budgets: dict[int, int]
) -> dict[str, Any]:
    r"""Where a method's median steps to the target, ``steps[batch]`` (``None``:
    missed within ``budgets[batch]`` steps), leave the linear-scaling line from
    its smallest batch $b_0$, $S(b_0)\,b_0 / b$, by more than `CRITICAL_EXCESS`.

    ``batch``: the crossing, interpolated in $\log$ excess against $\log b$
    between the last batch within the line's 20% and the first beyond it;
    ``between``: those two batches; ``bound``: ``"above"`` when no measured batch
    left the line (the critical batch is past the largest, ``between[1]`` None),
    ``"missed"`` when the next batch only missed the target (the crossing lies
    between the two, its place unknown; ``between[1]`` None where that batch's
    budget is itself within the 20%, so the miss says nothing), ``"unknown"`` when
    the smallest batch missed."""
    sizes = sorted(steps)
    b0 = sizes[0]
    if steps[b0] is None:
        return {"batch": None, "between": None, "bound": "unknown"}
    previous, excess_before = b0, 1.0
    for b in sizes[1:]:
        line = steps[b0] * b0 / b
        if steps[b] is None:
            # A miss says only that the steps exceed the budget: past the line's
            # 20% if the budget is, and otherwise nothing about b.
            beyond = budgets[b] / line >= CRITICAL_EXCESS
            return {"batch": None, "between": [previous, b if beyond else None],
                    "bound": "missed"}  # fmt: skip
        excess = steps[b] / line
        if excess > CRITICAL_EXCESS:
            t = (math.log(CRITICAL_EXCESS) - math.log(excess_before)) / (
                math.log(excess) - math.log(excess_before)
            )
            crossing = math.exp(math.log(previous) + t * math.log(b / previous))
            return {"batch": crossing, "between": [previous, b], "bound": None}
        previous, excess_before = b, excess
    return {"batch": None, "between": [sizes[-1], None], "bound": "above"}


def serial_passes(record: dict) -> int | None:
    r"""The passes over one batch that a run made in sequence, on its critical
    path, to the target: a warm-up step 1, a first-order step $A$ (its gradient
    accumulation, 1 without), a GN step $K + E$: its K inner steps, each a
    linearization of its micro-batch at $\theta_0$ with its tangent and transposed
    passes, taken one after the other, and its E line-search loss evaluations
    (forward passes, counted whole). Each of these is at most one forward-backward
    pass over one (micro-)batch; the passes of a step over the devices of a mesh
    run side by side and count once.

    ``None`` where the run missed the target, or where its curve predates the
    line-search counts (``line_search_evaluations``)."""
    at = record["steps_to_target"]
    if at is None:
        return None
    h = record["hyperparameters"]
    k, accumulation = h.get("micro_batches"), h.get("grad_accumulation") or 1
    curve = record["curve"]
    n = len(curve["step"])
    evaluations = curve.get("line_search_evaluations") or [None] * n
    phases = curve.get("phase") or [None] * n
    total = 0
    for step, phase, e in zip(curve["step"], phases, evaluations, strict=True):
        if step > at:
            break
        if phase == "warmup":
            total += 1
        elif k is None:
            total += accumulation
        elif e is None:
            return None
        else:
            total += k + e
    return total


def _chosen_entry(record: dict, seeds: list[dict], wanted: int) -> dict[str, Any]:
    """A chosen configuration: its tuning run's outcome, and the steps, tokens and
    time to the target of each seed with their medians and ranges."""
    h = record["hyperparameters"]
    steps = [r["steps_to_target"] for r in seeds]
    reached = [v for v in steps if v is not None]
    return {
        "run": record["name"],
        # The runner's default where the run left it (``lr`` None): as resolved.
        "lr": h["lr"] if h["lr"] is not None else record["resolved"]["learning_rate"],
        "micro_batches": h["micro_batches"],
        "warmup_steps": record["resolved"].get("warmup_steps"),
        **{k: record[k] for k in (
            "steps_to_target", "tokens_to_target", "time_to_target",
            "final_val_loss", "best_val_loss", "time_per_step", "resolution",
        )},
        "seed_runs": [r["name"] for r in seeds],
        "seeds_complete": len(seeds) == wanted,
        "steps_by_seed": steps,
        "tokens_by_seed": [r["tokens_to_target"] for r in seeds],
        "median_steps": _median(steps) if len(seeds) == wanted else None,
        "min_steps": min(reached, default=None),
        "max_steps": None if len(reached) < len(steps) else max(reached, default=None),
        "median_tokens": _median([r["tokens_to_target"] for r in seeds])
        if len(seeds) == wanted else None,
        "median_time_s": _median([r["time_to_target"] for r in seeds])
        if len(seeds) == wanted else None,
        "missed_seeds": len(steps) - len(reached),
        "serial_passes_by_seed": (serial := [serial_passes(r) for r in seeds]),
        "median_serial_passes": _median(serial)
        if len(seeds) == wanted and not _unknown(serial, steps) else None,
    }  # fmt: skip


def _unknown(serial: list, steps: list) -> bool:
    """Whether a seed reached the target with no count of its serial passes (a
    curve recorded before they were kept)."""
    return any(p is None and s is not None for p, s in zip(serial, steps, strict=True))


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
