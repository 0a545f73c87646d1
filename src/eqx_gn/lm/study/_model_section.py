"""One study's section of the results page (`eqx_gn.lm.study._page`): its
settings, target, steps, tokens and time to the target, seeds, timing and layout
runs, every number read from its ``study.json``.
"""

from typing import Any


def _fmt(value: Any, spec: str = "{}") -> str:
    return "not reached" if value is None else spec.format(value)


def _rejected(run: dict) -> str:
    """GN: rejected steps of the main phase, of all main steps the run took."""
    rejected = run["summary"].get("rejected_steps")
    if rejected is None:
        return "-"
    main = run["summary"]["steps"] - (run["resolved"].get("warmup_steps") or 0)
    return f"{rejected} of {main}"


def _device(result: dict) -> str:
    d = result["device"]
    text = f"{d['device']} ({d['backend']}"
    if d.get("cpu_count") and d["backend"] == "cpu":
        text += f", {d['cpu_count']} cores"
    return text + f", JAX {d['jax']})" if d.get("jax") else text + ")"


def _target_runs(source: dict, runs: dict[str, dict]) -> list[str]:
    """The runs that set the target: each baseline tuned with no target, by its
    lowest validation loss over the whole budget."""
    tuning = source.get("tuning")
    if not tuning:
        return []
    lines = [
        f"The runs that set it (`target_source.tuning`): each first-order baseline "
        f"at batch {source['batch_size']} over the whole {source['budget']}-step "
        "budget with no target, tuned by the same rule on its lowest validation "
        "loss (learning rate: lowest loss):",
        "",
        "| baseline | learning rate: lowest validation loss | bracketed |",
        "|---|---|---|",
    ]
    for method, t in tuning.items():
        cells = sorted(
            (runs[n]["hyperparameters"]["lr"], runs[n]["best_val_loss"])
            for n in t["runs"]
            if n in runs
        )
        text = ", ".join(f"{lr:.3g}: {_fmt(v, '{:.4f}')}" for lr, v in cells)
        lines.append(f"| {method} | {text} | {'yes' if t['bracketed'] else 'no'} |")
    return [*lines, ""]


def _budget_text(s: dict, largest: int | str) -> str:
    """The budget rule in words, from the study's settings."""
    reference = s.get("budget_batch") or int(largest)
    if reference >= int(largest):
        return (f"{s['steps']} steps per run at batch {largest} and the same "
                "tokens at the other batch sizes")  # fmt: skip
    return (f"{s['steps']} steps per run at batch {reference} and the same tokens "
            f"at the smaller batch sizes, {s['steps']} steps at the larger ones")  # fmt: skip


def _median_cell(e: dict | None) -> str:
    """Median steps over seeds with their range, or why there is none."""
    if e is None:
        return "not run"
    if not e.get("seeds_complete"):
        return "seeds missing"
    if e["median_steps"] is None:
        return f"missed ({e['missed_seeds']} of {len(e['steps_by_seed'])} seeds)"
    lo, hi = e["min_steps"], e["max_steps"]
    spread = f" [{lo}-{hi if hi is not None else 'missed'}]" if len(
        e["steps_by_seed"]) > 1 else ""  # fmt: skip
    return f"{e['median_steps']:g}{spread}"


#: The row name's suffix of a GN method at its runner default.
DEFAULT_ROW = " default"


def _rows(result: dict) -> list[tuple[str, dict]]:
    """The rows of the per-batch tables: each method's chosen configurations,
    each GN method's runner default (``defaults``) after it."""
    rows = []
    for method, row in result["chosen"].items():
        rows.append((method, row))
        if method in result.get("defaults", {}):
            rows.append((method + DEFAULT_ROW, result["defaults"][method]))
    return rows


