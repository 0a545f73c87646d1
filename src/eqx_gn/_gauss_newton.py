r"""The Gauss-Newton outer step: solve the GN subproblem, then line-search the true
loss.

One outer step at $\theta_0$:

1. a solver returns a direction $d \approx \arg\min_d q(d)$ from K micro-batches
   (full or block-diagonal $q$, by the [`eqx_gn.Blocks`][] given);
2. a line search picks $s \ge 0$ from $\varphi(s) = L(\theta_0 + s d)$ on separate
   line-search batches;
3. $\theta_1 = \theta_0 + s d$, the solver updates its state (warm start), and
   the trust rule sets the next subproblem's scale from $s$ and from the actual
   over the predicted decrease.

A non-finite direction or loss rejects the step and leaves the model and every
piece of state exactly as they were.

[`GaussNewton.step`][eqx_gn.GaussNewton.step] is these three stages and nothing
else, each a public method: [`solve`][eqx_gn.GaussNewton.solve],
[`line_search_objective`][eqx_gn.GaussNewton.line_search_objective] with
[`search`][eqx_gn.GaussNewton.search], and [`accept`][eqx_gn.GaussNewton.accept].
"""

from collections.abc import Callable
from typing import Generic, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._batches import check_micro_batches, mean_loss_unchecked
from ._blocks import Blocks
from ._custom_types import ApplyFn, AxisName, MicroBatches, Model, Params, typecheck
from ._gnvp import check_like_params
from ._line_search import (
    AbstractLineSearch,
    GridLineSearch,
    LineSearchStats,
    scalar_loss,
)
from ._losses import AbstractLoss
from ._misc import tree_all_finite, tree_scale, tree_where
from ._solvers import AbstractGNSolver, GNProblem, GNSolution, InnerOptimizer
from ._solvers.abstract import SolverState
from ._trust import AbstractTrustRule, TrustState

#: $\varphi(s)$: the loss along the direction, as a function of the step size.
LineObjective = Callable[[Float[Array, ""]], Float[Array, ""]]


@final
class GNState(eqx.Module, Generic[SolverState, TrustState]):
    """The optimizer's state: the outer step count, the solver's state, the step
    size the line search chose last (1 before the first step, 0 after a rejection),
    which [`search`][eqx_gn.GaussNewton.search] passes on as ``previous``, and the
    trust rule's state (``None`` for [`eqx_gn.FixedTrust`][], the scale $t$ for the
    other rules)."""

    step: Int[Array, ""]
    solver_state: SolverState
    step_size: Float[Array, ""]
    trust: TrustState = None


@final
class GNStats(eqx.Module):
    """Statistics of one outer step (all scalars).

    ``loss_before``/``loss_after`` are line-search losses at $\\theta_0$ and at the
    chosen step; ``model_start``/``model_end`` the subproblem objective at the first
    and last inner iterate; ``predicted_decrease`` the model's decrease for $d$ and
    ``actual_decrease`` the true one at $s = 1$ on the line-search batches (NaN
    when the search did not evaluate it); ``true_decrease`` the true loss's
    decrease at the prediction's point on the prediction's own data (see
    [`eqx_gn.SolverStats`][]); ``damping`` the damping the subproblem was solved at (0 for the
    inner-loop solvers);
    ``rejected`` means $s = 0$ and ``nonfinite`` that a NaN or inf was met (then the
    step changed nothing); ``trust_scale`` is the trust rule's scale this step's
    subproblem was solved at (1 without a rule).
    """

    loss_before: Float[Array, ""]
    loss_after: Float[Array, ""]
    step_size: Float[Array, ""]
    model_start: Float[Array, ""]
    model_end: Float[Array, ""]
    predicted_decrease: Float[Array, ""]
    actual_decrease: Float[Array, ""]
    true_decrease: Float[Array, ""]
    damping: Float[Array, ""]
    solver_iterations: Int[Array, ""]
    line_search_evaluations: Int[Array, ""]
    rejected: Bool[Array, ""]
    nonfinite: Bool[Array, ""]
    trust_scale: Float[Array, ""]


