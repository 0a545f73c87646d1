"""The study's declared protocol (`eqx_gn.lm.study`): the methods, their
declared learning-rate centres, GN's micro-batch rule, the bracketing rule that
tunes every method alike, the order of runs, the target and the chosen run. Pure
functions of the declarations and of run records.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..run._config import ConfigError, parse_method
from ..run._gn_config import GNConfig
from ..run._methods import DEFAULT_LEARNING_RATES

#: The first-order methods a study compares GN with.
BASELINES: tuple[str, ...] = ("adamw", "muon", "soap", "shampoo", "psgd")
#: The default methods of a study.
DEFAULT_METHODS: tuple[str, ...] = (*BASELINES, "gn", "gn-layerwise")
#: Grid step of the learning rate.
LR_FACTOR = 3.0
#: The declared cap on the runs that tune one method at one batch size: the cap
#: the second edition's committed studies ran with (12; the tiny study's 9 was
#: raised to it), recorded in study.json (``max_runs``) and stated on the page.
MAX_RUNS = 12
#: Where on its curve the best baseline sets the target: the evaluation at this
#: fraction of the budget (the rest of the budget is headroom for its seeds).
TARGET_AT = 0.8
#: The seeds of the best tuned baseline's configuration, each over the whole
#: budget at the largest batch, whose median validation loss at `TARGET_AT` of
#: the budget is the target: one seed's luck does not set it.
TARGET_SEEDS = 3

#: Each first-order method's declared learning-rate centre at the largest batch
#: size: the runner's defaults (`DEFAULT_LEARNING_RATES`), every baseline's walk
#: starting there. A GN method's is not from that table, so GN has no entry here: it
#: is `GNConfig`'s ``learning_rate`` with no micro-batch given, the fraction 1 of
#: the model's inner step (the runner's default, `eqx_gn.lm.model_step_fraction`,
#: is 1 from micro-batches of 768 tokens and smaller below), or the true-loss
#: ablation's inner learning rate. At smaller batch sizes the centre is the
#: learning rate chosen at the next larger one.
CENTRES: dict[str, float] = {
    method: DEFAULT_LEARNING_RATES[method] for method in BASELINES
}


@dataclass(frozen=True)
class Point:
    """One configuration of a method: its learning rate (``None``: the runner's
    default, GN's as a user runs it), and for GN the micro-batches ``K`` of its
    outer step."""

    lr: float | None
    micro_batches: int | None = None


def centre(method: str) -> float:
    """The declared learning-rate centre of ``method`` (a GN method: GN's, or
    with another inner optimizer its default inner learning rate)."""
    parsed = parse_method(method)
    if parsed["optimizer"] == "gn" and parsed["solver"] == "cg":
        raise ConfigError(
            f"method {method!r}: GN with CG has no learning rate to tune; the "
            "study compares methods with one"
        )
    value = CENTRES.get(method, CENTRES.get(parsed["optimizer"]))
    if parsed["optimizer"] == "gn" and method not in CENTRES:
        settings = {k: v for k, v in parsed.items() if k != "optimizer"}
        value = GNConfig(steps=1, **settings).learning_rate
    if value is None:
        raise ConfigError(f"no declared learning rate for method {method!r}")
    return value


def micro_batches(method: str, batch: int, micro_batch: int) -> int | None:
    """GN's ``K`` at ``batch`` sequences: the paper's rule, a fixed micro-batch of
    ``micro_batch`` sequences and ``K = batch / micro_batch`` inner steps; None for
    a first-order method."""
    if not method.startswith("gn"):
        return None
    if batch % micro_batch:
        raise ConfigError(
            f"--batch-sizes {batch} is not divisible by --gn-micro-batch {micro_batch}"
        )
    return batch // micro_batch


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def rank(outcome: dict[str, Any]) -> tuple[float, float]:
    """The order of runs: fewest steps to the target, then the lowest validation
    loss (at the target step for a run that reached it, the best otherwise)."""
    steps = outcome.get("steps_to_target")
    loss = outcome.get("loss_at_target", outcome.get("best_val_loss"))
    if steps is None:
        loss = outcome.get("best_val_loss")
    return (
        math.inf if steps is None else float(steps),
        math.inf if loss is None or loss != loss else float(loss),
    )


def all_missed(tried: Sequence[tuple[Point, dict[str, Any]]]) -> bool:
    """Whether every run tried missed the target (none tried: False)."""
    return bool(tried) and all(o.get("steps_to_target") is None for _, o in tried)


def bracketed(
    tried: Sequence[tuple[Point, dict[str, Any]]], has_target: bool = True
) -> bool:
    """Whether the best run has a strictly worse run on each side of its learning
    rate, its nearest neighbours: the choice is then inside what was tried. Runs
    measured against a target (``has_target``) that all missed it bracket
    nothing: a loss that is lowest between two worse ones, all short of the
    target, says nothing about the steps to it (a plateau can look so)."""
    if not tried or (has_target and all_missed(tried)):
        return False
    best, best_outcome = min(tried, key=lambda t: rank(t[1]))
    below = [t for t in tried if t[0].lr < best.lr * (1 - 1e-9)]
    above = [t for t in tried if t[0].lr > best.lr * (1 + 1e-9)]
    if not below or not above:
        return False
    lower = max(below, key=lambda t: t[0].lr)
    upper = min(above, key=lambda t: t[0].lr)
    return rank(lower[1]) > rank(best_outcome) < rank(upper[1])


def next_point(
    start: float,
    tried: Sequence[tuple[Point, dict[str, Any]]],
    k: int | None = None,
    max_runs: int = MAX_RUNS,
    has_target: bool = True,
) -> Point | None:
    """The next run of the one tuning rule, the same for every method; None when
    tuning is done.

    1. The grid: ``start``, ``start * 3``, ``start / 3``.
    2. Walking out: while every run missed the target (``has_target``; the runs
       that set the target have none), one more x3 step beyond the end with
       fewer x3 steps from ``start``, on a tie beyond the better end (`rank`),
       and above it when they tie too. Learning rates on a plateau of the loss
       are not ranked against each other: a run that reaches the target is
       looked for on both sides.
    3. Extension: while the best run (`rank`) lies at an end of what was tried,
       one more x3 step beyond that end.
    4. Refinement, once the best is bracketed (`bracketed`): half a step
       (x3^(1/2)) toward the better of its two neighbours, once.

    At most ``max_runs`` runs: a best still at an edge, or every run missed,
    then is a tuning failure that the study reports, not a result.
    """
    taken = {_round(p.lr) for p, _ in tried}
    for lr in (start, start * LR_FACTOR, start / LR_FACTOR):
        if _round(lr) not in taken:
            return Point(_round(lr), k) if len(tried) < max_runs else None
    if len(tried) >= max_runs:
        return None
    best, best_outcome = min(tried, key=lambda t: rank(t[1]))
    lrs = sorted(p.lr for p, _ in tried)
    if has_target and all_missed(tried):
        return _walk_out(start, tried, lrs, k)
    if not bracketed(tried, has_target):
        if best.lr <= lrs[0] * (1 + 1e-9):
            return Point(_round(lrs[0] / LR_FACTOR), k)
        if best.lr >= lrs[-1] * (1 - 1e-9):
            return Point(_round(lrs[-1] * LR_FACTOR), k)
        # Interior but tied with a neighbour: step past the tied side.
        tied = [
            p.lr for p, o in tried if rank(o) <= rank(best_outcome) and p.lr != best.lr
        ]
        side = lrs[-1] * LR_FACTOR if max(tied) > best.lr else lrs[0] / LR_FACTOR
        return Point(_round(side), k)
    lower = max((t for t in tried if t[0].lr < best.lr), key=lambda t: t[0].lr)
    upper = min((t for t in tried if t[0].lr > best.lr), key=lambda t: t[0].lr)
    # Refined already: only the half step puts a run x3^(1/2) from a grid point,
    # and it lies next to the best whether it won or lost.
    if min(upper[0].lr / best.lr, best.lr / lower[0].lr) < LR_FACTOR * 0.99:
        return None
    up = rank(upper[1]) < rank(lower[1])
    lr = _round(best.lr * LR_FACTOR**0.5 if up else best.lr / LR_FACTOR**0.5)
    return None if lr in taken else Point(lr, k)


def _walk_out(start, tried, lrs, k) -> Point:
    """One x3 step beyond the end of ``lrs`` with fewer x3 steps from ``start``,
    on a tie beyond the better end by `rank`, and above it when they tie too."""
    below = math.log(start / lrs[0]) / math.log(LR_FACTOR)
    above = math.log(lrs[-1] / start) / math.log(LR_FACTOR)
    if abs(below - above) > 0.01:
        up = above < below
    else:
        ends = {p.lr: rank(o) for p, o in tried}
        up = ends[lrs[-1]] <= ends[lrs[0]]
    return Point(_round(lrs[-1] * LR_FACTOR if up else lrs[0] / LR_FACTOR), k)


def reached(curve: dict[str, list[Any]], target: float | None) -> dict[str, Any]:
    """Step, tokens read (line-search tokens included), training time and loss at
    the first evaluation at or below ``target``; None where it never gets there."""
    if target is not None:
        for i, loss in enumerate(curve["val_loss"]):
            if loss is not None and loss <= target:
                return {
                    "steps_to_target": curve["step"][i],
                    "tokens_to_target": curve["tokens"][i]
                    + (curve["ls_tokens"][i] or 0),
                    "time_to_target": curve["time_s"][i],
                    "loss_at_target": loss,
                }
    return {
        "steps_to_target": None,
        "tokens_to_target": None,
        "time_to_target": None,
        "loss_at_target": None,
    }


def resolution(curve: dict[str, list[Any]], steps_to_target: int | None) -> int | None:
    """Steps between the evaluation at the target and the one before it: 1 means
    the steps to the target are exact."""
    if steps_to_target is None:
        return None
    evaluated = [s for s, v in zip(curve["step"], curve["val_loss"], strict=True)
                 if v is not None and s <= steps_to_target]  # fmt: skip
    return steps_to_target - evaluated[-2] if len(evaluated) > 1 else steps_to_target


def rule(max_runs: int) -> str:
    """The tuning rule in words, with its cap on runs."""
    return (
        "one rule for every method at every batch size: runs at the start learning "
        "rate, x3 and /3 (the start: the declared centre at the largest batch, the "
        "learning rate chosen at the next larger batch below it); while the best run "
        "(fewest steps to the target, then the lowest loss) is at an end of what was "
        "tried, one more x3 step beyond it, and while every run has missed the target, "
        "one more x3 step beyond the end fewer steps from the start (the better end "
        "on a tie): runs that all missed bracket nothing; once the best has worse "
        "runs on both sides, one half step (x3^(1/2)) toward the better neighbour; "
        f"at most {max_runs} runs (the declared cap, `max_runs`). "
        "A run stops at the target, or gives up at the step where the best run so far "
        "reached it (it can then at best tie)"
    )


def _point_of(record: dict) -> Point:
    h = record["hyperparameters"]
    return Point(h["lr"], h["micro_batches"])


def choose(records: Sequence[dict]) -> dict | None:
    """The chosen run of a method at a batch size: the best by `rank` among its
    tuning runs."""
    candidates = [r for r in records if r.get("role") in ("grid", "tune", "refine")]
    return min(candidates, key=rank, default=None)
