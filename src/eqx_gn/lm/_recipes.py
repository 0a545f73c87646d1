r"""The optimizer of each phase of a run, as a hashable recipe.

A recipe holds exactly the settings its optimizer is built from, so two runs whose
recipes are equal run the same computation: the recipe is the compile-cache key of
its step (`eqx_gn.lm._steps`), and no hand-kept list of fields can go stale. The
(peak) learning rate is the one setting left out of the key: the optimizer is built
at unit peak and its updates are scaled by the learning rate, an array argument of
the step (for GN, the inner solver's ``learning_rate`` leaf), so a learning-rate
sweep compiles each step once.

- warm-up: AdamW ($\beta_2$ = ``b2``) at the constant ``warmup_lr``;
- ``adamw``: AdamW with a cosine decay of ``lr`` to 0 over the main steps;
- ``muon``: Muon on hidden matrices, AdamW on the embedding, the head and the 1-D
  parameters (`eqx_gn.muon_adamw`), cosine decay of ``lr``;
- ``soap``: SOAP (`eqx_gn.baselines.soap`), cosine decay of ``lr``;
- ``shampoo``: Shampoo with Adam grafting and momentum 0.9
  (`eqx_gn.baselines.shampoo`, $\beta_2$ = ``b2``), cosine decay of ``lr``;
- ``psgd``: PSGD-Kron (``psgdax.kron``, Kronecker-factored preconditioners fitted
  by PSGD, momentum 0.9), cosine decay of ``lr``;
- ``gn``: `eqx_gn.GaussNewton` with the chosen blocks (`eqx_gn.Blocks.full`, or
  `eqx_gn.lm.layerwise_blocks`) and solver: `eqx_gn.InnerOptimizer` or
  `eqx_gn.ProxLinear` with the ``inner`` optimizer (Muon/AdamW by default, or
  AdamW, SOAP, Shampoo or PSGD-Kron, each as its first-order recipe) at inner
  learning rate ``lr`` on one global cosine over all inner steps, warm start; or
  `eqx_gn.CG` with
  ``cg_iterations`` iterations from damping ``cg_damping``; then
  `eqx_gn.GridLineSearch` over ``ls_grid`` step sizes, exhaustive (``line_search``
  ``"grid"``) or walked from the last step's choice (``"warm"``), or no search
  (``"none"``: `eqx_gn.UnitStep`, the step taken whole); with ``trust``
  ``"adaptive"`` (`eqx_gn.AdaptiveTrust`) or ``"levenberg-marquardt"``
  (`eqx_gn.LevenbergMarquardt`) the rule scales each subproblem from the last
  step and the search halves the step past its grid down to ``MIN_STEP_SIZE``
  before it rejects (``"fixed"``: the paper's fixed subproblem and grid).

Every first-order update clips the gradient to global norm ``max_grad_norm``.
Every schedule is [`eqx_gn.cosine_decay`][].
"""

import dataclasses

import equinox as eqx
import optax

from .. import (
    CG,
    AdaptiveTrust,
    FixedTrust,
    GaussNewton,
    GridLineSearch,
    InnerOptimizer,
    LevenbergMarquardt,
    ProxLinear,
    SoftmaxCrossEntropy,
    UnitStep,
    cosine_decay,
    muon_adamw,
)
from ..baselines import shampoo, soap
from ._config import TrainConfig
from ._model import Transformer, apply_fn, embedding_and_head, layerwise_blocks

#: The loss every phase minimises: next-token cross-entropy.
LM_LOSS = SoftmaxCrossEntropy()
#: The smallest step the adaptive rule's line search tries past its grid: from the
#: default grid's smallest step 2^-3.5, at most 7 halvings.
MIN_STEP_SIZE = 2.0**-10


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
    """AdamW, Muon, SOAP or PSGD-Kron with a cosine decay of the learning rate."""

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


