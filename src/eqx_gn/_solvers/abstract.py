"""The interface every solver of the GN subproblem implements."""

import abc
from typing import Generic, TypeVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._batches import check_micro_batches
from .._blocks import Blocks
from .._custom_types import ApplyFn, AxisName, MicroBatches, Model, Params
from .._gnvp import QuadraticModel, quadratic_model
from .._losses import AbstractLoss
from .._sharding import as_varying, psum
from .._trust import AbstractTrustRule


@final
class GNProblem(eqx.Module):
    """What defines the GN subproblem apart from the data: the model's apply
    function, the loss, the block partition and the data-parallel axis."""

    fn: ApplyFn
    loss: AbstractLoss
    blocks: Blocks | None
    axis_name: AxisName = eqx.field(static=True)

    def quadratic_model(self, model: Model, batch) -> QuadraticModel:
        """The GN quadratic model at ``model`` on one ``batch``."""
        return quadratic_model(
            self.fn,
            model,
            batch,
            loss=self.loss,
            blocks=self.blocks,
            axis_name=self.axis_name,
        )

    def loss_value(self, model: Model, batch) -> Float[Array, ""]:
        """The true loss at ``model`` on one ``batch``."""
        inputs, targets = batch
        return self.loss.value(
            self.fn(model, inputs), targets, axis_name=self.axis_name
        )

    def loss_value_and_grad(
        self, model: Model, batch, shift: Params | None = None
    ) -> tuple[Float[Array, ""], Params]:
        r"""The true loss at $\theta_0 + $ ``shift`` (``model``'s parameters
        $\theta_0$; ``None``: at $\theta_0$) on one ``batch``, and its gradient with
        respect to the parameters (one forward and one backward pass).

        The parameters are cast to device-varying, as `QuadraticModel.gradient`
        does, so that the pull-back inserts no implicit sum over the data axis: the
        one ``psum`` here is the gradient's only one."""
        inputs, targets = batch
        params, static = eqx.partition(model, eqx.is_inexact_array)
        if shift is not None:
            params = jax.tree.map(jnp.add, params, shift)
        theta = as_varying(params, self.axis_name)

        def apply(p):
            return self.fn(eqx.combine(p, static), inputs)

        outputs, pullback = jax.vjp(apply, theta)
        axis = self.axis_name
        value = self.loss.value(outputs, targets, axis_name=axis)
        (grad,) = pullback(self.loss.grad(outputs, targets, axis_name=axis))
        return value, psum(grad, axis)

    def check_batches(self, model: Model, batches, what: str = "batches") -> int:
        """K, after checking that ``batches`` are K stacked micro-batches on which
        ``fn`` and ``loss`` trace; one-line ``ValueError`` naming the leaf if not.
        Every solver's ``solve`` calls this once, before tracing anything else."""
        return check_micro_batches(self.fn, self.loss, model, batches, what)


@final
class SolverStats(eqx.Module):
    """What a solver reports about one subproblem.

    ``model_start`` and ``model_end`` are the subproblem's objective (the quadratic or
    linearized-loss model, on its batch) at the first and last iterate it evaluated;
    ``predicted_decrease`` is the decrease the model predicts for the returned step,
    and ``true_decrease`` the true loss's decrease at the same point on the same
    data (their ratio is the model's fidelity, free of the noise between batches).
    The inner-loop solvers measure both on their last micro-batch, at the iterate
    its model value was taken at; CG on all K micro-batches, at its solution.
    """

    model_start: Float[Array, ""]
    model_end: Float[Array, ""]
    predicted_decrease: Float[Array, ""]
    damping: Float[Array, ""]
    iterations: Int[Array, ""]
    true_decrease: Float[Array, ""]


#: A solver's state (`CGState`, `InnerState`, ...): a PyTree of arrays.
SolverState = TypeVar("SolverState")


@final
class GNSolution(eqx.Module, Generic[SolverState]):
    """What a solver returns for one subproblem: the ``direction`` $d$ (the
    structure of ``eqx.filter(model, eqx.is_inexact_array)``), the solver's
    provisional next ``state`` (made final by ``accept`` once the line search has
    chosen the step size) and its [`eqx_gn.SolverStats`][]."""

    direction: Params
    state: SolverState
    stats: SolverStats


class AbstractGNSolver(eqx.Module, Generic[SolverState]):
    """A solver of the GN subproblem $\\min_d q(d)$ at the current parameters,
    generic over its state."""

    @abc.abstractmethod
    def init(self, model: Model) -> SolverState:
        """The solver's state before the first outer step."""

    @abc.abstractmethod
    def solve(
        self,
        problem: GNProblem,
        model: Model,
        batches: MicroBatches,
        state: SolverState,
        step: Int[Array, ""],
        scale: Float[Array, ""] | None = None,
    ) -> GNSolution[SolverState]:
        """A direction ``d`` from ``batches`` (stacked along a leading axis of size K),
        the solver's provisional next state, and statistics, as a
        [`eqx_gn.GNSolution`][]. ``scale`` is the trust
        rule's scale $t$ (see [`eqx_gn.AdaptiveTrust`][]): a solver makes its
        direction about $t$ times as long (an inner learning rate times $t$, a
        damping divided by $t$); ``None`` leaves it exactly as without a rule."""

    @abc.abstractmethod
    def accept(
        self, state: SolverState, direction: Params, step_size: Float[Array, ""]
    ) -> SolverState:
        """The solver's state after the line search chose ``step_size`` (0: the
        step was rejected) along ``direction``, from its provisional ``state``.
        How far to trust the next subproblem is not the solver's to decide: that
        is the trust rule's (``scale`` in ``solve``)."""

    @abc.abstractmethod
    def default_trust(self) -> AbstractTrustRule:
        """The trust rule [`eqx_gn.GaussNewton`][] uses with this solver when it is
        given none."""
