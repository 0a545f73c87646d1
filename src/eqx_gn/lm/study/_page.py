"""Tables of a study and its results page, from ``study.json`` alone.

`write_report` renders the page: every number on it is read from the studies'
``study.json`` files, which the page names, with the key each number comes from.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ._figures import copy_plots
from ._model_section import _fmt, _median_cell, _study_section
from ._protocol import BASELINES
from ._result import READABLE_FORMATS

#: The paper's figure: GN's steps to the target against the best baseline's.
PAPER_STEP_RATIO = 5.4
#: Layerwise GN's steps within this factor of full GN's.
LAYERWISE_BOUND = 1.4


def print_tables(result: dict[str, Any]) -> None:
    """Median steps to the target over seeds of each method's chosen
    configuration, per batch size, and the claims at the largest."""
    sizes = result["settings"]["batch_sizes"]
    print(f"\ntarget {result['target']:.4f}: median steps to target [range]")
    print(f"{'method':<14}" + "".join(f"{b:>16}" for b in sizes))
    for method, row in result["chosen"].items():
        cells = [_median_cell(row.get(str(b))) for b in sizes]
        print(f"{method:<14}" + "".join(f"{c:>16}" for c in cells))
    print(json.dumps(result["claims"]["largest"], indent=1))


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), Path.cwd())
    except ValueError:  # another drive
        return str(path)


def _verdict(ok: bool | None) -> str:
    return "not measurable" if ok is None else ("met" if ok else "**missed**")


def _scaling(result: dict, method: str) -> list[tuple[int, float]]:
    row = result["chosen"].get(method, {})
    return sorted(
        (int(b), e["median_steps"])
        for b, e in row.items()
        if e.get("median_steps") is not None
    )


def _steps_over_gn(c: dict) -> str:
    """The best baseline's steps over GN's (after the warm-up), or where every
    baseline missed the target, the lower bounds from the budget."""
    key = "best_baseline_steps_over_gn"
    if c[key] is None and c.get(f"{key}_at_least") is not None:
        return (f"> {c[f'{key}_at_least']:.2f} "
                f"(> {c[f'{key}_after_warmup_at_least']:.2f}): every baseline "
                "missed")  # fmt: skip
    return (f"{_fmt(c[key], '{:.2f}')} "
            f"({_fmt(c[f'{key}_after_warmup'], '{:.2f}')})")  # fmt: skip


def _critical_text(method: str, c: dict) -> str:
    low, high = c["between"] or (None, None)
    if c["bound"] is None:
        return f"{method} {c['batch']:.0f} (between {low} and {high})"
    if c["bound"] == "above":
        return f"{method} > {low} (within the line at every batch)"
    if c["bound"] == "missed" and high is not None:
        return f"{method} between {low} and {high} (missed the target at {high})"
    if c["bound"] == "missed":
        return f"{method} >= {low} (the next batch missed within a short budget)"
    return f"{method} unknown (missed at the smallest batch)"


def _critical_batch_sizes(result: dict) -> list[str]:
    """Each method's critical batch size (`critical_batch`), in one line."""
    critical = result.get("critical_batch")
    if not critical:
        return []
    return [
        "- Critical batch size, Zhang et al.'s measure (the batch where the median "
        "steps to the target exceed the linear-scaling line from the smallest batch "
        "by 20%, interpolated in log-log between the two batches around it; "
        "`critical_batch`): "
        + ", ".join(_critical_text(m, c) for m, c in critical.items())
        + "."
    ]


