r"""Hessian-free: conjugate gradient on the damped GN system."""

from typing import Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._custom_types import MicroBatches, Model, Params, typecheck
from .._misc import (
    check_number,
    tree_axpy,
    tree_scale,
    tree_vdot,
    tree_zeros_like,
)
from .._trust import AbstractTrustRule, LevenbergMarquardt
from .abstract import AbstractGNSolver, GNProblem, GNSolution, SolverStats


@final
class CGState(eqx.Module):
    """The previous CG solution (a warm start's first iterate)."""

    previous: Params


def _concatenate(batches):
    """The K micro-batches as one batch: ``(K, B, ...) -> (B * K, ...)``.

    Examples are taken in ``(b, k)`` order, not ``(k, b)``: the batch axis moves to
    the front first, so that when it is sharded (over a ``data`` axis) every device
    already holds the contiguous rows it owns afterwards. Merging ``K`` into a
    sharded major axis is a local reshape; the ``(k, b)`` order would need each
    device's rows from every micro-batch moved (XLA's "involuntary full
    rematerialization" under ``jit``, and an unsupported reshape on an
    explicit-sharding mesh). The loss is a mean over positions, so the order of
    the examples changes nothing but rounding.
    """

    def merge(x):
        if jnp.ndim(x) < 2:
            return jnp.reshape(x, (-1,))
        x = jnp.swapaxes(x, 0, 1)
        return jnp.reshape(x, (-1, *x.shape[2:]))

    return jax.tree.map(merge, batches)


def _gradient_second_moment(problem: GNProblem, model: Model, batches) -> Params:
    r"""$F = \frac1K \sum_k g_k \odot g_k$, the mean square of the K micro-batches'
    loss gradients at $\theta_0$ (one backward pass per micro-batch, in a scan)."""

    def body(total, batch):
        _, grad = problem.loss_value_and_grad(model, batch)
        return jax.tree.map(lambda t, g: t + g * g, total, grad), None

    total, _ = jax.lax.scan(
        body, tree_zeros_like(eqx.filter(model, eqx.is_inexact_array)), batches
    )
    k = jax.tree.leaves(batches)[0].shape[0]
    return tree_scale(1.0 / k, total)


def _diagonal_preconditioner(second_moment: Params, floor, exponent) -> Params:
    r"""$M = (F + \epsilon \bar F)^\xi$, with $\bar F$ the mean of $F$ over every
    entry: Martens' (2010) preconditioner with a floor relative to $F$'s scale."""
    leaves = jax.tree.leaves(second_moment)
    size = sum(x.size for x in leaves)
    mean = sum(jnp.sum(x) for x in leaves) / size
    # A zero F (no gradient at all) leaves M = 1: plain CG.
    offset = jnp.where(mean > 0, floor * mean, 1.0)
    return jax.tree.map(lambda f: (f + offset) ** exponent, second_moment)


