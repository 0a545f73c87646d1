"""A study's runs as ``study.json`` holds them (`eqx_gn.lm.study`): each run's
record and curve, read from its run directory, and the settings that define the
study's runs.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..results._saved_runs import curve_of
from ..run._config import TrainConfig, parse_method
from ._protocol import Point, reached, resolution


def run_name(method: str, batch: int, point: Point, seed: int = 0, accum: int = 1):
    """``{method}_b{batch}_lr{lr}[_K{K}][_A{accum}][_seed{seed}]``, ``default`` for
    ``lr{lr}`` at the runner's default learning rate."""
    lr = "default" if point.lr is None else f"lr{point.lr:g}"
    name = f"{method}_b{batch}_{lr}"
    if point.micro_batches is not None:
        name += f"_K{point.micro_batches}"
    if accum != 1:
        name += f"_A{accum}"
    if seed:
        name += f"_seed{seed}"
    return name


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
        "gave_up_at": summary.get("gave_up_at"),
        "final_val_loss": losses[-1] if losses else None,
        "best_val_loss": min(losses) if losses else None,
        "time_per_step": _time_per_step(curve),
        "config": config,
        "resolved": resolved,
        "summary": summary,
        "curve": curve,
    }
    return with_target(record, target)


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
    """``record`` with its outcome measured against ``target``, and the spacing of
    its evaluations there (`resolution`)."""
    outcome = reached(record["curve"], target)
    return {
        **record,
        **outcome,
        "resolution": resolution(record["curve"], outcome["steps_to_target"]),
    }


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
    if config.get("inner", "muon") != "muon":
        parts.append(config["inner"])
    return "-".join(parts)


def read_run_dir(path: Path, role: str, target: float | None) -> dict | None:
    """A finished run's record from its directory; None without a completed
    ``summary.json``."""
    summary_file = path / "summary.json"
    if not summary_file.exists():
        return None
    summary = json.loads(summary_file.read_text())
    diverged = summary.get("diverged_at") is not None
    if not (summary.get("completed", True) or diverged):
        return None
    config = json.loads((path / "config.json").read_text())
    lines = (path / "metrics.jsonl").read_text().splitlines()
    curve = curve_of([json.loads(line) for line in lines if line.strip()])
    record = make_record(
        path.name, role, config["config"], config["resolved"], summary, curve, target
    )
    if diverged:  # its losses before the divergence are no final loss
        record["final_val_loss"] = None
    return record


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
    seeds: int
    target: float | None
    warmup_fraction: float
    eval_every: int
    eval_resolution: float
    eval_batches: int
    eval_batch_size: int
    ls_batches: int
    gn_micro_batch: int
    max_runs: int
    seed: int
    layout_check: bool
    timing_rounds: int = 0
    #: The batch whose ``steps`` steps set the tokens of every smaller batch's
    #: budget; ``None``: the largest.
    budget_batch: int | None = None

    def budget(self, batch: int) -> int:
        """Steps of a run at ``batch`` sequences: the tokens of ``steps`` steps at
        `budget_batch` (the largest batch by default), and at least ``steps``
        steps (a batch above ``budget_batch`` reads more tokens)."""
        reference = self.budget_batch or max(self.batch_sizes)
        return max(self.steps, self.steps * reference // batch)

    def train_config(
        self, method: str, batch: int, point: Point, out: Path, **changes: Any
    ) -> TrainConfig:
        """The configuration of one of the study's runs: the study's data, model,
        warm-up, evaluation and line-search settings; ``method`` at ``batch``
        sequences for `budget` steps at ``point``'s learning rate and K; written to
        ``out``, over any run there, with no checkpoint and no progress bar; then
        ``changes``."""
        values: dict[str, Any] = dict(
            text=self.text,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            model=self.model,
            seq_len=self.seq_len,
            steps=self.budget(batch),
            batch_size=batch,
            lr=point.lr,
            warmup_fraction=self.warmup_fraction,
            eval_batches=self.eval_batches,
            eval_batch_size=self.eval_batch_size,
            ls_batches=self.ls_batches,
            seed=self.seed,
            out=str(out),
            checkpoint_every=0,
            overwrite=True,
            progress=False,
        )
        if point.micro_batches is not None:
            values["micro_batches"] = point.micro_batches
        return TrainConfig(**{**values, **changes}, **parse_method(method))

    def to_dict(self) -> dict[str, Any]:
        values = dict(vars(self))
        values["methods"] = list(self.methods)
        values["batch_sizes"] = list(self.batch_sizes)
        return values