def _critical_batch_lines(result: dict) -> list[str]:
    """Whether GN's steps keep falling where the baselines' flatten: each
    method's fall in median steps over the last doubling(s) of the batch."""
    sizes = sorted(result["settings"]["batch_sizes"])
    if len(sizes) < 2:
        return []
    lo, hi = sizes[-2], sizes[-1]
    budget = result["budgets"][str(hi)]
    lines = _critical_batch_sizes(result)
    falls = {}
    below = {}  # methods that missed at hi: their fall is below lo's steps / budget
    for method, row in result["chosen"].items():
        pts = dict(_scaling(result, method))
        top = row.get(str(hi)) or {}
        if lo in pts and hi in pts:
            falls[method] = pts[lo] / pts[hi]
        elif lo in pts and top.get("seeds_complete") and top["median_steps"] is None:
            below[method] = pts[lo] / budget
    if not falls:
        return [*lines,
                "- No method reached the target at both of the two largest batch "
                "sizes: the figure's right end cannot be read."]  # fmt: skip
    ideal = hi / lo
    text = ", ".join(
        [f"{m} {f:.2f}x" for m, f in falls.items()]
        + [f"{m} < {f:.2f}x (missed at {hi} within its {budget}-step budget)"
           for m, f in below.items()]
    )  # fmt: skip
    lines.append(
        f"- From batch {lo} to {hi} ({ideal:g}x the tokens per step; perfect "
        f"scaling would cut steps {ideal:g}x), median steps to the target fell: "
        f"{text}."
    )
    base = [(f, m, "") for m, f in falls.items() if m in BASELINES]
    base += [(f, m, "at most ") for m, f in below.items() if m in BASELINES]
    if base and "gn" in falls:
        best_fall, best, bound = max(base)
        if falls["gn"] > best_fall:
            verb = "kept falling faster than"
        elif bound:  # below an upper bound: the baseline's own fall is unknown
            verb = "cannot be told apart from"
        else:
            verb = "did not fall faster than"
        lines.append(
            f"- GN's steps {verb} the best-scaling baseline's ({best}) over that "
            f"doubling: {falls['gn']:.2f}x against {bound}{best_fall:.2f}x."
        )
    if "gn-layerwise" in falls and "gn" in falls:
        lines.append(
            f"- Layerwise GN's steps fell {falls['gn-layerwise']:.2f}x against full "
            f"GN's {falls['gn']:.2f}x."
        )
    return lines


def _claims_section(studies: list[tuple[dict, str]]) -> list[str]:
    lines = [
        "## The claims, as measured",
        "",
        "At each study's largest batch, on the medians over seeds of each method's "
        "chosen configuration (`claims.largest`; a seed that missed the target "
        "counts as past every budget). Steps after the warm-up subtract the "
        "shared AdamW warm-up from both counts, as the paper counts steps after "
        "its AdamW pre-training.",
        "",
        "| claim | " + " | ".join(
            f"{r['settings']['model']}, batch {max(r['settings']['batch_sizes'])}"
            for r, _ in studies
        ) + " |",
        "|---" * (len(studies) + 1) + "|",
    ]  # fmt: skip

    def row(name, cells):
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def ratio_cell(value, ok):
        return f"{_fmt(value, '{:.2f}x')} ({_verdict(ok)})"

    cells = []
    for r, _ in studies:
        c = r["claims"]["largest"]
        if c["best_baseline"] is None and c.get("best_baseline_steps_over_gn_at_least"):
            budget = r["budgets"][str(c["batch_size"])]
            base = f"every baseline > {budget} (missed within the budget)"
        else:
            base = f"{c['best_baseline'] or 'none'} {_fmt(c['best_baseline_steps'])}"
        cells.append(f"{base} / GN {_fmt(c['gn_steps'])}")
    row("best baseline's median steps / GN's median steps", cells)

    def step_ratio_cell(c, bound):
        """The ratio after the warm-up, or where every baseline missed the target,
        the lower bound from the budget: met only if the bound clears it."""
        v = c["best_baseline_steps_over_gn_after_warmup"]
        if v is not None:
            return ratio_cell(v, v >= bound)
        low = c.get("best_baseline_steps_over_gn_after_warmup_at_least")
        if low is None:
            return ratio_cell(None, None)
        verdict = _verdict(True) if low >= bound else "not measurable"
        return (f"> {low:.2f}x: every baseline missed the target within the "
                f"budget (`..._at_least`) ({verdict})")  # fmt: skip

    row(f"GN >= {PAPER_STEP_RATIO}x fewer steps than the best baseline after the "
        "warm-up (`best_baseline_steps_over_gn_after_warmup`)",
        [step_ratio_cell(r["claims"]["largest"], PAPER_STEP_RATIO)
         for r, _ in studies])  # fmt: skip
    row("GN needs fewer steps than the best baseline after the warm-up",
        [step_ratio_cell(r["claims"]["largest"], 1.0) for r, _ in studies])  # fmt: skip
    for key, label, layout in (
        ("gn_over_fastest_baseline", "fastest_baseline", "its own layout"),
        ("gn_over_fastest_baseline_in_gn_layout", "fastest_baseline_in_gn_layout",
         "GN's micro-batch layout"),
    ):  # fmt: skip
        cells = []
        for r, _ in studies:
            t = r["claims"].get("timed")
            if t is None:
                cells.append("not timed")
                continue
            v = t[key]
            bound = t.get(f"{key}_at_most")
            if v is None and bound is not None:
                cells.append(
                    f"< {bound:.2f}x of every baseline's: each missed the target, "
                    f"so needs more than its budget's main phase (`{key}_at_most`; "
                    f"{_verdict(bound <= 1.0) if bound <= 1.0 else 'not measurable'})"
                )
                continue
            cells.append(
                f"{_fmt(v, '{:.2f}x')} of {t[label] or 'none'}'s "
                f"({_verdict(None if v is None else v <= 1.0)})"
            )
        row(f"GN's main-phase time to target <= the fastest baseline's, the "
            f"baseline in {layout} (`claims.timed.{key}`)", cells)  # fmt: skip
    cells = []
    for r, _ in studies:
        v = r["claims"]["largest"]["layerwise_steps_over_gn"]
        cells.append(ratio_cell(v, None if v is None else v <= LAYERWISE_BOUND))
    row(f"layerwise GN within {LAYERWISE_BOUND}x of full GN's steps "
        "(`layerwise_steps_over_gn`)", cells)  # fmt: skip
    lines += [
        "",
        "**With batch size** (`claims.by_batch[batch]`, medians over seeds): the "
        "best baseline's steps over GN's (after the warm-up), GN's time over the "
        "fastest baseline's (runs' own clocks), layerwise over full GN's steps:",
        "",
        "| model | batch | best baseline | baseline / GN steps (after warm-up) | "
        "GN / fastest baseline time | layerwise / GN steps |",
        "|---|---|---|---|---|---|",
    ]
    for r, _ in studies:
        for b, c in sorted(r["claims"]["by_batch"].items(), key=lambda t: int(t[0])):
            lines.append(
                f"| {r['settings']['model']} | {b} | {c['best_baseline'] or 'none'} | "
                f"{_steps_over_gn(c)} | "
                f"{_fmt(c['gn_time_over_fastest_baseline'], '{:.2f}')} | "
                f"{_fmt(c['layerwise_steps_over_gn'], '{:.2f}')} |"
            )
    lines += ["", "**The critical batch size** (the paper's headline, from "
              "`chosen[method][batch].median_steps`):", ""]  # fmt: skip
    for r, _ in studies:
        lines += [f"*{r['settings']['model']}:*", "", *_critical_batch_lines(r), ""]
    return lines


