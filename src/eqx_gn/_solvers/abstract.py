"""The interface every solver of the GN subproblem implements."""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from .._blocks import Blocks
from .._custom_types import ApplyFn, AxisName, Model, Params
from .._gnvp import QuadraticModel, quadratic_model
from .._line_search import LineSearchStats
from .._losses import AbstractLoss


class GNProblem(eqx.Module):
    """What defines the GN subproblem apart from the data: the model's apply
    function, the loss, the block partition and the data-parallel axis."""

    fn: ApplyFn
    loss: AbstractLoss
    blocks: Blocks | None
    axis_name: AxisName = eqx.field(static=True)

    def quadratic_model(self, model: Model, batch) -> QuadraticModel:
        return quadratic_model(
            self.fn,
            model,
            batch,
            loss=self.loss,
            blocks=self.blocks,
            axis_name=self.axis_name,
        )


class SolverStats(eqx.Module):
    """What a solver reports about one subproblem.

    ``model_start`` and ``model_end`` are the subproblem's objective (the quadratic or
    linearized-loss model, on its batch) at the first and last iterate it evaluated;
    ``predicted_decrease`` is the decrease the model predicts for the returned step.
    """

    model_start: Float[Array, ""]
    model_end: Float[Array, ""]
    predicted_decrease: Float[Array, ""]
    damping: Float[Array, ""]
    iterations: Int[Array, ""]


class AbstractGNSolver(eqx.Module):
    """A solver of the GN subproblem $\\min_d q(d)$ at the current parameters."""

    @abc.abstractmethod
    def init(self, model: Model) -> PyTree:
        """The solver's state before the first outer step."""

    @abc.abstractmethod
    def solve(
        self,
        problem: GNProblem,
        model: Model,
        batches: Any,
        state: PyTree,
        step: Int[Array, ""],
    ) -> tuple[Params, PyTree, SolverStats]:
        """A direction ``d`` from ``batches`` (stacked along a leading axis of size K),
        the solver's provisional next state, and statistics."""

    @abc.abstractmethod
    def accept(
        self,
        state: PyTree,
        direction: Params,
        step_size: Float[Array, ""],
        line_search: LineSearchStats,
        stats: SolverStats,
    ) -> PyTree:
        """The solver's state after the line search chose ``step_size``."""


def num_batches(batches: Any, what: str) -> int:
    """The common leading-axis size K of a stack of batches; errors name the leaf."""
    if not (isinstance(batches, tuple) and len(batches) == 2):
        raise ValueError(
            f"{what} must be a pair (inputs, targets) whose leaves are stacked along a "
            "leading axis of micro-batches."
        )
    leaves = jax.tree_util.tree_flatten_with_path(batches)[0]
    if not leaves:
        raise ValueError(f"{what} has no arrays.")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) < 1:
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                "leading axis of micro-batches."
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) != 1:
        detail = ", ".join(f"{p} has {k}" for k, p in sizes.items())
        raise ValueError(
            f"{what}: leaves disagree on the number of micro-batches ({detail})."
        )
    (k,) = sizes
    if k < 1:
        raise ValueError(f"{what} holds K={k} micro-batches; K must be >= 1.")
    return k
