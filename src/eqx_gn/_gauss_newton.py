r"""The Gauss-Newton outer step: solve the GN subproblem, then line-search the true
loss.

One outer step at $\theta_0$:

1. a solver returns a direction $d \approx \arg\min_d q(d)$ from K micro-batches
   (full or block-diagonal $q$, by the [`eqx_gn.Blocks`][] given);
2. a line search picks $s \ge 0$ from $\varphi(s) = L(\theta_0 + s d)$ on separate
   line-search batches;
3. $\theta_1 = \theta_0 + s d$, and the solver updates its state (warm start,
   damping).

A non-finite direction or loss rejects the step and leaves the model and every
piece of state exactly as they were.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from beartype import beartype
from jaxtyping import Array, Bool, Float, Int, PyTree, jaxtyped

from ._blocks import Blocks
from ._custom_types import ApplyFn, AxisName, Model
from ._line_search import AbstractLineSearch, GridLineSearch
from ._losses import AbstractLoss
from ._misc import tree_all_finite, tree_scale, tree_where
from ._solvers import AbstractGNSolver, GNProblem, InnerOptimizer
from ._solvers.abstract import num_batches

_typechecked = jaxtyped(typechecker=beartype)


class GNState(eqx.Module):
    """The optimizer's state: the outer step count and the solver's state."""

    step: Int[Array, ""]
    solver_state: PyTree


class GNStats(eqx.Module):
    """Statistics of one outer step (all scalars).

    ``loss_before``/``loss_after`` are line-search losses at $\\theta_0$ and at the
    chosen step; ``model_start``/``model_end`` the subproblem objective at the first
    and last inner iterate; ``predicted_decrease`` the model's decrease for $d$ and
    ``actual_decrease`` the true one at $s = 1$ (their ratio drives damping);
    ``rejected`` means $s = 0$ and ``nonfinite`` that a NaN or inf was met (then the
    step changed nothing).
    """

    loss_before: Float[Array, ""]
    loss_after: Float[Array, ""]
    step_size: Float[Array, ""]
    model_start: Float[Array, ""]
    model_end: Float[Array, ""]
    predicted_decrease: Float[Array, ""]
    actual_decrease: Float[Array, ""]
    damping: Float[Array, ""]
    solver_iterations: Int[Array, ""]
    line_search_evaluations: Int[Array, ""]
    rejected: Bool[Array, ""]
    nonfinite: Bool[Array, ""]


def _mean_loss(fn, loss, model, batches, axis_name):
    def one(batch):
        inputs, targets = batch
        return loss.value(fn(model, inputs), targets, axis_name=axis_name)

    return jnp.mean(jax.lax.map(one, batches))


def _moved(model, direction, step_size):
    return eqx.apply_updates(model, tree_scale(step_size, direction))


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
    - ``axis_name``: the batch axis name when ``step`` runs inside ``shard_map`` or
      ``pmap``; ``None`` otherwise (including ``jit`` over sharded batches).

    Use: ``state = gn.init(model)``, then ``model, state, stats = gn.step(model,
    state, batches, line_search_batches)`` under ``eqx.filter_jit``. ``batches`` is a
    pair ``(inputs, targets)`` whose leaves are stacked along a leading axis of K
    micro-batches; ``line_search_batches`` likewise (any number, any batch size).
    """

    fn: ApplyFn
    loss: AbstractLoss
    solver: AbstractGNSolver = eqx.field(default_factory=InnerOptimizer)
    line_search: AbstractLineSearch = eqx.field(default_factory=GridLineSearch)
    blocks: Blocks | None = None
    axis_name: AxisName = eqx.field(default=None, static=True)

    def init(self, model: Model) -> GNState:
        """The state before the first step."""
        if self.blocks is not None:
            self.blocks.check_model(model)
        return GNState(jnp.asarray(0), self.solver.init(model))

    @_typechecked
    def step(
        self,
        model: Model,
        state: GNState,
        batches: Any,
        line_search_batches: Any,
    ) -> tuple[Model, GNState, GNStats]:
        """One outer step; returns the new model and state, and [`eqx_gn.GNStats`][]."""
        num_batches(batches, "batches")
        num_batches(line_search_batches, "line_search_batches")
        problem = GNProblem(self.fn, self.loss, self.blocks, self.axis_name)
        direction, provisional, solver_stats = self.solver.solve(
            problem, model, batches, state.solver_state, state.step
        )

        def phi(s):
            return _mean_loss(
                self.fn,
                self.loss,
                _moved(model, direction, s),
                line_search_batches,
                self.axis_name,
            )

        zero = jnp.zeros((), solver_stats.model_end.dtype)
        if self.line_search.needs_slope:
            phi0, slope = jax.jvp(phi, (zero,), (jnp.ones_like(zero),))
        else:
            phi0, slope = phi(zero), None
        step_size, ls_stats = self.line_search.search(phi, phi0, slope)

        nonfinite = ~(
            tree_all_finite(direction)
            & tree_all_finite(solver_stats)
            & jnp.isfinite(phi0)
        )
        step_size = jnp.where(nonfinite, 0.0, step_size)
        accept = step_size > 0
        params = eqx.filter(model, eqx.is_inexact_array)
        new_params = jax.tree.map(
            lambda p, u: jnp.where(accept, p + (step_size * u).astype(p.dtype), p),
            params,
            direction,
        )
        new_model = eqx.combine(new_params, model)

        solver_state = self.solver.accept(
            provisional, direction, step_size, ls_stats, solver_stats
        )
        new_state = GNState(state.step + 1, solver_state)
        new_state = tree_where(nonfinite, state, new_state)

        stats = GNStats(
            loss_before=phi0,
            loss_after=jnp.where(accept, ls_stats.loss_after, phi0),
            step_size=step_size,
            model_start=solver_stats.model_start,
            model_end=solver_stats.model_end,
            predicted_decrease=solver_stats.predicted_decrease,
            actual_decrease=ls_stats.loss_before - ls_stats.loss_at_unit_step,
            damping=solver_stats.damping,
            solver_iterations=solver_stats.iterations,
            line_search_evaluations=ls_stats.num_evaluations,
            rejected=~accept,
            nonfinite=nonfinite,
        )
        return new_model, new_state, stats
