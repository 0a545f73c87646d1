r"""The paper's solver: K steps of an optax optimizer on the GN model, each on a fresh
micro-batch at the fixed linearization point."""

import abc
from typing import Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from .._custom_types import FilterSpec, MicroBatches, Model, Params, typecheck
from .._gnvp import QuadraticModel
from .._misc import tree_axpy, tree_scale, tree_vdot, tree_where, tree_zeros_like
from .._optimizers import muon_adamw
from .._schedules import cosine_decay
from .._trust import AbstractTrustRule, FixedTrust
from .abstract import AbstractGNSolver, GNProblem, GNSolution, SolverStats

Schedule = Literal["constant", "cosine", "global_cosine"]
#: What the inner loop keeps after a rejected step: ``"restart_iterate"`` restarts
#: the iterate from 0 and keeps the optimizer state, ``"restart"`` restarts both,
#: ``"keep"`` keeps both (the rejected iterate seeds the next loop).
OnReject = Literal["restart_iterate", "restart", "keep"]
#: How long each inner update is: ``"learning_rate"`` scales the optimizer's update
#: by the learning rate and its schedule; ``"model"`` also by the exact minimiser
#: of the micro-batch's quadratic model along it.
StepLength = Literal["learning_rate", "model"]


@final
class InnerState(eqx.Module):
    """The inner iterate (relative to the linearization point) and the inner
    optimizer's state; both carry across outer steps when warm-starting.

    The iterate is kept at unit trust scale: a solve at scale $t$ starts from
    $t$ times it and stores its last iterate divided by $t$, so when the trust
    rule rescales the next subproblem, the warm start it carries is rescaled with
    it. Without a scale (``FixedTrust``) it is the iterate itself."""

    direction: Params
    opt_state: PyTree


