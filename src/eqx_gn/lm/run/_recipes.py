r"""The optimizer of each phase of a run, as a hashable recipe.

A recipe holds exactly the settings its optimizer is built from, so two runs whose
recipes are equal run the same computation: the recipe is the compile-cache key of
its step (`eqx_gn.lm.run._steps`), and no hand-kept list of fields can go stale. The
(peak) learning rate is the one setting left out of the key: the optimizer is built
at unit peak and its updates are scaled by the learning rate, an array argument of
the step (for GN, the inner solver's ``learning_rate`` leaf), so a learning-rate
sweep compiles each step once.

- warm-up: AdamW ($\beta_2$ = ``b2``) at the constant ``warmup_lr``;
- a first-order method (`eqx_gn.lm.run._phase_optimizers.first_order`: AdamW, Muon, SOAP,
  Shampoo or PSGD-Kron) with a cosine decay of ``lr`` to 0 over the main steps;
- GN: the run's [`GNConfig`][eqx_gn.lm.GNConfig] (``config.gn``), which builds the
  `eqx_gn.GaussNewton`.

Every first-order update clips the gradient to global norm ``max_grad_norm``.
Every schedule is [`eqx_gn.cosine_decay`][].
"""

import dataclasses

import equinox as eqx
import optax

from ... import GaussNewton, InnerOptimizer, ProxLinear, TrueLossInner, cosine_decay
from .._model import Transformer
from ._config import TrainConfig
from ._gn_config import GNConfig
from ._phase_optimizers import first_order


def _cosine(peak: float, steps: int) -> optax.Schedule:
    return lambda count: cosine_decay(peak, count / steps)


@dataclasses.dataclass(frozen=True)
class WarmupRecipe:
    """AdamW at a constant learning rate."""

    lr: float | None
    b2: float
    weight_decay: float
    max_grad_norm: float

    def build(self, model: Transformer) -> optax.GradientTransformation:
        del model
        return optax.chain(
            optax.clip_by_global_norm(self.max_grad_norm),
            optax.adamw(1.0, b1=0.9, b2=self.b2, weight_decay=self.weight_decay),
        )


@dataclasses.dataclass(frozen=True)
class FirstOrderRecipe:
    """A first-order method with a cosine decay of the learning rate."""

    optimizer: str
    lr: float | None
    steps: int
    b2: float
    weight_decay: float
    max_grad_norm: float

    def build(self, model: Transformer) -> optax.GradientTransformation:
        return first_order(
            self.optimizer,
            _cosine(1.0, self.steps),
            model,
            self.b2,
            self.weight_decay,
            self.max_grad_norm,
        )


Recipe = WarmupRecipe | FirstOrderRecipe | GNConfig


def compile_key(recipe: Recipe) -> Recipe:
    """What the compiled step depends on: the recipe without its learning rate."""
    return dataclasses.replace(recipe, lr=None)


def with_learning_rate(gn: GaussNewton, lr) -> GaussNewton:
    """``gn`` with its inner solver's learning rate set to ``lr`` (an array, traced
    under ``jit``); unchanged for a solver without one (CG)."""
    if not isinstance(gn.solver, InnerOptimizer | ProxLinear | TrueLossInner):
        return gn
    return eqx.tree_at(lambda g: g.solver.learning_rate, gn, lr)


def compute_dtype_of(config: TrainConfig) -> str | None:
    """The ``compute_dtype`` of `eqx_gn.lm.apply_fn` for the run ``config``: ``None``
    for float32 (the parameters' dtype: the products exactly as without one)."""
    return None if config.compute_dtype == "float32" else config.compute_dtype


def phase_recipe(config: TrainConfig, phase: str) -> Recipe:
    """The recipe of ``phase`` (``"warmup"`` or ``"main"``) of the run ``config``."""
    if phase == "warmup":
        return WarmupRecipe(
            config.warmup_lr, config.b2, config.weight_decay, config.max_grad_norm
        )
    if config.is_gn:
        return config.gn
    return FirstOrderRecipe(
        optimizer=config.optimizer,
        lr=config.learning_rate,
        steps=config.main_steps,
        b2=config.b2,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )


def learning_rate_at(config: TrainConfig, step: int) -> float | None:
    """The (peak inner, for GN) learning rate of global step ``step`` (from 1);
    ``None`` where there is none (GN with CG)."""
    if step <= config.warmup_steps:
        return config.warmup_lr
    if config.learning_rate is None:
        return None
    fraction = (step - config.warmup_steps - 1) / config.main_steps
    return float(cosine_decay(config.learning_rate, fraction))
