"""Running a study (`eqx_gn.lm.study`): each run trained, or reused from its run
directory or ``study.json``; every method's N runs at every batch size, the seeds,
the layout runs and the interleaved timing; ``study.json`` and the plots saved.
"""

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import Diverged
from ..results._saved_runs import curve_of
from ..run._config import ConfigError
from ._figures import draw_plots
from ._protocol import (
    BASELINES,
    TARGET_AT,
    TARGET_SEEDS,
    Point,
    _point_of,
    bracketed,
    centre,
    choose,
    micro_batches,
    next_point,
    rank,
)
from ._records import (
    Settings,
    _time_per_step,
    read_run_dir,
    run_name,
    with_target,
)
from ._result import FORMAT, build_result, dumps, timed_claims

#: Main-phase steps of each timing run.
TIMING_STEPS = 10


def _evaluations(curve: dict[str, list[Any]]) -> list[list[Any]]:
    """``[step, validation loss]`` at each evaluation of a run's curve."""
    return [
        [step, loss]
        for step, loss in zip(curve["step"], curve["val_loss"], strict=True)
        if loss is not None
    ]


def _usable(
    record: dict | None, target: float | None, give_up: int | None, steps: int
) -> bool:
    """Whether a finished run answers for ``target`` when asked to give up at
    ``give_up``: it ran its whole budget of ``steps``, or stopped at a target no
    higher than this one, or gave up on this target no earlier than asked."""
    if record is None:
        return False
    summary = record["summary"]
    stopped_at = summary.get("target_loss")
    if summary.get("gave_up_at") is not None:
        return (
            stopped_at == target
            and give_up is not None
            and give_up <= summary["gave_up_at"]
        )
    if summary.get("target_reached"):
        return target is not None and stopped_at <= target
    return summary.get("steps") == steps


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
        if self.previous.get("format") != FORMAT:
            self.previous = {}  # another edition's runs answer other questions
        self.known: dict[str, dict] = {
            r["name"]: r for r in self.previous.get("runs", [])
        }
        self.target: float | None = settings.target
        self.target_source: dict[str, Any] | None = None
        self.tuning: dict[str, dict[str, dict]] = {}
        self.target_tuning: dict[str, dict] = {}
        self.missing: list[str] = []

    # -- one run
    def run(self, method: str, batch: int, point: Point, role: str, seed: int = 0,
            accum: int = 1, target: float | None = None,
            give_up: int | None = None) -> dict | None:  # fmt: skip
        name = run_name(method, batch, point, seed, accum)
        steps = self.settings.budget(batch)
        record = self.known.get(name)
        if not _usable(record, target, give_up, steps):
            record = read_run_dir(self.runs_dir / name, role, target)
        if not _usable(record, target, give_up, steps):
            if self.train is None:
                self.missing.append(name)
                return None
            record = self._train(
                name, method, batch, point, role, seed, accum, target, give_up
            )
        record = {**with_target(record, target), "role": role}
        self.known[name] = record
        return record

    def _train(self, name, method, batch, point, role, seed, accum, target, give_up):
        s = self.settings
        config = s.train_config(
            method,
            batch,
            point,
            self.runs_dir / name,
            # Without a target (the runs that set it): every eval_every steps;
            # with one: the eval_resolution schedule.
            eval_every=s.eval_every if target is None else 0,
            eval_resolution=0.0 if target is None else s.eval_resolution,
            give_up_after=give_up,
            target_loss=target,
            seed=s.seed + seed,
            grad_accumulation=accum,
        )
        start = time.perf_counter()
        try:
            self.train(config)
        except Diverged as e:  # a learning rate too large: a run like any other
            self.log(f"{name}: {e}")
        record = read_run_dir(self.runs_dir / name, role, target)
        if record is None:
            raise ConfigError(f"run {name} ended without a summary.json")
        self.log(
            f"{name:<34} best {record['best_val_loss']:.4f} "
            f"target@{record['steps_to_target']} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        return record

    # -- one method at one batch size, tuned by the one rule
    def tune(self, method: str, batch: int, start: float, target: float | None,
             role: str = "tune") -> list[dict]:  # fmt: skip
        s = self.settings
        k = micro_batches(method, batch, s.gn_micro_batch)
        tried: list[tuple[Point, dict]] = []
        has_target = target is not None
        while (
            point := next_point(start, tried, k, s.max_runs, has_target)
        ) is not None:
            reached = [o["steps_to_target"] for _, o in tried
                       if o["steps_to_target"] is not None]  # fmt: skip
            give_up = min(reached, default=None) if target is not None else None
            record = self.run(method, batch, point, role, target=target,
                              give_up=give_up)  # fmt: skip
            if record is None:
                break
            tried.append((point, record))
        record = {
            "start_lr": start,
            "runs": [r["name"] for _, r in tried],
            "bracketed": bracketed(tried, has_target),
            "complete": point is None,
        }
        if target is None:  # the runs that set the target, ranked by their loss
            self.target_tuning[method] = record
        else:
            self.tuning.setdefault(method, {})[str(batch)] = record
        return [r for _, r in tried]

    def _set_target(self, largest: int) -> None:
        """The target: the median over `TARGET_SEEDS` seeds of the best tuned
        first-order baseline's configuration of their validation losses at the
        evaluation nearest below `TARGET_AT` of the budget, at the largest batch
        (runs with no target, over the whole budget)."""
        s = self.settings
        baselines = [m for m in s.methods if m in BASELINES]
        if not baselines:
            raise ConfigError(
                "--methods must include a first-order baseline to set the target, "
                "or give --target"
            )
        chosen = []
        for method in baselines:
            missing = len(self.missing)
            runs = self.tune(method, largest, centre(method), None, "target-tune")
            if not runs or len(self.missing) > missing:
                raise ConfigError(
                    f"{method}'s runs at batch {largest} are not all finished (in "
                    f"{self.out / 'study.json'} or under {self.runs_dir}); cannot "
                    "set the target"
                )
            best = min(runs, key=rank)
            chosen.append(best)
        best = min(chosen, key=rank)
        at = round(TARGET_AT * s.budget(largest))
        seeds = [best]
        for seed in range(1, TARGET_SEEDS):
            record = self.run(best["method"], largest, _point_of(best),
                              "target-seed", seed)  # fmt: skip
            if record is None:
                raise ConfigError(
                    f"{best['method']}'s seed {seed} at batch {largest} is not "
                    "finished; cannot set the target"
                )
            seeds.append(record)
        at_step = []
        for run in seeds:
            points = [(st, v) for st, v in _evaluations(run["curve"]) if st <= at]
            if not points:
                raise ConfigError(f"run {run['name']} has no evaluation by step {at}")
            at_step.append(points[-1])
        self.target = statistics.median(loss for _, loss in at_step)
        self.target_source = {
            "run": best["name"],
            "method": best["method"],
            "step": at_step[0][0],
            "budget": s.budget(largest),
            "batch_size": largest,
            # The median of these seeds' losses at their evaluation nearest
            # below TARGET_AT of the budget, with their validation curves.
            "seed_runs": [r["name"] for r in seeds],
            "seed_steps": [st for st, _ in at_step],
            "seed_losses": [v for _, v in at_step],
            "seed_curves": {r["name"]: _evaluations(r["curve"]) for r in seeds},
            # Each baseline tuned with no target, by its lowest validation loss.
            "tuning": self.target_tuning,
        }
        self.log(f"target: the median of {best['method']}'s {len(seeds)} seeds' "
                 f"validation losses at step {at_step[0][0]} of {s.budget(largest)} "
                 f"at batch {largest}: {self.target:.4f}")  # fmt: skip

    def execute(self) -> dict[str, Any]:
        s = self.settings
        largest = max(s.batch_sizes)
        searched: dict[str, dict[int, list[dict]]] = {m: {} for m in s.methods}
        # 1. The target, from the first-order baselines at the largest batch.
        if self.target is None:
            self._set_target(largest)
        # 2. Every method at every batch size, largest first, each started from
        # its learning rate at the next larger batch.
        starts = {m: centre(m) for m in s.methods}
        for batch in sorted(s.batch_sizes, reverse=True):
            for method in s.methods:
                runs = self.tune(method, batch, starts[method], self.target)
                searched[method][batch] = runs
                best = choose(runs)
                if best is not None:
                    starts[method] = best["hyperparameters"]["lr"]
                self._save(searched)
        # 3. Seeds of every chosen configuration at every batch size.
        for batch in sorted(s.batch_sizes, reverse=True):
            for method in s.methods:
                best = choose(searched[method].get(batch, []))
                if best is None:
                    continue
                for seed in range(1, s.seeds):
                    self.run(method, batch, _point_of(best), "seed", seed,
                             target=self.target)  # fmt: skip
            self._save(searched)
        # 3b. GN as a user runs it: each GN method at its runner default (no
        # tuned rate) at every batch size, on every seed.
        for batch in sorted(s.batch_sizes, reverse=True):
            for method in s.methods:
                k = micro_batches(method, batch, s.gn_micro_batch)
                if k is None:
                    continue
                for seed in range(s.seeds):
                    self.run(method, batch, Point(None, k), "default", seed,
                             target=self.target)  # fmt: skip
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
                config = s.train_config(
                    method,
                    largest,
                    point,
                    self.runs_dir / "timing" / name,
                    steps=TIMING_STEPS + 1,
                    warmup_fraction=0.05,
                    eval_every=0,
                    eval_batches=1,
                    grad_accumulation=accum,
                )
                self.train(config)
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
        result = build_result(
            self.settings,
            self.target,
            self.target_source,
            searched,
            self.tuning,
            self.known,
        )
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
