r"""``eqx-gn study``: steps, tokens and time to one target validation loss, for every
method at every batch size, under the same tuning budget.

**The budget.** ``--runs N`` runs per method per batch size, the same ``N`` for
every method, spent by one rule (`plan_grid`, then `refine`):

1. *The grid*, ``N - 1`` points of the method's declared search space
   (`SEARCH_SPACES`). A first-order method (AdamW, Muon, SOAP, PSGD-Kron) searches
   its learning rate: ``N - 1`` values ``centre * 3**(i - (N - 2) / 2)``. A GN
   method searches its inner learning rate and ``K``, the micro-batches (inner
   steps) per outer step: the same ``N - 1`` learning rates, with ``K`` alternating
   between its two values from the largest down (for ``N = 3``: the two corners
   ``(lr_low, K_high)`` and ``(lr_high, K_low)`` of a 2 x 2 grid).
2. *One refinement run*, chosen by the same rule for every method (`refine`): the
   best run so far (fewest steps to the target, then the lowest validation loss)
   keeps every setting but its learning rate, which moves one grid step (x3) to the
   side where no run with those settings is; with runs on both sides, half a step
   (x3^(1/2)) toward the better neighbour; with runs on neither side, toward the
   method's declared centre.
3. *Seeds*: the chosen configuration of every method at the largest batch size is
   trained again with ``--seeds - 1`` more seeds, against the same target.

**The target** is ``--target``, or AdamW's best validation loss over its ``N``
runs at the largest batch size (trained first, with no target). Every other run
stops when it reaches the target; steps, tokens and time to the target are read
off each run's curve (first evaluation at or below it). Tokens count every token
the method read: GN's line-search batches included (`reached`).

**Layouts.** First-order methods run each step as one batch; GN works in ``K``
micro-batches. With ``--layout-check`` (default on) every first-order method's
chosen configuration at the largest batch runs once more with gradient
accumulation over GN's chosen ``K`` micro-batches (the same step, GN's layout), so
the page can state time per step in both layouts.

**Files.** ``OUT/study.json`` holds the settings, the search spaces, the target,
the chosen run per method and batch size, the claims, and every run (its
``method``, ``batch_size``, ``seed``, ``role``, ``hyperparameters``,
``steps_to_target``, ``tokens_to_target``, ``time_to_target``, ``final_val_loss``,
``config``, ``resolved``, ``summary`` and per-step ``curve``); the plots
``steps_to_target.png`` and ``loss_curves.png`` go next to it. Each run trains
in its own directory under ``--runs-dir``; a run whose directory has a finished
``summary.json``, or that ``study.json`` already holds, is not trained again.
``--report PATH`` writes the results page from ``study.json`` alone
(`eqx_gn.lm._study_report`).
"""

import argparse
import json
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config import ConfigError, parse_method

#: The first-order methods a study compares GN with.
BASELINES: tuple[str, ...] = ("adamw", "muon", "soap", "psgd")
#: The default methods of a study.
DEFAULT_METHODS: tuple[str, ...] = (*BASELINES, "gn", "gn-layerwise", "gn-prox")
#: Grid steps of the learning rate.
LR_FACTOR = 3.0


@dataclass(frozen=True)
class SearchSpace:
    """What a method's runs may vary: the learning rate around ``centre`` in steps
    of x3, and for GN the micro-batches ``K`` (``micro_batches``, largest first)."""

    centre: float
    micro_batches: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr_centre": self.centre,
            "lr_factor": LR_FACTOR,
            "micro_batches": list(self.micro_batches) or None,
        }


#: Each method's search space, declared before any run. Centres: the runner's
#: defaults, moved to the middle of what earlier 300-step studies on the same
#: corpus found best; GN's ``K`` in {8, 4}.
SEARCH_SPACES: dict[str, SearchSpace] = {
    "adamw": SearchSpace(3e-3),
    "muon": SearchSpace(5e-2),
    "soap": SearchSpace(1e-2),
    "psgd": SearchSpace(1e-3),
    "gn": SearchSpace(1.7320508e-2, (8, 4)),
}

#: The study.json format written by this module.
FORMAT = "eqx-gn study 2"


