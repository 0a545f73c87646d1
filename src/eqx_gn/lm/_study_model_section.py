"""One study's section of the results page (`eqx_gn.lm._study_report`): its
settings, target, steps, tokens and time to the target, seeds, timing and layout
runs, every number read from its ``study.json``.
"""

from typing import Any


def _fmt(value: Any, spec: str = "{}") -> str:
    return "not reached" if value is None else spec.format(value)


def _at_edge(result: dict, method: str, batch: int, lr: float) -> bool:
    """Whether ``lr`` is the lowest or highest learning rate of ``method``'s
    search runs at ``batch``."""
    lrs = [
        r["hyperparameters"]["lr"]
        for r in result["runs"]
        if r["method"] == method
        and r["batch_size"] == batch
        and r["role"] in ("grid", "refine")
    ]
    return len(set(lrs)) > 1 and lr in (min(lrs), max(lrs))


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


def _study_section(result: dict, file: str, assets: str) -> list[str]:
    s = result["settings"]
    sizes = s["batch_sizes"]
    largest = str(max(sizes))
    runs = {r["name"]: r for r in result["runs"]}
    first = next(iter(runs.values()))
    resolved = first["resolved"]
    seq = resolved.get("seq_len") or s["seq_len"]
    params = first["summary"].get("num_params")
    lines = [
        f"## The {s['model']} model",
        "",
        f"From `{file}`. Corpus: {s['text'] or 'Shakespeare (bundled)'}, "
        f"{s['tokenizer']} tokenizer; {params:,} parameters"
        if params
        else f"From `{file}`.",
    ]
    lines[-1] += (
        f"; sequences of {seq} tokens; {s['steps']} steps per run, the first "
        f"{result['warmup_steps']} AdamW warm-up (`warmup_steps`); validation "
        f"every {s['eval_every']} steps on {s['eval_batches']} fixed batches of "
        f"{s['eval_batch_size']} sequences. Device: {_device(result)} "
        f"(`device`). Runs per method and batch size: "
        f"{s['runs']} (`runs_per_method_and_batch`); seeds of each chosen "
        f"configuration at batch {largest}: {s['seeds']}."
    )
    lines += [
        "",
        f"**Target:** validation loss **{result['target']:.4f}** (`target`): "
        f"{result['target_rule']}.",
        "",
        "### Steps to the target",
        "",
        "Each method's chosen run (the best of its runs by steps to the target, "
        "then validation loss; `chosen[method][batch].steps_to_target`), steps "
        "counted from 1, warm-up included:",
        "",
    ]
    header = "| method | " + " | ".join(
        f"{b} seq ({int(b) * seq:,} tok/step)" for b in sizes
    )
    lines += [header + " |", "|---" * (len(sizes) + 1) + "|"]
    for method, row in result["chosen"].items():
        cells = []
        for b in sizes:
            e = row.get(str(b))
            if e is None:
                cells.append("not run")
                continue
            hp = f"lr {e['lr']:.3g}" + (
                f", K {e['micro_batches']}" if e["micro_batches"] else ""
            )
            edge = _at_edge(result, method, int(b), e["lr"])
            cells.append(f"{_fmt(e['steps_to_target'])} ({hp}){' *' if edge else ''}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "\\* the chosen learning rate is the lowest or highest of the method's "
        "runs at that batch size: its optimum may lie outside what the budget "
        "reached."
        + (
            " A GN method's N runs cover fewer learning rates than a first-order "
            "method's, as its grid also spends runs on K."
            if any(sp["micro_batches"] for sp in result["search_spaces"].values())
            else ""
        ),
        "",
        f"Tokens read to the target at batch {largest} (training and, for GN, "
        "line-search tokens; `chosen[method][batch].tokens_to_target`), and on "
        "each run's own clock (runs at different machine load: see Timing for "
        "the comparison) training time to the target (no compilation or "
        "evaluation; `time_to_target`) and time per main-phase step "
        "(`time_per_step`):",
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
            f"| {method} | {_fmt(e['tokens_to_target'], '{:,}')} | "
            f"{_fmt(e['time_to_target'], '{:.1f}')} | "
            f"{_fmt(e['time_per_step'], '{:.3f}')} | {e['best_val_loss']:.4f} | "
            f"{_rejected(runs[e['run']])} |"
        )
    seeds = result.get("steps_to_target_by_seed") or {}
    if s["seeds"] > 1 and seeds:
        lines += [
            "",
            f"Steps to the target by seed at batch {largest} "
            "(`steps_to_target_by_seed`; the chosen configuration, seeds "
            f"{', '.join(str(s['seed'] + i) for i in range(s['seeds']))}):",
            "",
            "| method | "
            + " | ".join(f"seed {i}" for i in range(s["seeds"]))
            + " | median |",
            "|---" * (s["seeds"] + 2) + "|",
        ]
        med = result["claims"]["largest"].get("seeds", {}).get("median_steps", {})
        for method, values in seeds.items():
            lines.append(
                f"| {method} | "
                + " | ".join(_fmt(v) for v in values)
                + f" | {_fmt(med.get(method))} |"
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
            lines.append(
                f"| {label} | {', '.join(f'{v:.3f}' for v in values)} | "
                f"{timing['median_seconds_per_step'][label]:.3f} | "
                f"{_fmt(t['main_time_to_target_s'].get(label), '{:.1f}')} |"
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