def _caps(caps: list[tuple[dict, str]]) -> str:
    """The studies' caps in words: one number, or each study's with its file."""
    values = {max_runs(r) for r, _ in caps}
    if len(values) == 1:
        return f"{values.pop()} runs"
    return ", ".join(
        f"{max_runs(r)} runs ({r['settings']['model']}, `{f}`)" for r, f in caps
    )


def _protocol(result: dict, caps: list[tuple[dict, str]]) -> list[str]:
    s = result["settings"]
    largest = max(s["batch_sizes"])
    lines = [
        "## The protocol",
        "",
        "Declared in code before any run (`eqx_gn.lm.study._protocol`, recorded in "
        "each study.json):",
        "",
        f"- **Target** (`target_rule`): {result['target_rule']}.",
        f"- **Budget** (`budgets`): {s['steps']} steps at batch {largest}, the same "
        "tokens at every other batch size; a run stops at the target.",
        f"- **Tuning, one rule for every method** (`rule`): {result['rule']}.",
        f"- **The cap** (`max_runs`): at most {_caps(caps)} tune one method at "
        "one batch size, the same for every method; a choice not bracketed by "
        "worse runs when the cap is reached (still at an edge of what was tried, "
        "or every run missed the target) is a tuning failure, marked \\* in the "
        "tables below.",
        "- **Learning-rate centres at the largest batch** (`centres`): "
        + ", ".join(f"{m} {v:g}" for m, v in result["centres"].items()) + ".",
        f"- **GN's K** (`gn_micro_batches`): not searched; a fixed micro-batch of "
        f"{s['gn_micro_batch']} sequences, so K = batch / {s['gn_micro_batch']} ("
        + ", ".join(f"{k} at {b}" for b, k in result["gn_micro_batches"].items())
        + "): the paper's rule, whose inner steps grow with the batch.",
        f"- **Resolution**: runs with the target are evaluated at most "
        f"{s['eval_resolution']:g} x the step apart and at every step near the "
        "target (each run's `resolution`: the steps between its last two "
        "evaluations at the target; 1 is exact).",
        f"- **Seeds**: {s['seeds']} of each chosen configuration at every batch "
        "size (model initialisation and data order).",
        "- Steps, tokens and time to the target are read at the first evaluation "
        "at or below it; tokens count every token a method read, GN's "
        "line-search batches included; time is training time, compilation and "
        "evaluation excluded alike.",
        "",
        _gn_line_search(result),
        "",
    ]  # fmt: skip
    return lines


