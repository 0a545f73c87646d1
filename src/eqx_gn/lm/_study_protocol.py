"""The study's declared protocol (`eqx_gn.lm._study`): the methods, each method's
search space, the grid and the one refinement rule, the order of runs, the target
and the chosen run. Pure functions of the declarations and of run records.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
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


RULE = (
    "N runs per method and batch size: N - 1 grid points (learning rates x3 apart "
    "around the declared centre; GN alternates K between its two values), then one "
    "refinement run: the best run so far moves its learning rate x3 to the side "
    "with no run of the same settings (x3^(1/2) toward the better neighbour when "
    "both sides have one; toward the centre when neither has)"
)


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