@final
class CG(AbstractGNSolver[CGState]):
    r"""Conjugate gradient on $(G + \lambda I)\, d = -g$.

    $G$ and $g$ are the GN matrix and gradient of the loss on all K micro-batches
    together (one linearization, reused by every CG iteration). CG stops after
    ``max_iterations`` or when $\lVert r \rVert \le$ ``tolerance`` $\lVert g \rVert$.
    The damping is ``damping`` divided by the trust rule's scale $t$: with
    [`eqx_gn.GaussNewton`][]'s default rule for CG, [`eqx_gn.LevenbergMarquardt`][],
    that is Levenberg-Marquardt damping ($\lambda \leftarrow \frac32\lambda$ when
    the actual decrease at unit step is below $\frac14$ of the predicted one,
    $\lambda \leftarrow \frac23\lambda$ above $\frac34$); with
    [`eqx_gn.FixedTrust`][], $\lambda$ stays ``damping``.

    Two of Martens' (2010) devices are on by default, as in his Hessian-free
    method: ``warm_start`` starts CG from the previous solution scaled by
    ``warm_start_decay`` (``False``: from 0), so the Krylov progress of one step
    carries to the next; ``preconditioner="diagonal"`` runs preconditioned CG with
    $M = (F + \epsilon \bar F)^\xi$, where $F$ is the mean square of the K
    micro-batches' gradients at $\theta_0$ (one more backward pass per
    micro-batch), $\bar F$ its mean entry, $\epsilon$ = ``preconditioner_floor``
    and $\xi$ = ``preconditioner_exponent`` (``"none"``: $M = I$). The
    preconditioner changes the path CG takes within ``max_iterations``, not the
    solution of a nonsingular system ($\lambda > 0$); with $\lambda = 0$ and a
    singular $G$, unpreconditioned CG from 0 converges to the minimum-norm
    solution and PCG to another.

    ``tolerance``, ``damping``, ``warm_start_decay`` and the preconditioner's two
    numbers may be scalar arrays: they
    are traced under ``jit``, so a sweep over them compiles once (and vmaps).
    """

    max_iterations: int = eqx.field(default=50, static=True)
    # Numbers, not static: a scalar array is traced (a sweep compiles once).
    tolerance: float | Float[Array, ""] = 1e-6
    damping: float | Float[Array, ""] = 1e-3
    warm_start: bool = eqx.field(default=True, static=True)
    warm_start_decay: float | Float[Array, ""] = 0.95
    preconditioner: Literal["none", "diagonal"] = eqx.field(
        default="diagonal", static=True
    )
    preconditioner_floor: float | Float[Array, ""] = 1e-3
    preconditioner_exponent: float | Float[Array, ""] = 0.75

    def __check_init__(self):
        if self.max_iterations < 1:
            raise ValueError(
                f"CG: max_iterations must be >= 1, got {self.max_iterations}."
            )
        check_number("CG", "tolerance", self.tolerance, lambda v: v >= 0, ">= 0")
        check_number("CG", "damping", self.damping, lambda v: v >= 0, ">= 0")
        check_number(
            "CG", "warm_start_decay", self.warm_start_decay, lambda v: v >= 0, ">= 0"
        )
        if self.preconditioner not in ("none", "diagonal"):
            raise ValueError(
                "CG: preconditioner must be 'none' or 'diagonal', got "
                f"{self.preconditioner!r}."
            )
        check_number(
            "CG",
            "preconditioner_floor",
            self.preconditioner_floor,
            lambda v: v > 0,
            "> 0",
        )
        check_number(
            "CG",
            "preconditioner_exponent",
            self.preconditioner_exponent,
            lambda v: v >= 0,
            ">= 0",
        )

    def default_trust(self) -> AbstractTrustRule:
        r"""[`eqx_gn.LevenbergMarquardt`][]: the damping follows $\rho$."""
        return LevenbergMarquardt()

    @typecheck
    def init(self, model: Model) -> CGState:
        return CGState(tree_zeros_like(eqx.filter(model, eqx.is_inexact_array)))

    @typecheck
    def solve(
        self,
        problem: GNProblem,
        model: Model,
        batches: MicroBatches,
        state: CGState,
        step: Int[Array, ""],
        scale: Float[Array, ""] | None = None,
    ) -> GNSolution[CGState]:
        problem.check_batches(model, batches)
        batch = _concatenate(batches)
        model_q = problem.quadratic_model(model, batch)
        g = model_q.gradient()
        dtype = jnp.result_type(*jax.tree.leaves(g), float)
        # A trust rule's scale t trusts the model t times further: damping / t.
        damping = jnp.asarray(self.damping, dtype)
        if scale is not None:
            damping = damping / scale

        def operator(v):
            return tree_axpy(damping, v, model_q.gnvp(v))

        if self.preconditioner == "diagonal":
            m = _diagonal_preconditioner(
                _gradient_second_moment(problem, model, batches),
                self.preconditioner_floor,
                self.preconditioner_exponent,
            )

            def precondition(r):
                return jax.tree.map(jnp.divide, r, m)
        else:

            def precondition(r):
                return r

        if self.warm_start:
            x0 = tree_scale(self.warm_start_decay, state.previous)
            r0 = jax.tree.map(lambda a, b: -a - b, g, operator(x0))
        else:
            x0 = tree_zeros_like(g)
            r0 = tree_scale(-1.0, g)

        def squared_norm(r, rz):
            # r.r, which is r.z already when M = I.
            return rz if self.preconditioner == "none" else tree_vdot(r, r)

        z0 = precondition(r0)
        threshold = (self.tolerance**2) * tree_vdot(g, g)

        # Preconditioned CG (M = I without a preconditioner): rz = r.M^-1 r
        # drives the steps, rr = r.r the stopping test.
        def cond(carry):
            i, _, _, _, _, rr, breakdown = carry
            return (i < self.max_iterations) & (rr > threshold) & ~breakdown

        def body(carry):
            i, x, r, p, rz, _, _ = carry
            ap = operator(p)
            pap = tree_vdot(p, ap)
            breakdown = ~(pap > 0)
            alpha = jnp.where(breakdown, 0.0, rz / jnp.where(breakdown, 1.0, pap))
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            z = precondition(r)
            rz_new = tree_vdot(r, z)
            beta = rz_new / jnp.where(rz > 0, rz, 1.0)
            p = tree_axpy(beta, p, z)
            return i + 1, x, r, p, rz_new, squared_norm(r, rz_new), breakdown

        rz0 = tree_vdot(r0, z0)
        init = (
            jnp.asarray(0),
            x0,
            r0,
            z0,
            rz0,
            squared_norm(r0, rz0),
            jnp.asarray(False),
        )
        iterations, x, r, *_ = jax.lax.while_loop(cond, body, init)
        # (G + lambda I) x = -g - r, so x.Gx = -x.g - x.r - lambda x.x: the model value
        # needs no extra product.
        gx = tree_vdot(g, x)
        xgx = -gx - tree_vdot(x, r) - damping * tree_vdot(x, x)
        decrease = -(gx + 0.5 * xgx)
        stats = SolverStats(
            model_start=model_q.loss_value,
            model_end=model_q.loss_value - decrease,
            predicted_decrease=decrease,
            damping=damping,
            iterations=iterations,
            true_decrease=model_q.loss_value
            - problem.loss_value(eqx.apply_updates(model, x), batch),
        )
        return GNSolution(x, CGState(x), stats)

    @typecheck
    def accept(
        self, state: CGState, direction: Params, step_size: Float[Array, ""]
    ) -> CGState:
        del direction, step_size
        return state