def _serial_table(result: dict, sizes: list) -> list[str]:
    """Median tokens read and serial passes to the target per method and batch
    size; nothing for a study whose curves predate the passes' count."""
    rows = _rows(result)
    if not any(
        e.get("median_serial_passes") is not None
        for _, row in rows
        for e in row.values()
    ):
        return []
    lines = [
        "",
        "What a step costs beside the steps (medians over the seeds; "
        "`median_tokens`, `median_serial_passes`): tokens read to the target "
        "(GN's line-search batches included) and serial passes, the passes over one "
        "(micro-)batch made one after another on the critical path: a warm-up or "
        "first-order step 1 (A with gradient accumulation), a GN step K + E, its K "
        "inner steps in sequence and its E line-search evaluations. A pass is at "
        "most one forward-backward pass; a line-search evaluation is a forward "
        "pass, counted whole.",
        "",
        "| method | " + " | ".join(f"{b} seq" for b in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    for method, row in rows:
        cells = []
        for b in sizes:
            e = row.get(str(b))
            if e is None or e.get("median_tokens") is None:
                cells.append("-")
                continue
            passes = e.get("median_serial_passes")
            cells.append(
                f"{e['median_tokens'] / 1e6:.2f}M tok, "
                + ("passes unknown" if passes is None else f"{passes:,.0f} passes")
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _target_seeds(source: dict) -> str:
    """How a third-edition target came from its seeds (nothing for earlier ones,
    whose target was one run's loss)."""
    if "seed_runs" not in source:
        return ""
    losses = ", ".join(
        f"`{name}` {loss:.4f}"
        for name, loss in zip(source["seed_runs"], source["seed_losses"], strict=True)
    )
    return (
        f", the median over {len(source['seed_runs'])} seeds of that configuration "
        f"(`target_source.seed_runs`, `seed_losses`, `seed_curves`): {losses}"
    )


def _study_section(result: dict, file: str, assets: str) -> list[str]:

    s = result["settings"]
    sizes = s["batch_sizes"]
    largest = str(max(sizes))
    runs = {r["name"]: r for r in result["runs"]}
    first = next(iter(runs.values()))
    resolved = first["resolved"]
    seq = resolved.get("seq_len") or s["seq_len"]
    params = first["summary"].get("num_params")
    source = result.get("target_source") or {}
    lines = [
        f"## The {s['model']} model"
        + (
            ""
            if source
            else f": {', '.join(s['methods'])} at batch {', '.join(map(str, sizes))}"
        ),
        "",
        f"From `{file}`. Corpus: {s['text'] or 'Shakespeare (bundled)'}, "
        f"{s['tokenizer']} tokenizer; {_fmt(params, '{:,}')} parameters; sequences "
        f"of {seq} tokens; {_budget_text(s, largest)} (`budgets`), the first "
        "tenth AdamW "
        f"warm-up; validation on {s['eval_batches']} fixed batches of "
        f"{s['eval_batch_size']} sequences. Device: {_device(result)} (`device`).",
        "",
        f"**Target:** validation loss **{result['target']:.4f}** (`target`), "
        + (
            f"{source['method']}'s loss at step {source['step']} of "
            f"{source['budget']} in run `{source['run']}` (`target_source`)"
            + _target_seeds(source)
            + "."
            if source
            else "given with --target."
        ),
        "",
        *_target_runs(source, runs),
        "### Steps to the target",
        "",
        "Median over seeds [fastest-slowest seed] of each method's chosen "
        "configuration (`chosen[method][batch].median_steps`, `min_steps`, "
        "`max_steps`), steps counted from 1, warm-up included; the learning rate "
        "and GN's K below it. \\* marks a choice not bracketed by worse runs on "
        "both sides (a tuning failure: `tuning[method][batch].bracketed`).",
        "",
    ]
    header = "| method | " + " | ".join(
        f"{b} seq ({int(b) * seq:,} tok/step)" for b in sizes
    )
    lines += [header + " |", "|---" * (len(sizes) + 1) + "|"]
    tuning = result.get("tuning", {})
    for method, row in _rows(result):
        default = method.endswith(DEFAULT_ROW)
        cells = []
        for b in sizes:
            e = row.get(str(b))
            if e is None:
                cells.append("not run")
                continue
            hp = f"lr {e['lr']:.3g}" + (
                f", K {e['micro_batches']}" if e["micro_batches"] else ""
            )
            t = tuning.get(method, {}).get(str(b), {})
            mark = "" if default or t.get("bracketed") else " \\*"
            cells.append(f"{_median_cell(e)} ({hp}){mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if result.get("defaults"):
        lines += [
            "",
            f"`{DEFAULT_ROW.strip()}`: GN as a user runs it, at the runner's default "
            "learning rate (no tuning; `defaults[method][batch]`), on every seed.",
        ]
    lines += _serial_table(result, sizes)
    lines += [
        "",
        "The tuning runs (`tuning[method][batch].runs`): each learning rate tried "
        "with its steps to the target (`gave up` at the step where the best run so "
        "far had reached it; `missed`: the whole budget without reaching it):",
        "",
        "| method | batch | learning rate: steps to target |",
        "|---|---|---|",
    ]
    for method, by_batch in tuning.items():
        for b in sorted(by_batch, key=int, reverse=True):
            cells = []
            for name in by_batch[b]["runs"]:
                r = runs.get(name)
                if r is None:
                    continue
                if r["steps_to_target"] is not None:
                    outcome = str(r["steps_to_target"])
                elif r.get("gave_up_at"):
                    outcome = f"gave up at {r['gave_up_at']}"
                else:
                    outcome = "missed"
                cells.append((r["hyperparameters"]["lr"], outcome))
            text = ", ".join(f"{lr:.3g}: {o}" for lr, o in sorted(cells))
            lines.append(f"| {method} | {b} | {text} |")
    lines += [
        "",
        f"Tokens read to the target at batch {largest} (training and, for GN, "
        "line-search tokens; `chosen[method][batch].median_tokens`), and on each "
        "run's own clock (runs at different machine load: see Timing for the "
        "comparison) the median training time to the target (no compilation or "
        "evaluation; `median_time_s`) and time per main-phase step of the first "
        "seed (`time_per_step`):",
        "",
        "| method | tokens to target | time to target (s) | s/step | best val loss "
        "| rejected GN steps |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in result["chosen"].items():
        e = row.get(largest)
        if e is None:
            continue
        lines.append(
            f"| {method} | {_fmt(e['median_tokens'], '{:,.0f}')} | "
            f"{_fmt(e['median_time_s'], '{:.1f}')} | "
            f"{_fmt(e['time_per_step'], '{:.3f}')} | {e['best_val_loss']:.4f} | "
            f"{_rejected(runs[e['run']])} |"
        )
    timing = result.get("timing")
    if timing:
        t = result["claims"]["timed"]
        lines += [
            "",
            f"**Timing** (`timing`): the chosen configurations at batch "
            f"{timing['batch_size']} in short runs ({timing['main_steps_per_run']} "
            f"main steps each), {timing['rounds']} rounds, every configuration once "
            "per round in turn, so that the machine's load falls alike; first-order "
            "methods also with gradient accumulation over GN's chosen K "
            "micro-batches (`A` K: the same step in GN's layout). Main-phase time to "
            "the target = (steps to the target - warm-up steps) x the median "
            "s/step (`claims.timed.main_time_to_target_s`):",
            "",
            "| configuration | s/step by round | median s/step | main-phase time to "
            "target (s) |",
            "|---|---|---|---|",
        ]
        for label, values in timing["seconds_per_step"].items():
            time = _fmt(t["main_time_to_target_s"].get(label), "{:.1f}")
            floor = t.get("main_time_at_least_s", {}).get(label)
            if t["main_time_to_target_s"].get(label) is None and floor is not None:
                time = f"> {floor:.1f} (missed: more than the budget's main phase)"
            lines.append(
                f"| {label} | {', '.join(f'{v:.3f}' for v in values)} | "
                f"{timing['median_seconds_per_step'][label]:.3f} | {time} |"
            )
    layouts = result.get("layouts") or {}
    if layouts:
        lines += [
            "",
            f"The layout runs (`layouts`, role `layout` in `runs`): each first-order "
            f"method's chosen run at batch {largest} trained again with gradient "
            "accumulation over GN's K; steps to the target: "
            + ", ".join(
                f"{m} {_fmt(runs[e['run_accumulated']]['steps_to_target'])} "
                f"(one batch: {_fmt(runs[e['run_one_batch']]['steps_to_target'])})"
                for m, e in layouts.items()
                if e["run_one_batch"] in runs
            )
            + " (the same steps up to float rounding, which can move a crossing "
            "that lies near the target by one evaluation).",
        ]
    lines += [
        "",
        f"![steps to target]({assets}/steps_to_target.png)",
        "",
        f"![loss curves]({assets}/loss_curves.png)",
        "",
    ]
    return lines
