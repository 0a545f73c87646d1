"""Running a study (`eqx_gn.lm._study`): each run trained, or reused from its run
directory or ``study.json``; every method's N runs at every batch size, the seeds,
the layout runs and the interleaved timing; ``study.json`` and the plots saved.
"""

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._config import ConfigError, parse_method
from ._errors import Diverged
from ._study_plots import draw_plots
from ._study_protocol import Point, _point_of, choose, plan_grid, refine, target_of
from ._study_records import (
    Settings,
    _time_per_step,
    curve_of,
    read_run_dir,
    run_name,
    with_target,
)
from ._study_result import build_result, dumps, timed_claims

#: Main-phase steps of each timing run.
TIMING_STEPS = 10


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
        try:
            self.train(config)
        except Diverged as e:  # a learning rate too large: a run like any other
            self.log(f"{name}: {e}")
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