@dataclass(frozen=True)
class Point:
    """One configuration of a method's search space."""

    lr: float
    micro_batches: int | None = None


def search_space(method: str) -> SearchSpace:
    """The declared search space of ``method`` (a GN method: GN's)."""
    optimizer = parse_method(method)["optimizer"]
    space = SEARCH_SPACES.get(method, SEARCH_SPACES.get(optimizer))
    if space is None:
        raise ConfigError(f"no search space for method {method!r}")
    if optimizer == "gn" and parse_method(method)["solver"] == "cg":
        raise ConfigError(
            f"method {method!r}: GN with CG has no learning rate to search; the "
            "study compares methods with one"
        )
    return space


def plan_grid(method: str, runs: int) -> list[Point]:
    """The first ``runs - 1`` points of ``method`` (see the module docstring)."""
    space = search_space(method)
    size = runs - 1
    lrs = [
        _round(space.centre * LR_FACTOR ** (i - (size - 1) / 2)) for i in range(size)
    ]
    if not space.micro_batches:
        return [Point(lr) for lr in lrs]
    ks = space.micro_batches
    return [Point(lr, ks[i % len(ks)]) for i, lr in enumerate(lrs)]


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def rank(outcome: dict[str, Any]) -> tuple[float, float]:
    """The order of runs: fewest steps to the target, then the lowest best
    validation loss."""
    steps = outcome.get("steps_to_target")
    best = outcome.get("best_val_loss")
    return (
        math.inf if steps is None else float(steps),
        math.inf if best is None else float(best),
    )


def refine(method: str, tried: Sequence[tuple[Point, dict[str, Any]]]) -> Point:
    """The refinement run: the same rule for every method (module docstring).

    ``tried``: the points run so far with their outcomes (`rank` reads them).
    """
    space = search_space(method)
    best, _ = min(tried, key=lambda t: rank(t[1]))
    same = [(p, o) for p, o in tried if p.micro_batches == best.micro_batches]
    below = [(p, o) for p, o in same if p.lr < best.lr * (1 - 1e-9)]
    above = [(p, o) for p, o in same if p.lr > best.lr * (1 + 1e-9)]
    if below and above:
        lower = max(below, key=lambda t: t[0].lr)
        upper = min(above, key=lambda t: t[0].lr)
        up = rank(upper[1]) < rank(lower[1])
        factor = LR_FACTOR**0.5
    else:
        factor = LR_FACTOR
        if below or above:
            up = not above
        else:
            up = best.lr < space.centre
    lr = _round(best.lr * factor if up else best.lr / factor)
    taken = {(p.lr, p.micro_batches) for p, _ in tried}
    while (lr, best.micro_batches) in taken:  # only with hand-made grids
        lr = _round(lr * factor if up else lr / factor)
    return Point(lr, best.micro_batches)


# -- runs and their records ----------------------------------------------------

#: A run's curve in study.json: one value per step (``val_loss`` None where the
#: step had no evaluation; ``ls_tokens`` 0 for a first-order run).
CURVE_KEYS = (
    "step",
    "phase",
    "tokens",
    "ls_tokens",
    "time_s",
    "train_loss",
    "val_loss",
)


def run_name(method: str, batch: int, point: Point, seed: int = 0, accum: int = 1):
    """``{method}_b{batch}_lr{lr}[_K{K}][_A{accum}][_seed{seed}]``."""
    name = f"{method}_b{batch}_lr{point.lr:g}"
    if point.micro_batches is not None:
        name += f"_K{point.micro_batches}"
    if accum != 1:
        name += f"_A{accum}"
    if seed:
        name += f"_seed{seed}"
    return name