class _AbstractInnerLoop(AbstractGNSolver[InnerState]):
    """K steps of an optax optimizer on a model of the loss at a fixed point; the
    final classes choose the model (``_objective``)."""

    optimizer: optax.GradientTransformation
    # A leaf, not static: a scalar array here is traced under `eqx.filter_jit`, so
    # a learning-rate sweep compiles once (and can be vmapped).
    learning_rate: float | Float[Array, ""]
    schedule: Schedule = eqx.field(static=True)
    total_steps: int | None = eqx.field(static=True)
    warm_start: bool = eqx.field(static=True)
    on_reject: OnReject = eqx.field(static=True)
    step_length: StepLength = eqx.field(static=True)

    def __init__(
        self,
        optimizer: optax.GradientTransformation | None = None,
        *,
        learning_rate: float | Float[Array, ""] | None = None,
        schedule: Schedule = "cosine",
        total_steps: int | None = None,
        warm_start: bool = True,
        on_reject: OnReject = "restart_iterate",
        adam_filter: FilterSpec | None = None,
        step_length: StepLength = "learning_rate",
    ):
        self.optimizer = (
            muon_adamw(adam_filter=adam_filter) if optimizer is None else optimizer
        )
        if learning_rate is None:
            # The model's step whole, or the paper's rate.
            learning_rate = 1.0 if step_length == "model" else 1e-2
        self.learning_rate = learning_rate
        self.schedule = schedule
        self.total_steps = total_steps
        self.warm_start = warm_start
        self.on_reject = on_reject
        self.step_length = step_length

    def __check_init__(self):
        self._check(type(self).__name__)

    def _check(self, name: str):
        lr = self.learning_rate
        scalar_array = (
            isinstance(lr, (jax.Array, np.ndarray, np.generic))
            and jnp.ndim(lr) == 0
            and jnp.issubdtype(jnp.result_type(lr), jnp.floating)
        )
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) or scalar_array):
            raise ValueError(
                f"{name}: learning_rate must be a float or a scalar float array, got "
                f"{type(lr).__name__} with shape {getattr(lr, 'shape', ())} and dtype "
                f"{getattr(lr, 'dtype', None)}."
            )
        if not isinstance(lr, jax.core.Tracer) and not float(lr) > 0:
            raise ValueError(f"{name}: learning_rate must be > 0, got {lr}.")
        if self.schedule not in ("constant", "cosine", "global_cosine"):
            raise ValueError(
                f"{name}: schedule must be 'constant', 'cosine' or 'global_cosine', "
                f"got {self.schedule!r}."
            )
        if self.schedule == "global_cosine" and (
            self.total_steps is None or self.total_steps < 1
        ):
            raise ValueError(
                f"{name}: schedule='global_cosine' needs total_steps >= 1 (the number of "
                f"outer steps), got {self.total_steps}."
            )
        if self.step_length not in ("learning_rate", "model"):
            raise ValueError(
                f"{name}: step_length must be 'learning_rate' or 'model', got "
                f"{self.step_length!r}."
            )
        if self.on_reject not in ("restart_iterate", "restart", "keep"):
            raise ValueError(
                f"{name}: on_reject must be 'restart_iterate', 'restart' or 'keep', got "
                f"{self.on_reject!r}."
            )

    def default_trust(self) -> AbstractTrustRule:
        """[`eqx_gn.FixedTrust`][]: the paper's fixed subproblem."""
        return FixedTrust()

    @abc.abstractmethod
    def _objective(
        self,
        model_q: QuadraticModel,
        d: Params,
        problem: GNProblem,
        model: Model,
        batch,
    ) -> tuple[Array, Params]:
        """The subproblem's value and gradient at ``d`` on one micro-batch, ``batch``,
        whose quadratic model at ``model`` (the linearization point) is ``model_q``."""

    def _rate(self, step, k, num_steps: int):
        """The inner learning rate at inner step ``k`` of outer step ``step``."""
        if self.schedule == "constant":
            fraction = jnp.zeros(())
        elif self.schedule == "cosine":
            fraction = k / num_steps
        else:
            fraction = (step * num_steps + k) / (self.total_steps * num_steps)
        return cosine_decay(self.learning_rate, fraction)

    @typecheck
    def init(self, model: Model) -> InnerState:
        params = eqx.filter(model, eqx.is_inexact_array)
        return InnerState(tree_zeros_like(params), self.optimizer.init(params))

    @typecheck
    def solve(
        self,
        problem: GNProblem,
        model: Model,
        batches: MicroBatches,
        state: InnerState,
        step: Int[Array, ""],
        scale: Float[Array, ""] | None = None,
    ) -> GNSolution[InnerState]:
        num_steps = problem.check_batches(model, batches)
        params = eqx.filter(model, eqx.is_inexact_array)
        if self.warm_start:
            d, opt_state = state.direction, state.opt_state
            if scale is not None:
                d = tree_scale(scale, d)
        else:
            d, opt_state = tree_zeros_like(params), self.optimizer.init(params)

        def inner_step(carry, xs):
            d, opt_state, _ = carry
            batch, k = xs
            model_q = problem.quadratic_model(model, batch)
            value, grad = self._objective(model_q, d, problem, model, batch)
            theta = jax.tree.map(jnp.add, params, d)
            updates, opt_state = self.optimizer.update(grad, opt_state, theta)
            rate = self._rate(step, k, num_steps)
            if self.step_length == "model":
                rate = rate * _model_step(model_q, grad, updates)
            if scale is not None:
                rate = rate * scale
            # The iterate this step's model value was taken at rides along, so that
            # the true loss can be read at the same point for the last step.
            return (tree_axpy(rate, updates, d), opt_state, d), (
                value,
                model_q.loss_value,
            )

        (d, opt_state, evaluated), (values, losses) = jax.lax.scan(
            inner_step, (d, opt_state, d), (batches, jnp.arange(num_steps))
        )
        last = jax.tree.map(lambda x: x[-1], batches)
        moved = eqx.apply_updates(model, evaluated)
        stats = SolverStats(
            model_start=values[0],
            model_end=values[-1],
            predicted_decrease=losses[-1] - values[-1],
            damping=jnp.zeros((), values.dtype),
            iterations=jnp.asarray(num_steps),
            true_decrease=losses[-1] - problem.loss_value(moved, last),
        )
        stored = d if scale is None else tree_scale(1 / scale, d)
        return GNSolution(d, InnerState(stored, opt_state), stats)

    @typecheck
    def accept(
        self, state: InnerState, direction: Params, step_size: Float[Array, ""]
    ) -> InnerState:
        # The next linearization point is theta0 + s d; the inner iterate theta0 + d
        # stays where it is, so relative to the new point it is (1 - s) d (kept at
        # unit trust scale, as `state.direction` is: see `InnerState`).
        carried = InnerState(
            tree_scale(1.0 - step_size, state.direction), state.opt_state
        )
        if self.on_reject == "keep":
            return carried
        # A rejected iterate would seed the next inner loop, which then keeps
        # growing the same rejected step: it restarts from 0. The optimizer's
        # moments estimate the subproblem's gradient scale, which the rejection
        # does not invalidate: "restart_iterate" keeps them (measured on the tiny LM,
        # see the solvers guide).
        zero = tree_zeros_like(state.direction)
        if self.on_reject == "restart":
            fresh = InnerState(zero, self.optimizer.init(direction))
        else:
            fresh = InnerState(zero, state.opt_state)
        return tree_where(step_size > 0, carried, fresh)


def _model_step(model_q: QuadraticModel, grad: Params, update: Params) -> Array:
    r"""$\alpha^* = \max(0, -\nabla q(d)^\top u / u^\top G u)$, the minimiser of the
    micro-batch's quadratic model along the update $u$ (0 when $u$ does not
    descend or the model has no curvature along it)."""
    slope = tree_vdot(grad, update)
    curvature = model_q.curvature(update)
    ok = (slope < 0) & (curvature > 0)
    return jnp.where(ok, -slope / jnp.where(ok, curvature, 1.0), 0.0)