def max_runs(result: dict) -> int:
    """The study's declared cap on the runs that tune one method at one batch
    size: ``max_runs``, or in a second-edition study.json its settings'."""
    return result.get("max_runs", result["settings"]["max_runs"])


def _gn_line_search(result: dict) -> str:
    """Which line search the study's GN runs used (each run's resolved
    ``line_search``; runs from before it was a setting used the grid)."""
    rules = sorted(
        {
            r["resolved"].get("line_search") or "grid"
            for r in result["runs"]
            if r["method"].startswith("gn")
        }
    )
    names = {
        "grid": "the exhaustive grid (every step size evaluated, the paper's)",
        "warm": "the warm walk (from the last step's choice)",
        "none": "none (the solver's step taken whole)",
    }
    return (
        "GN's line search (each run's resolved `line_search`): "
        + "; ".join(names.get(rule, rule) for rule in rules)
        + ". A study trains GN with the runner's default line search, which is now "
        "the warm walk; `python benchmarks/line_search_effect.py --study "
        "STUDY.json` trains a study's chosen GN runs with both (results in "
        "`benchmarks/results/line_search_effect_<model>.json`)."
    )


def command_of(settings: dict, out: str) -> str:
    """The ``eqx-gn study`` command line that makes a study with ``settings``."""
    defaults = {
        "tokenizer": "byte",
        "warmup_fraction": 0.1,
        "eval_every": 1,
        "eval_resolution": 0.05,
        "eval_batches": 4,
        "eval_batch_size": 32,
        "ls_batches": 2,
        "gn_micro_batch": 4,
        "seed": 0,
    }
    parts = ["eqx-gn study"]
    for key in (
        "text", "tokenizer", "vocab_size", "model", "seq_len", "methods",
        "batch_sizes", "steps", "max_runs", "seeds", "target", "warmup_fraction",
        "eval_every", "eval_resolution", "eval_batches", "eval_batch_size",
        "ls_batches", "gn_micro_batch", "seed", "timing_rounds",
    ):  # fmt: skip
        value = settings.get(key)
        if value is None or defaults.get(key) == value:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        parts.append(f"--{key.replace('_', '-')} {value}")
    if not settings.get("layout_check", True):
        parts.append("--no-layout-check")
    parts.append(f"--out {out}")
    return " \\\n    ".join(parts)


def _commands(studies, study_dirs, path: Path) -> list[str]:
    lines = [
        "## How to run it",
        "",
        "The studies on this page (each reuses its finished runs, so a command "
        "run again only trains what is missing; the per-run directories go under "
        "`--runs-dir`, default `OUT/runs`):",
        "",
        "```bash",
    ]
    for (result, _), d in zip(studies, study_dirs, strict=True):
        lines.append(command_of(result["settings"], _display(Path(d))))
    others = " ".join(f"--report-with {_display(Path(d))}" for d in study_dirs[1:])
    lines += [
        "# this page, from the study.json files alone:",
        f"eqx-gn study --out {_display(Path(study_dirs[0]))} --report-only "
        f"--report {_display(path)} {others}".rstrip(),
        "```",
        "",
    ]
    return lines


def _makes_claims(result: dict) -> bool:
    """Whether a study holds GN and a first-order baseline, the pair every claim
    compares (a study of GN's variants alone, against a given target, makes
    none: its section reports its steps)."""
    methods = result["settings"]["methods"]
    return "gn" in methods and any(m in BASELINES for m in methods)