def curve_of(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The curve of a run from its ``metrics.jsonl`` records (``ls_tokens``
    carried forward, 0 before the first GN step)."""
    curve: dict[str, list[Any]] = {k: [] for k in CURVE_KEYS}
    ls = 0
    for r in records:
        ls = r.get("ls_tokens", ls) or ls
        for k in CURVE_KEYS:
            curve[k].append(ls if k == "ls_tokens" else r.get(k))
    return curve


def reached(curve: dict[str, list[Any]], target: float | None) -> dict[str, Any]:
    """Step, tokens read (line-search tokens included) and training time at the
    first evaluation at or below ``target``; None where it never gets there."""
    if target is not None:
        for i, loss in enumerate(curve["val_loss"]):
            if loss is not None and loss <= target:
                return {
                    "steps_to_target": curve["step"][i],
                    "tokens_to_target": curve["tokens"][i]
                    + (curve["ls_tokens"][i] or 0),
                    "time_to_target": curve["time_s"][i],
                }
    return {"steps_to_target": None, "tokens_to_target": None, "time_to_target": None}


def make_record(
    name: str,
    role: str,
    config: dict[str, Any],
    resolved: dict[str, Any],
    summary: dict[str, Any],
    curve: dict[str, list[Any]],
    target: float | None,
) -> dict[str, Any]:
    """A run as study.json holds it, its outcome measured against ``target``."""
    method = _method_of(config)
    losses = [v for v in curve["val_loss"] if v is not None]
    record = {
        "name": name,
        "method": method,
        "role": role,
        "batch_size": config["batch_size"],
        "seed": config["seed"],
        "hyperparameters": {
            "lr": config.get("lr"),
            "micro_batches": config.get("micro_batches")
            if method.startswith("gn")
            else None,
            "grad_accumulation": config.get("grad_accumulation", 1),
        },
        **reached(curve, target),
        "final_val_loss": losses[-1] if losses else None,
        "best_val_loss": min(losses) if losses else None,
        "time_per_step": _time_per_step(curve),
        "config": config,
        "resolved": resolved,
        "summary": summary,
        "curve": curve,
    }
    return record


def _time_per_step(curve: dict[str, list[Any]]) -> float | None:
    """Mean training time of the main phase's steps."""
    times = [
        t for t, p in zip(curve["time_s"], curve["phase"], strict=False) if p == "main"
    ]
    steps = [
        s for s, p in zip(curve["step"], curve["phase"], strict=False) if p == "main"
    ]
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (steps[-1] - steps[0])


def with_target(record: dict[str, Any], target: float | None) -> dict[str, Any]:
    """``record`` with its outcome measured against ``target``."""
    return {**record, **reached(record["curve"], target)}


def _method_of(config: dict[str, Any]) -> str:
    optimizer = config["optimizer"]
    if optimizer.startswith("gn-"):  # configurations saved before blocks/solver
        config = {**config, **parse_method(optimizer)}
        optimizer = "gn"
    if optimizer != "gn":
        return optimizer
    parts = ["gn"]
    if config.get("blocks", "full") != "full":
        parts.append(config["blocks"])
    if config.get("solver", "inner") != "inner":
        parts.append(config["solver"])
    return "-".join(parts)


def read_run_dir(path: Path, role: str, target: float | None) -> dict | None:
    """A finished run's record from its directory; None without a completed
    ``summary.json``."""
    summary_file = path / "summary.json"
    if not summary_file.exists():
        return None
    summary = json.loads(summary_file.read_text())
    if not summary.get("completed", True):
        return None
    config = json.loads((path / "config.json").read_text())
    lines = (path / "metrics.jsonl").read_text().splitlines()
    curve = curve_of([json.loads(line) for line in lines if line.strip()])
    return make_record(
        path.name, role, config["config"], config["resolved"], summary, curve, target
    )


# -- the study -----------------------------------------------------------------


@dataclass
class Settings:
    """What defines a study's runs."""

    text: str | None
    tokenizer: str
    vocab_size: int | None
    model: str
    seq_len: int | None
    methods: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    steps: int
    runs: int
    seeds: int
    target: float | None
    warmup_fraction: float
    eval_every: int
    eval_batches: int
    eval_batch_size: int
    ls_batches: int
    seed: int
    layout_check: bool
    timing_rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        values = dict(vars(self))
        values["methods"] = list(self.methods)
        values["batch_sizes"] = list(self.batch_sizes)
        return values


def _usable(record: dict | None, target: float | None, steps: int) -> bool:
    """Whether a finished run answers for ``target``: it ran its whole budget, or
    stopped at a target no higher than this one."""
    if record is None:
        return False
    summary = record["summary"]
    stopped_at = summary.get("target_loss")
    if summary.get("steps") == steps and not summary.get("target_reached"):
        return True
    return target is not None and stopped_at is not None and stopped_at <= target


class Study:
    """The runs of a study and the rule that chooses them."""

    def __init__(
        self,
        settings: Settings,
        out: Path,
        runs_dir: Path,
        train: Callable | None,
        log: Callable[[str], None] = print,
    ):
        self.settings = settings
        self.out = out
        self.runs_dir = runs_dir
        self.train = train  # None: report only, from what exists
        self.log = log
        previous = out / "study.json"
        self.previous = json.loads(previous.read_text()) if previous.exists() else {}
        self.known: dict[str, dict] = {
            r["name"]: r for r in self.previous.get("runs", [])
        }
        self.target: float | None = settings.target
        self.chosen: dict[str, dict[str, str]] = {}
        self.missing: list[str] = []

    # -- one run
    def run(self, method: str, batch: int, point: Point, role: str, seed: int = 0,
            accum: int = 1, target: float | None = None) -> dict | None:  # fmt: skip
        name = run_name(method, batch, point, seed, accum)
        record = self.known.get(name)
        if not _usable(record, target, self.settings.steps):
            record = read_run_dir(self.runs_dir / name, role, target)
        if not _usable(record, target, self.settings.steps):
            if self.train is None:
                self.missing.append(name)
                return None
            record = self._train(name, method, batch, point, role, seed, accum, target)
        record = {**with_target(record, target), "role": role}
        self.known[name] = record
        return record

    def _train(self, name, method, batch, point, role, seed, accum, target):
        from ._config import TrainConfig

        s = self.settings
        fields = dict(
            text=s.text,
            tokenizer=s.tokenizer,
            vocab_size=s.vocab_size,
            model=s.model,
            seq_len=s.seq_len,
            steps=s.steps,
            batch_size=batch,
            lr=point.lr,
            warmup_fraction=s.warmup_fraction,
            eval_every=s.eval_every,
            eval_batches=s.eval_batches,
            eval_batch_size=s.eval_batch_size,
            ls_batches=s.ls_batches,
            target_loss=target,
            seed=s.seed + seed,
            out=str(self.runs_dir / name),
            checkpoint_every=0,
            overwrite=True,
            progress=False,
        )
        if point.micro_batches is not None:
            fields["micro_batches"] = point.micro_batches
        if accum != 1:
            fields["grad_accumulation"] = accum
        config = TrainConfig(**fields, **parse_method(method))
        start = time.perf_counter()
        self.train(config)
        record = read_run_dir(self.runs_dir / name, role, target)
        if record is None:
            raise ConfigError(f"run {name} ended without a summary.json")
        self.log(
            f"{name:<34} final {record['final_val_loss']:.4f} "
            f"target@{record['steps_to_target']} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        return record

    # -- N runs of a method at a batch size
    def search(self, method: str, batch: int, target: float | None) -> list[dict]:
        tried: list[tuple[Point, dict]] = []
        for point in plan_grid(method, self.settings.runs):
            record = self.run(method, batch, point, "grid", target=target)
            if record is None:
                return [r for _, r in tried]
            tried.append((point, record))
        point = refine(method, tried)
        record = self.run(method, batch, point, "refine", target=target)
        if record is not None:
            tried.append((point, record))
        return [r for _, r in tried]

    def execute(self) -> dict[str, Any]:
        s = self.settings
        largest = max(s.batch_sizes)
        searched: dict[str, dict[int, list[dict]]] = {m: {} for m in s.methods}
        # 1. The target: AdamW at the largest batch, with no target to stop at.
        if self.target is None:
            if "adamw" not in s.methods:
                raise ConfigError(
                    "--methods must include adamw to set the target, or give --target"
                )
            adamw = self.search("adamw", largest, None)
            if len(adamw) < s.runs:
                raise ConfigError(
                    f"AdamW's {s.runs} runs at batch {largest} are not all finished "
                    f"(in {self.out / 'study.json'} or under {self.runs_dir}); "
                    "cannot set the target"
                )
            self.target = target_of(adamw)
            self.log(f"target: AdamW's best validation loss at batch {largest}: "
                     f"{self.target:.4f}")  # fmt: skip
        # 2. Every method at every batch size, largest first.
        for batch in sorted(s.batch_sizes, reverse=True):
            for method in s.methods:
                searched[method][batch] = self.search(method, batch, self.target)
                self._save(searched)
        # 3. Seeds of each method's chosen configuration at the largest batch.
        for method in s.methods:
            best = choose(searched[method].get(largest, []))
            if best is None:
                continue
            point = _point_of(best)
            for seed in range(1, s.seeds):
                self.run(method, largest, point, "seed", seed, target=self.target)
            self._save(searched)
        # 4. The layout check: first-order methods with GN's micro-batches.
        if s.layout_check and "gn" in s.methods:
            gn = choose(searched["gn"].get(largest, []))
            for method in s.methods:
                best = choose(searched[method].get(largest, []))
                if gn is None or best is None or method.startswith("gn"):
                    continue
                k = gn["hyperparameters"]["micro_batches"]
                self.run(method, largest, _point_of(best), "layout", accum=k,
                         target=self.target)  # fmt: skip
            self._save(searched)
        # 5. Timing: the chosen configurations at the largest batch in short runs,
        # interleaved round by round, so that the machine's load falls alike.
        self.timing = self.previous.get("timing")
        if s.timing_rounds and self.train is not None and self.timing is None:
            self.timing = self._measure_timing(searched)
        return self._save(searched, plots=True)

    def _measure_timing(self, searched) -> dict[str, Any]:
        from ._config import TrainConfig

        s = self.settings
        largest = max(s.batch_sizes)
        gn = choose(searched.get("gn", {}).get(largest, []))
        k = gn["hyperparameters"]["micro_batches"] if gn else None
        configs = []
        for method in s.methods:
            best = choose(searched[method].get(largest, []))
            if best is None:
                continue
            configs.append((method, 1, _point_of(best)))
            if k and not method.startswith("gn"):
                configs.append((method, k, _point_of(best)))
        by_config: dict[str, list[float]] = {}
        for r in range(s.timing_rounds):
            for method, accum, point in configs:
                label = method if accum == 1 else f"{method} A{accum}"
                name = run_name(method, largest, point, 0, accum) + f"_timing{r}"
                fields = dict(
                    text=s.text, tokenizer=s.tokenizer, vocab_size=s.vocab_size,
                    model=s.model, seq_len=s.seq_len, steps=TIMING_STEPS + 1,
                    batch_size=largest, lr=point.lr, warmup_fraction=0.05,
                    eval_every=0, eval_batches=1, eval_batch_size=s.eval_batch_size,
                    ls_batches=s.ls_batches, seed=s.seed, checkpoint_every=0,
                    out=str(self.runs_dir / "timing" / name), overwrite=True,
                    progress=False, grad_accumulation=accum,
                )  # fmt: skip
                if point.micro_batches is not None:
                    fields["micro_batches"] = point.micro_batches
                self.train(TrainConfig(**fields, **parse_method(method)))
                lines = self.runs_dir / "timing" / name / "metrics.jsonl"
                records = [json.loads(x) for x in lines.read_text().splitlines()]
                seconds = _time_per_step(curve_of(records))
                by_config.setdefault(label, []).append(seconds)
                self.log(f"timing round {r}: {label:<16} {seconds:.3f} s/step")
        return {
            "batch_size": largest,
            "main_steps_per_run": TIMING_STEPS,
            "rounds": s.timing_rounds,
            "seconds_per_step": by_config,
            "median_seconds_per_step": {
                label: statistics.median(v) for label, v in by_config.items()
            },
        }

    def _save(self, searched, plots: bool = False) -> dict[str, Any]:
        result = build_result(self.settings, self.target, searched, self.known)
        timing = getattr(self, "timing", None) or self.previous.get("timing")
        if timing is not None:
            result["timing"] = timing
            result["claims"]["timed"] = timed_claims(result, timing)
        result["device"] = self._device()
        self.out.mkdir(parents=True, exist_ok=True)
        if plots:
            result["plots"] = draw_plots(result, self.out)
        (self.out / "study.json").write_text(dumps(result))
        return result

    def _device(self) -> dict[str, Any]:
        if self.train is None and "device" in self.previous:
            return self.previous["device"]
        import os

        import jax

        return {
            "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        }


def _point_of(record: dict) -> Point:
    h = record["hyperparameters"]
    return Point(h["lr"], h["micro_batches"])


def target_of(adamw_runs: Sequence[dict]) -> float:
    """The default target: the best validation loss of AdamW's runs (those at the
    largest batch)."""
    losses = [r["best_val_loss"] for r in adamw_runs if r["best_val_loss"] is not None]
    if not losses:
        raise ConfigError("AdamW's runs recorded no validation loss")
    return min(losses)


def choose(records: Sequence[dict]) -> dict | None:
    """The chosen run of a method at a batch size: the best by `rank` among its
    search (grid and refinement) runs."""
    candidates = [r for r in records if r.get("role") in ("grid", "refine")]
    return min(candidates, key=rank, default=None)


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


#: Main-phase steps of each timing run.
TIMING_STEPS = 10


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


RULE = (
    "N runs per method and batch size: N - 1 grid points (learning rates x3 apart "
    "around the declared centre; GN alternates K between its two values), then one "
    "refinement run: the best run so far moves its learning rate x3 to the side "
    "with no run of the same settings (x3^(1/2) toward the better neighbour when "
    "both sides have one; toward the centre when neither has)"
)


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


# -- plots and json ------------------------------------------------------------

COLORS = {
    "adamw": "C0",
    "muon": "C1",
    "soap": "C2",
    "psgd": "C6",
    "gn": "C3",
    "gn-layerwise": "C4",
    "gn-prox": "C5",
}


def draw_plots(result: dict[str, Any], out: Path) -> list[str]:
    """``steps_to_target.png`` (chosen runs, steps against tokens per step) and
    ``loss_curves.png`` (chosen runs at the largest batch: validation loss against
    steps and training time), from ``result`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, target = result["settings"], result["target"]
    runs = {r["name"]: r for r in result["runs"]}
    seq = next(iter(runs.values()))["resolved"].get("seq_len") if runs else None
    seq = seq or 1
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, row in result["chosen"].items():
        pts = sorted(
            (int(b) * seq, e["steps_to_target"])
            for b, e in row.items()
            if e["steps_to_target"] is not None
        )
        if pts:
            ax.plot(
                *zip(*pts, strict=False), "o-", label=method, color=COLORS.get(method)
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("steps to target")
    ax.set_title(f"{settings['model']} model: steps to validation loss {target:.3f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(out / "steps_to_target.png", dpi=110)
    plt.close(fig)

    largest = str(max(settings["batch_sizes"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, row in result["chosen"].items():
        entry = row.get(largest)
        if entry is None:
            continue
        curve = runs[entry["run"]]["curve"]
        idx = [i for i, v in enumerate(curve["val_loss"]) if v is not None]
        losses = [curve["val_loss"][i] for i in idx]
        color = COLORS.get(method)
        a1.plot([curve["step"][i] for i in idx], losses, label=method, color=color)
        a2.plot([curve["time_s"][i] for i in idx], losses, label=method, color=color)
    for a, xlabel in ((a1, "step"), (a2, "training time (s)")):
        a.set_xlabel(xlabel)
        a.set_ylabel("validation loss")
        a.grid(True, alpha=0.3)
        a.axhline(target, color="grey", linestyle=":", linewidth=1)
        a.set_ylim(target - 0.1, target + 1.0)
    if result.get("warmup_steps"):
        a1.axvline(result["warmup_steps"], color="grey", linewidth=0.8)
    a1.set_title(f"chosen runs, batch {largest} sequences")
    a1.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    return ["steps_to_target.png", "loss_curves.png"]


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


# -- the command ---------------------------------------------------------------


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"{flag} takes integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} takes positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``eqx-gn study``."""
    parser.epilog = __doc__.split("\n\n", 1)[1].replace("``", "")
    a = parser.add_argument
    a(
        "--text",
        default=None,
        metavar="PATH",
        help="a UTF-8 text file or a directory of .txt files (default: Shakespeare)",
    )
    a("--tokenizer", default="byte", choices=("byte", "bpe"))
    a("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    a("--model", default="tiny", help="a name of eqx_gn.lm.CONFIGS")
    a("--seq-len", type=int, default=None, help="default: the model's")
    a(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: adamw, muon, soap, psgd, gn[-layerwise][-prox]",
    )
    a("--batch-sizes", default="8,16,32,128", help="sequences per step")
    a("--steps", type=int, default=100, help="steps per run, warm-up included")
    a(
        "--runs",
        type=int,
        default=3,
        help="N, runs per method per batch size: N - 1 grid points and one "
        "refinement run (default 3)",
    )
    a(
        "--seeds",
        type=int,
        default=3,
        help="seeds of each method's chosen configuration at the largest batch",
    )
    a(
        "--target",
        type=float,
        default=None,
        help="target validation loss (default: AdamW's best at the largest batch)",
    )
    a("--warmup-fraction", type=float, default=0.1)
    a("--eval-every", type=int, default=5)
    a("--eval-batches", type=int, default=4)
    a("--eval-batch-size", type=int, default=32)
    a("--ls-batches", type=int, default=2)
    a("--seed", type=int, default=0)
    a(
        "--timing-rounds",
        type=int,
        default=3,
        help="rounds of short timing runs of the chosen configurations at the "
        "largest batch, interleaved so that load falls alike (0: none)",
    )
    a(
        "--no-layout-check",
        dest="layout_check",
        action="store_false",
        help="skip the first-order runs with GN's micro-batch layout",
    )
    a("--out", default="runs/study", help="where study.json and the plots go")
    a("--runs-dir", default=None, help="per-run directories (default: OUT/runs)")
    a(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the runs study.json or --runs-dir hold",
    )
    a(
        "--report",
        default=None,
        metavar="PATH",
        help="write the results page (markdown) from study.json to PATH",
    )
    a("--report-with", action="append", default=[], metavar="DIR",
      help="another study directory whose study.json the page also reports "
      "(repeatable)")  # fmt: skip


def settings_from(args: argparse.Namespace) -> Settings:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise ConfigError("--methods lists no method")
    for method in methods:
        search_space(method)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {args.methods}")
    if args.runs < 2:
        raise ConfigError(f"--runs must be >= 2 (a grid point and a refinement), "
                          f"got {args.runs}")  # fmt: skip
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    batches = tuple(sorted(set(_ints(args.batch_sizes, "--batch-sizes"))))
    for method in methods:
        for point in plan_grid(method, args.runs):
            k = point.micro_batches
            bad = [b for b in batches if k and b % k]
            if bad:
                raise ConfigError(
                    f"--batch-sizes {bad[0]} is not divisible by {method}'s K={k}"
                )
    return Settings(
        text=args.text,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        model=args.model,
        seq_len=args.seq_len,
        methods=methods,
        batch_sizes=batches,
        steps=args.steps,
        runs=args.runs,
        seeds=args.seeds,
        target=args.target,
        warmup_fraction=args.warmup_fraction,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        eval_batch_size=args.eval_batch_size,
        ls_batches=args.ls_batches,
        seed=args.seed,
        layout_check=args.layout_check,
        timing_rounds=args.timing_rounds,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``eqx-gn study``."""
    out = Path(args.out)
    settings = settings_from(args)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    if args.report_only:
        train = None
    else:
        from ._train import train
    study = Study(settings, out, runs_dir, train, log=lambda s: print(s, flush=True))
    result = study.execute()
    if study.missing:
        print(f"not run (--report-only): {len(study.missing)} runs, e.g. "
              f"{study.missing[0]}", flush=True)  # fmt: skip
    from ._study_report import print_tables, write_report

    print_tables(result)
    print(f"wrote {out / 'study.json'} ({len(result['runs'])} runs)")
    if args.report:
        write_report([out, *map(Path, args.report_with)], Path(args.report))
        print(f"wrote {args.report}")
    return 0


def copy_plots(study_dir: Path, assets: Path) -> list[Path]:
    """Copy a study's plots into ``assets`` (for the results page)."""
    assets.mkdir(parents=True, exist_ok=True)
    study = json.loads((study_dir / "study.json").read_text())
    copied = []
    names = study.get("plots") or [
        n
        for n in ("steps_to_target.png", "loss_curves.png")
        if (study_dir / n).exists()
    ]
    for name in names:
        shutil.copyfile(study_dir / name, assets / name)
        copied.append(assets / name)
    return copied