@final
class InnerOptimizer(_AbstractInnerLoop):
    r"""Minimise the GN quadratic model with K steps of an optax optimizer.

    Step $k$ linearizes at the fixed $\theta_0$ on the $k$-th micro-batch and updates
    the inner iterate with the gradient $g_k + G_k d$ of that micro-batch's quadratic
    model. ``optimizer`` gives the direction at unit learning rate; the step length is
    ``learning_rate`` times the schedule: ``"cosine"`` decays towards 0 inside each outer
    step, ``"global_cosine"`` once over ``total_steps`` outer steps (the paper's best),
    ``"constant"`` not at all; a trust rule's scale (see [`eqx_gn.AdaptiveTrust`][])
    multiplies it. A scalar array ``learning_rate`` is traced under
    `eqx.filter_jit`, so a sweep over it compiles once and can be vmapped. With
    ``warm_start`` the inner iterate and optimizer state carry over to the next outer
    step; after a rejected step (line-search step size 0) the iterate restarts from
    zero and the optimizer state carries over (``on_reject="restart_iterate"``;
    ``"restart"`` also restarts the optimizer state, ``"keep"`` keeps the rejected
    iterate). The default optimizer
    is the paper's: Muon on hidden 2-D matrices, AdamW on the rest and on what
    ``adam_filter`` selects (embedding and head), after global-norm clipping at 1.

    ``step_length="model"`` lets the model choose each update's length: the
    optimizer's update $u_k$ is scaled by the minimiser of the micro-batch's model
    along it,

    $$\alpha_k = \max\Bigl(0, \frac{-\nabla q_k(d)^\top u_k}{u_k^\top G_k u_k}\Bigr),$$

    times ``learning_rate`` (then the fraction of that step taken; default 1) and
    the schedule. One more tangent pass per inner step
    ([`eqx_gn.QuadraticModel.curvature`][]) and no learning rate to tune: the
    update's own scale, which differs by optimizer and changes with K, drops out.
    ``learning_rate`` defaults to 1 with it and to $10^{-2}$ without.
    """

    def _objective(self, model_q, d, problem, model, batch):
        return model_q.value_and_grad(d)


@final
class ProxLinear(_AbstractInnerLoop):
    r"""Like [`eqx_gn.InnerOptimizer`][], on the exact loss of the linearized model.

    Step $k$ minimises $L_k(z_0 + J_k d)$ (no Taylor expansion of the loss) on the
    $k$-th micro-batch; everything else is as in [`eqx_gn.InnerOptimizer`][]
    (with ``step_length="model"`` the length comes from the quadratic model along
    the update, the linearized loss's second-order expansion at $d$ = 0).
    """

    def _objective(self, model_q, d, problem, model, batch):
        return model_q.linearized_loss_value_and_grad(d)


@final
class TrueLossInner(_AbstractInnerLoop):
    r"""Like [`eqx_gn.InnerOptimizer`][], on the true loss: the ablation with no
    curvature model.

    Step $k$ takes the gradient of the loss itself,
    $\nabla_d\, L_k(f(\theta_0 + d, x_k), y_k)$, on the $k$-th micro-batch, where
    [`eqx_gn.InnerOptimizer`][] takes $g_k + G_k d$ of the quadratic model and
    [`eqx_gn.ProxLinear`][] the gradient of the linearized model's loss. Everything
    else is the same: the optimizer, the K fresh micro-batches, the schedule, the
    warm start, the trust scale and the outer line search. So GN against this
    solver separates what the curvature model contributes from what K sequential
    small-batch steps, searched along as one outer step, do alone. Where the loss
    is quadratic in the parameters (mean squared error of a linear model) the GN
    model is exact and this equals [`eqx_gn.InnerOptimizer`][] step for step.

    ``blocks`` do not change it: the loss has no block structure to drop. Its
    statistics mirror the other inner loops': ``model_start`` and ``model_end``
    are the true loss of the first and last iterate evaluated, each on its
    micro-batch, and ``predicted_decrease`` is the last micro-batch's loss at
    $d = 0$ minus its loss at the last iterate evaluated (the one before the last
    update; no extra forward pass), where the other loops put their model's value.
    Each step also runs the model forward at $\theta_0$ on its micro-batch (the
    loss at $d = 0$ that the statistics read), on top of a forward and backward
    pass at $\theta_0 + d$.
    """

    def __check_init__(self):
        # (Equinox runs the base class's checks too.)
        if self.step_length != "learning_rate":
            raise ValueError(
                "TrueLossInner: step_length must be 'learning_rate' (a model step "
                "would bring back the curvature model the ablation removes)."
            )

    def _objective(self, model_q, d, problem, model, batch):
        return problem.loss_value_and_grad(model, batch, shift=d)