@final
class GaussNewton(eqx.Module):
    r"""The Gauss-Newton optimizer for an Equinox model.

    **Arguments:**

    - ``fn``: applies the model, ``fn(model, inputs) -> outputs``.
    - ``loss``: an [`eqx_gn.AbstractLoss`][] on the outputs.
    - ``solver``: [`eqx_gn.InnerOptimizer`][] (default), [`eqx_gn.CG`][] or
      [`eqx_gn.ProxLinear`][].
    - ``line_search``: [`eqx_gn.GridLineSearch`][] (default) or
      [`eqx_gn.BacktrackingArmijo`][].
    - ``blocks``: ``None`` for full GN, or an [`eqx_gn.Blocks`][] for layerwise GN.
    - ``trust``: the rule that scales the next subproblem from what the last step
      saw: [`eqx_gn.FixedTrust`][] (the paper's), [`eqx_gn.AdaptiveTrust`][] or
      [`eqx_gn.LevenbergMarquardt`][]. ``None`` (default): the solver's own
      (``solver.default_trust()``): fixed for the inner-loop solvers,
      Levenberg-Marquardt damping for CG.
    - ``axis_name``: the batch axis name when ``step`` runs inside ``shard_map`` or
      ``pmap``; ``None`` otherwise (including ``jit`` over sharded batches).

    ``batches`` is a pair ``(inputs, targets)`` whose leaves are stacked along a
    leading axis of K micro-batches, shaped ``(K, B, ...)``; ``line_search_batches``
    likewise (any number, any batch size). One step is

    ```python
    solution = gn.solve(model, state, batches)
    phi = gn.line_search_objective(model, solution.direction, line_search_batches)
    step_size, ls_stats = gn.search(
        phi, solution.stats.model_end.dtype, previous=state.step_size
    )
    model, state, stats = gn.accept(model, state, solution, step_size, ls_stats)
    ```

    and ``step`` does exactly that. A training loop:

    ```python
    gn = eqx_gn.GaussNewton(
        lambda m, x: jax.vmap(m)(x),
        eqx_gn.SoftmaxCrossEntropy(),
        solver=eqx_gn.InnerOptimizer(learning_rate=0.03),
    )
    state = gn.init(model)
    step = eqx.filter_jit(gn.step)
    for x, y, x_ls, y_ls in data:  # x: (K, B, features), y: (K, B)
        model, state, stats = step(model, state, (x, y), (x_ls, y_ls))
    ```
    """

    fn: ApplyFn
    loss: AbstractLoss
    solver: AbstractGNSolver = eqx.field(default_factory=InnerOptimizer)
    line_search: AbstractLineSearch = eqx.field(default_factory=GridLineSearch)
    blocks: Blocks | None = None
    axis_name: AxisName = eqx.field(default=None, static=True)
    # None becomes the solver's default rule in `__post_init__`.
    trust: AbstractTrustRule | None = None

    def __post_init__(self):
        if self.trust is None:
            self.trust = self.solver.default_trust()

    @property
    def problem(self) -> GNProblem:
        """The subproblem's definition (``fn``, ``loss``, ``blocks``, ``axis_name``)
        as the solver takes it."""
        return GNProblem(self.fn, self.loss, self.blocks, self.axis_name)

    @typecheck
    def init(self, model: Model) -> GNState:
        """The state before the first step."""
        if self.blocks is not None:
            self.blocks.check_model(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        dtype = jnp.result_type(*jax.tree.leaves(params), float)
        return GNState(
            step=jnp.asarray(0),
            solver_state=self.solver.init(model),
            step_size=jnp.ones((), dtype),
            trust=self.trust.init(dtype),
        )

    @typecheck
    def solve(self, model: Model, state: GNState, batches: MicroBatches) -> GNSolution:
        r"""Stage 1: the direction $d$ from the solver on ``batches``.

        Returns a [`eqx_gn.GNSolution`][]: ``direction`` $d$ (the structure of
        ``eqx.filter(model, eqx.is_inexact_array)``), the solver's provisional next
        ``state`` (for [`accept`][eqx_gn.GaussNewton.accept]), and its
        [`eqx_gn.SolverStats`][] ``stats``. The solver works at the trust rule's
        scale in ``state``. ``batches`` are checked here, once (one-line ``ValueError``
        naming the leaf when they are not K stacked micro-batches).
        """
        scale = self.trust.scale(state.trust)
        # Without a scale (FixedTrust) the solver is called as it always was.
        extra = {} if scale is None else {"scale": scale}
        return self.solver.solve(
            self.problem, model, batches, state.solver_state, state.step, **extra
        )

    @typecheck
    def line_search_objective(
        self, model: Model, direction: Params, line_search_batches: MicroBatches
    ) -> LineObjective:
        r"""Stage 2a: $\varphi(s) = \frac1M \sum_m L_m(\theta_0 + s\,d)$, the mean
        loss (as [`eqx_gn.mean_loss`][]) on the M ``line_search_batches`` at the
        model moved by ``s * direction``.

        ``phi`` takes and returns JAX scalars and is differentiable
        (``jax.jvp(phi, (s,), (1.0,))`` gives $\varphi'(s)$). The batches are
        checked here, once, not at every call of ``phi``.
        """
        check_micro_batches(
            self.fn, self.loss, model, line_search_batches, "line_search_batches"
        )
        check_like_params(
            direction, eqx.filter(model, eqx.is_inexact_array), "direction"
        )

        def phi(s: Float[Array, ""]) -> Float[Array, ""]:
            moved = eqx.apply_updates(model, tree_scale(s, direction))
            return mean_loss_unchecked(
                self.fn, self.loss, moved, line_search_batches, self.axis_name
            )

        return phi

    @typecheck
    def search(
        self,
        phi: LineObjective,
        dtype: np.dtype | type | str,
        previous: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        r"""Stage 2b: the step size $s \ge 0$ that ``line_search`` picks on ``phi``.

        Evaluates $\varphi(0)$ (and $\varphi'(0)$ by one ``jax.jvp`` when the line
        search ``needs_slope``) with step sizes of ``dtype`` (``step`` uses the
        subproblem's: ``solver_stats.model_end.dtype``), then calls
        ``line_search.search`` with ``previous`` (``step`` passes
        ``state.step_size``, the last step's choice). Returns
        ``(step_size, line_search_stats)``; the stats' ``loss_before`` is
        $\varphi(0)$.
        """
        zero = jnp.zeros((), dtype)
        if self.line_search.needs_slope:
            phi0, slope = jax.jvp(phi, (zero,), (jnp.ones_like(zero),))
        else:
            phi0, slope = phi(zero), None
        scalar_loss(phi0, "GaussNewton.search")
        if previous is not None:
            previous = jnp.asarray(previous, dtype)
        return self.line_search.search(phi, phi0, slope, previous)

    @typecheck
    def accept(
        self,
        model: Model,
        state: GNState,
        solution: GNSolution,
        step_size: Float[Array, ""],
        line_search_stats: LineSearchStats,
    ) -> tuple[Model, GNState, GNStats]:
        r"""Stage 3: $\theta_1 = \theta_0 + s\,d$, the solver's next state, and
        [`eqx_gn.GNStats`][].

        Takes the [`eqx_gn.GNSolution`][] of [`solve`][eqx_gn.GaussNewton.solve]
        and the outputs of [`search`][eqx_gn.GaussNewton.search]. A non-finite
        direction, solver statistic or $\varphi(0)$ rejects the step: the model and
        every piece of ``state`` come back exactly as they were (and
        ``stats.nonfinite`` is set).
        """
        direction, solver_stats = solution.direction, solution.stats
        check_like_params(
            direction, eqx.filter(model, eqx.is_inexact_array), "direction"
        )
        phi0 = line_search_stats.loss_before
        nonfinite = ~(
            tree_all_finite(direction)
            & tree_all_finite(solver_stats)
            & jnp.isfinite(phi0)
        )
        step_size = jnp.where(nonfinite, 0.0, step_size)
        accepted = step_size > 0
        params = eqx.filter(model, eqx.is_inexact_array)
        new_params = jax.tree.map(
            lambda p, u: jnp.where(accepted, p + (step_size * u).astype(p.dtype), p),
            params,
            direction,
        )
        new_model = eqx.combine(new_params, model)

        solver_state = self.solver.accept(solution.state, direction, step_size)
        trust = self.trust.update(
            state.trust,
            step_size,
            line_search_stats,
            solver_stats.predicted_decrease,
            true_decrease=solver_stats.true_decrease,
        )
        new_state = GNState(
            step=state.step + 1,
            solver_state=solver_state,
            step_size=step_size.astype(state.step_size.dtype),
            trust=trust,
        )
        new_state = tree_where(nonfinite, state, new_state)

        stats = GNStats(
            loss_before=phi0,
            loss_after=jnp.where(accepted, line_search_stats.loss_after, phi0),
            step_size=step_size,
            model_start=solver_stats.model_start,
            model_end=solver_stats.model_end,
            predicted_decrease=solver_stats.predicted_decrease,
            actual_decrease=line_search_stats.loss_before
            - line_search_stats.loss_at_unit_step,
            true_decrease=solver_stats.true_decrease,
            damping=solver_stats.damping,
            solver_iterations=solver_stats.iterations,
            line_search_evaluations=line_search_stats.num_evaluations,
            rejected=~accepted,
            nonfinite=nonfinite,
            trust_scale=self._scale_value(state, phi0.dtype),
        )
        return new_model, new_state, stats

    def _scale_value(self, state: GNState, dtype) -> Float[Array, ""]:
        scale = self.trust.scale(state.trust)
        return jnp.ones((), dtype) if scale is None else jnp.asarray(scale, dtype)

    @typecheck
    def step(
        self,
        model: Model,
        state: GNState,
        batches: MicroBatches,
        line_search_batches: MicroBatches,
    ) -> tuple[Model, GNState, GNStats]:
        """One outer step: [`solve`][eqx_gn.GaussNewton.solve], then
        [`line_search_objective`][eqx_gn.GaussNewton.line_search_objective] and
        [`search`][eqx_gn.GaussNewton.search], then
        [`accept`][eqx_gn.GaussNewton.accept]. Returns the new model and state, and
        [`eqx_gn.GNStats`][]."""
        return self._step_with_direction(model, state, batches, line_search_batches)[:3]

    def _step_with_direction(
        self,
        model: Model,
        state: GNState,
        batches: MicroBatches,
        line_search_batches: MicroBatches,
    ) -> tuple[Model, GNState, GNStats, Params]:
        r"""`step`'s stages, the one routine of `step` and `eqx_gn.as_optax`: the
        new model, state and stats, and the direction $d$ (`as_optax`'s update is
        $s\,d$)."""
        solution = self.solve(model, state, batches)
        phi = self.line_search_objective(model, solution.direction, line_search_batches)
        step_size, ls_stats = self.search(
            phi, solution.stats.model_end.dtype, previous=state.step_size
        )
        new_model, new_state, stats = self.accept(
            model, state, solution, step_size, ls_stats
        )
        return new_model, new_state, stats, solution.direction