def write_report(study_dirs: list[Path], path: Path) -> None:
    """The results page at ``path`` from the studies' ``study.json``; their plots
    are copied to ``assets/<study directory name>/`` beside it."""
    studies = []
    for d in study_dirs:
        file = Path(d) / "study.json"
        if not file.exists():
            from ..run._config import ConfigError

            raise ConfigError(f"no study.json in {d}")
        result = json.loads(file.read_text())
        if result.get("format") not in READABLE_FORMATS:
            from ..run._config import ConfigError

            raise ConfigError(
                f"{file} is a study of format {result.get('format')!r}; this page "
                f"reports {' or '.join(map(repr, READABLE_FORMATS))} (the second "
                "and third editions' protocols): run the study again"
            )
        studies.append((result, _display(file)))
    path.parent.mkdir(parents=True, exist_ok=True)
    files = ", ".join(f"`{f}`" for _, f in studies)
    lines = [
        "# Results",
        "",
        "Steps, tokens and time to one hard target validation loss, for every "
        "method at every batch size, every method tuned by the same rule and "
        "every chosen learning rate bracketed by worse runs. Every number on this page "
        f"is read from {files} (key names in parentheses); the page is written by "
        "`eqx-gn study --report` from those files alone.",
        "",
    ]
    claimed = [study for study in studies if _makes_claims(study[0])]
    if claimed:
        lines += _claims_section(claimed)
    lines += _protocol(studies[0][0], studies)
    lines += _commands(studies, study_dirs, path)
    for (result, file), d in zip(studies, study_dirs, strict=True):
        assets = path.parent / "assets" / Path(d).name
        copy_plots(Path(d), assets)
        rel = os.path.relpath(assets, path.parent)
        lines += _study_section(result, file, rel)
    lines += _baselines_note(studies)
    for file in _robustness_files(studies, study_dirs):
        lines += _robustness_section(file, path)
    lines += _limits(studies)
    path.write_text("\n".join(lines).rstrip() + "\n")


def _robustness_files(studies, study_dirs: list[Path]) -> list[Path]:
    """``lr_robustness_<model>.json`` beside each study directory, for the
    studies' models, where it exists."""
    files = []
    for (result, _), d in zip(studies, study_dirs, strict=True):
        file = (
            Path(d).resolve().parent
            / f"lr_robustness_{result['settings']['model']}.json"
        )
        if file.exists() and file not in files:
            files.append(file)
    return files


def _factor(f: float) -> str:
    return f"{f:g}" if f >= 1 else f"1/{1 / f:g}"


def _robustness_section(file: Path, page: Path) -> list[str]:
    """Steps to target against the learning rate, from
    ``benchmarks/lr_robustness.py``'s JSON (and its figure, copied to assets)."""
    r = json.loads(file.read_text())
    name = _display(file)
    factors = r["factors"]
    lines = [
        f"## Learning-rate robustness ({r['model']})",
        "",
        f"Read from `{name}` (`python benchmarks/lr_robustness.py`, "
        f"{r['date']}, {r['machine']}): steps to the target against the learning "
        f"rate at x{_factor(factors[0])} to x{_factor(factors[-1])} each method's "
        "default, one seed "
        f"({r['seed']}), within the study's budget. GN is the runner's default GN "
        "(the model's inner step length, the fixed rule), its `--lr` the fraction of "
        "the model's step, at K = 8 and K = batch/4. The rule, declared before the "
        f"runs: the target is {r['rule']['target']}; steps to target are the "
        f"{r['rule']['steps_to_target']}; the good range is the "
        f"{r['rule']['good_range']}.",
        "",
        "| batch | method | "
        + " | ".join(f"x{_factor(f)}" for f in factors)
        + " | best | good range | width | default / best |",
        "|---|---|" + "---|" * len(factors) + "---|---|---|---|",
    ]
    for batch, entry in r["batch_sizes"].items():
        for method, runs in entry["runs"].items():
            cells = [
                "missed" if x["steps_to_target"] is None else str(x["steps_to_target"])
                for x in runs
            ]
            cells += [""] * (len(factors) - len(cells))
            g = entry["good_range"].get(method)
            if g is None:
                best = good = width = ratio = "not run"
            elif g["width"] is None:
                best = good = width = ratio = "missed"
            else:
                best = f"{g['best_steps']} at x{_factor(g['best_factor'])}"
                good = f"x{_factor(g['low_factor'])} to x{_factor(g['high_factor'])}"
                width = f"{'>= ' if g['open'] else ''}{g['width']:g}x"
                d = g.get("default_over_best")
                ratio = "missed" if d is None else f"{d:.2f}"
            lines.append(
                f"| {batch} | {method} | "
                + " | ".join(cells)
                + f" | {best} | {good} | {width} | {ratio} |"
            )
    lines.append("")
    for batch, entry in r["batch_sizes"].items():
        widths = entry["good_range"]
        if "muon" not in widths:
            continue
        for method, g in widths.items():
            if not method.startswith("gn"):
                continue
            gn, muon = g["width"], widths["muon"]["width"]
            ok = gn is not None and (muon is None or gn >= muon)
            lines.append(
                f"- Batch {batch}, {method}: GN's good range is {_fmt_width(g)}"
                f" wide against Muon's {_fmt_width(widths['muon'])} "
                f"({'met' if ok else '**missed**'}: at least as wide; "
                f"`batch_sizes.{batch}.good_range`)."
            )
    figure = file.with_suffix(".png")
    if figure.exists():
        assets = page.parent / "assets"
        assets.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, assets / figure.name)
        lines += ["", f"![learning-rate robustness](assets/{figure.name})"]
    return [*lines, ""]