def first_order(
    optimizer: str,
    learning_rate: float | optax.Schedule,
    model: Transformer,
    b2: float,
    weight_decay: float,
    max_grad_norm: float,
) -> optax.GradientTransformation:
    """AdamW, Muon, SOAP or PSGD-Kron as the study trains them, each update
    clipped to global norm ``max_grad_norm`` first (Muon: `eqx_gn.muon_adamw`)."""
    if optimizer == "muon":
        return muon_adamw(
            learning_rate,
            adam_filter=embedding_and_head(model),
            adam_b2=b2,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
        )
    if optimizer == "adamw":
        inner = optax.adamw(learning_rate, b1=0.9, b2=b2, weight_decay=weight_decay)
    elif optimizer == "soap":
        inner = soap(learning_rate, weight_decay=weight_decay)
    elif optimizer == "shampoo":
        inner = shampoo(learning_rate, b1=0.9, b2=b2, weight_decay=weight_decay)
    elif optimizer == "psgd":
        import psgdax

        inner = psgdax.kron(learning_rate, b1=0.9, weight_decay=weight_decay)
    else:  # pragma: no cover - guarded by TrainConfig
        raise AssertionError(optimizer)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), inner)


@dataclasses.dataclass(frozen=True)
class GaussNewtonRecipe:
    """Gauss-Newton with a block partition, a subproblem solver and a grid line
    search."""

    blocks: str
    solver: str
    inner: str
    lr: float | None
    steps: int
    ls_grid: int
    line_search: str
    trust: str
    cg_damping: float
    cg_iterations: int
    b2: float
    weight_decay: float
    max_grad_norm: float
    compute_dtype: str | None = None

    def _inner(self, model: Transformer) -> optax.GradientTransformation:
        """The inner optimizer at unit learning rate, built as its first-order
        method is (the solver's learning rate and schedule scale its updates)."""
        return first_order(
            self.inner, 1.0, model, self.b2, self.weight_decay, self.max_grad_norm
        )

    def build(self, model: Transformer) -> GaussNewton:
        shortens = self.trust != "fixed"
        trust = {
            "adaptive": AdaptiveTrust,
            "levenberg-marquardt": LevenbergMarquardt,
            "fixed": FixedTrust,
        }[self.trust]()
        if self.solver == "cg":
            solver = CG(max_iterations=self.cg_iterations, damping=self.cg_damping)
        else:
            inner = self._inner(model)
            solver_cls = ProxLinear if self.solver == "prox" else InnerOptimizer
            # The step sets the learning rate (`with_learning_rate`).
            solver = solver_cls(
                inner,
                learning_rate=1.0,
                schedule="global_cosine",
                total_steps=self.steps,
                warm_start=True,
            )
        return GaussNewton(
            apply_fn(model, self.compute_dtype),
            LM_LOSS,
            solver=solver,
            line_search=UnitStep()
            if self.line_search == "none"
            else GridLineSearch(
                grid_size=self.ls_grid,
                stop_on_increase=self.line_search == "warm",
                warm_start=self.line_search == "warm",
                min_step_size=min(MIN_STEP_SIZE, 0.5 * 2.0 ** (-(self.ls_grid - 1) / 2))
                if shortens
                else None,
            ),
            blocks=layerwise_blocks(model) if self.blocks == "layerwise" else None,
            trust=trust,
        )


Recipe = WarmupRecipe | FirstOrderRecipe | GaussNewtonRecipe


def compile_key(recipe: Recipe) -> Recipe:
    """What the compiled step depends on: the recipe without its learning rate."""
    return dataclasses.replace(recipe, lr=None)


def with_learning_rate(gn: GaussNewton, lr) -> GaussNewton:
    """``gn`` with its inner solver's learning rate set to ``lr`` (an array, traced
    under ``jit``); unchanged for a solver without one (CG)."""
    if not isinstance(gn.solver, InnerOptimizer | ProxLinear):
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
        return GaussNewtonRecipe(
            blocks=config.blocks,
            solver=config.solver,
            inner=config.inner,
            lr=config.learning_rate,
            steps=config.main_steps,
            ls_grid=config.ls_grid,
            line_search=config.line_search_rule,
            trust=config.trust_rule,
            cg_damping=config.cg_damping,
            cg_iterations=config.cg_iterations,
            b2=config.b2,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            compute_dtype=compute_dtype_of(config),
        )
    return FirstOrderRecipe(
        config.optimizer,
        config.learning_rate,
        config.main_steps,
        config.b2,
        config.weight_decay,
        config.max_grad_norm,
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