def _fmt_width(g: dict) -> str:
    if g["width"] is None:
        return "empty (target missed at every learning rate)"
    return f"{'at least ' if g['open'] else ''}{g['width']:g}x"


def _baselines_note(studies: list[tuple[dict, str]]) -> list[str]:
    """PSGD-Kron's step cost against AdamW's, from the interleaved timing."""
    lines = ["## PSGD-Kron's step cost", ""]
    for r, file in studies:
        timing = r.get("timing")
        if not timing:
            continue
        m = timing["median_seconds_per_step"]
        if m.get("adamw") and m.get("psgd"):
            lines.append(
                f"- {r['settings']['model']}, batch {timing['batch_size']}: PSGD-Kron "
                f"{m['psgd']:.3f} s/step against AdamW's {m['adamw']:.3f} s/step "
                f"(medians of the interleaved timing): {m['psgd'] / m['adamw']:.2f}x "
                f"(`claims.timed.psgd_over_adamw_seconds_per_step`, `{file}`)."
            )
    lines += [
        "",
        "PSGD-Kron is `psgdax.kron` 0.1.1 (`tests/test_psgd.py`: on a rotated "
        "least-squares problem with Hessian condition number 10^6 it gets within "
        "1% of the solution where momentum SGD and Adam, at the best of the same "
        "13 learning rates, stay above 30%; deterministic; a run resumes from a "
        "checkpoint bit for bit). psgdax 0.1.1 fails under `jax_enable_x64` "
        "(float64/float32 branches of a `lax.cond`) and under "
        "`jax_numpy_rank_promotion='raise'`; the tests run it with JAX's defaults.",
        "",
    ]
    return lines


def timing_spread(result: dict) -> tuple[float, str] | None:
    """The largest ratio of time per step between runs of the same configuration
    (seeds of a chosen one) and the method it belongs to: how much the machine's
    load moved the clock while the study ran."""
    groups: dict[tuple, list[float]] = {}
    for r in result["runs"]:
        if r["role"] in ("layout",) or r["time_per_step"] is None:
            continue
        h = r["hyperparameters"]
        key = (r["method"], r["batch_size"], h["lr"], h["micro_batches"])
        groups.setdefault(key, []).append(r["time_per_step"])
    spreads = [(max(v) / min(v), k[0]) for k, v in groups.items() if len(v) > 1]
    return max(spreads, default=None)


def _limits(studies: list[tuple[dict, str]]) -> list[str]:
    lines = ["## Limits", ""]
    for r, file in studies:
        s = r["settings"]
        runs = list(r["runs"])
        params = runs[0]["summary"].get("num_params") if runs else None
        seq = runs[0]["resolved"].get("seq_len") if runs else None
        largest = max(s["batch_sizes"])
        notes = [
            f"{params:,} parameters" if params else "",
            f"at most {largest * seq:,} tokens per step" if seq else "",
            f"{s['steps']} steps per run at the largest batch",
            f"batch sizes {', '.join(map(str, s['batch_sizes']))} "
            f"({max(s['batch_sizes']) // min(s['batch_sizes'])}x)",
        ]
        if s["seeds"] < 2:
            notes.append("one seed only (no seed spread)")
        if not s.get("layout_check", True):
            notes.append("no layout check")
        spread = timing_spread(r)
        if spread is not None:
            notes.append(
                f"the same configuration's time per step varied up to "
                f"{spread[0]:.2f}x between its runs ({spread[1]}; from `runs`)"
            )
        text = "; ".join(n for n in notes if n)
        lines.append(f"- **{s['model']}** (`{file}`): {text}.")
    lines += [
        "- The paper's regime is 45M-150M parameters at up to 4M tokens per step, "
        "after a long AdamW pre-training; these studies are orders of magnitude "
        "smaller in both, with a warm-up of a tenth of each run.",
        "- Times are training time on the device named above; "
        "the machine's cores were shared with other work while the studies ran, "
        "so the runs' own clocks carry the spread shown above; the time claims "
        "use the interleaved timing (`timing`), where every configuration runs "
        "once per round in turn. Step and token counts do not depend on load.",
        "",
    ]
    return lines
