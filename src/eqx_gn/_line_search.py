r"""Line searches on the true loss along a GN direction.

A line search sees the loss along the ray, $\varphi(s) = L(\theta_0 + s\,d)$, as a
scalar function, and returns a step size $s \ge 0$. It never accepts a step whose
loss is non-finite or not lower than $\varphi(0)$: it returns $s = 0$ (reject) instead.
"""

import abc
from collections.abc import Callable
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._custom_types import typecheck


@final
class LineSearchStats(eqx.Module):
    """What a line search saw: the loss at 0, at the chosen step and at step 1."""

    loss_before: Float[Array, ""]
    loss_after: Float[Array, ""]
    loss_at_unit_step: Float[Array, ""]
    num_evaluations: Int[Array, ""]


class AbstractLineSearch(eqx.Module):
    """A rule choosing the step size along a direction from the true loss."""

    needs_slope: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def search(
        self,
        phi: Callable[[Float[Array, ""]], Float[Array, ""]],
        phi0: Float[Array, ""],
        slope: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        r"""Choose $s \ge 0$ given $\varphi$, $\varphi(0)$ and (if
        ``needs_slope``) $\varphi'(0)$."""


def scalar_loss(value, name: str) -> Array:
    """``value`` after checking (at trace time) that ``phi`` returned a scalar."""
    shape = jnp.shape(value)
    if shape != ():
        raise ValueError(
            f"{name}: phi(s) must return a scalar loss, got shape {shape}; average the "
            "loss over the batch (and micro-batches) inside phi."
        )
    return value


def _acceptable(value, phi0):
    return jnp.isfinite(value) & jnp.isfinite(phi0) & (value < phi0)


@final
class GridLineSearch(AbstractLineSearch):
    r"""The paper's line search: the best step on the grid
    $s \in \{1, c, c^2, \dots, c^{n-1}\}$ (default $c = 2^{-1/2}$, $n = 8$).

    Returns the grid point of lowest finite loss below $\varphi(0)$, or 0 if there is
    none. With ``stop_on_increase=True`` the grid is walked from $s = 1$ downwards and
    the walk stops at the first increase after an acceptable point: the same choice
    whenever $\varphi$ is unimodal along the grid, usually in two or three loss
    evaluations instead of $n$.
    """

    grid_size: int = eqx.field(default=8, static=True)
    factor: float = eqx.field(default=2**-0.5, static=True)
    stop_on_increase: bool = eqx.field(default=False, static=True)
    needs_slope = False

    def __check_init__(self):
        if self.grid_size < 1:
            raise ValueError(
                f"GridLineSearch: grid_size must be >= 1, got {self.grid_size}."
            )
        if not 0.0 < self.factor < 1.0:
            raise ValueError(
                f"GridLineSearch: factor must be in (0, 1), got {self.factor}."
            )

    @property
    def grid(self) -> Float[Array, " n"]:
        """The step sizes tried, largest first."""
        return self.factor ** jnp.arange(self.grid_size, dtype=float)

    @typecheck
    def search(
        self,
        phi: Callable[[Float[Array, ""]], Float[Array, ""]],
        phi0: Float[Array, ""],
        slope: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        grid = self.grid.astype(phi0.dtype)
        if self.stop_on_increase:
            return self._walk(phi, phi0, grid)
        losses = jax.lax.map(lambda s: scalar_loss(phi(s), "GridLineSearch"), grid)
        ok = _acceptable(losses, phi0)
        best = jnp.argmin(jnp.where(ok, losses, jnp.inf))
        found = jnp.any(ok)
        step = jnp.where(found, grid[best], 0.0)
        stats = LineSearchStats(
            loss_before=phi0,
            loss_after=jnp.where(found, losses[best], phi0),
            loss_at_unit_step=losses[0],
            num_evaluations=jnp.asarray(self.grid_size),
        )
        return step, stats

    def _walk(self, phi, phi0, grid):
        n = self.grid_size
        inf = jnp.asarray(jnp.inf, phi0.dtype)

        def cond(carry):
            i, _, _, stop, _ = carry
            return (i < n) & ~stop

        def body(carry):
            i, best_step, best_loss, _, at_one = carry
            value = scalar_loss(phi(grid[i]), "GridLineSearch")
            ok = _acceptable(value, phi0)
            better = ok & (value < best_loss)
            found_before = jnp.isfinite(best_loss)
            stop = found_before & jnp.isfinite(value) & (value >= best_loss)
            at_one = jnp.where(i == 0, value, at_one)
            return (
                i + 1,
                jnp.where(better, grid[i], best_step),
                jnp.where(better, value, best_loss),
                stop,
                at_one,
            )

        init = (jnp.asarray(0), jnp.zeros((), phi0.dtype), inf, jnp.asarray(False), inf)
        count, step, loss, _, at_one = jax.lax.while_loop(cond, body, init)
        found = jnp.isfinite(loss)
        stats = LineSearchStats(
            loss_before=phi0,
            loss_after=jnp.where(found, loss, phi0),
            loss_at_unit_step=at_one,
            num_evaluations=count,
        )
        return jnp.where(found, step, 0.0), stats


@final
class BacktrackingArmijo(AbstractLineSearch):
    r"""Backtracking from $s = 1$ until the Armijo condition
    $\varphi(s) \le \varphi(0) + c\, s\, \varphi'(0)$ holds.

    Shrinks $s$ by ``shrink`` at most ``max_steps`` times; returns 0 if the condition
    never holds, if the direction is not a descent direction ($\varphi'(0) \ge 0$), or
    if anything is non-finite.
    """

    c: float = eqx.field(default=1e-4, static=True)
    shrink: float = eqx.field(default=0.5, static=True)
    max_steps: int = eqx.field(default=10, static=True)
    needs_slope = True

    def __check_init__(self):
        if not 0.0 < self.c < 1.0:
            raise ValueError(f"BacktrackingArmijo: c must be in (0, 1), got {self.c}.")
        if not 0.0 < self.shrink < 1.0:
            raise ValueError(
                f"BacktrackingArmijo: shrink must be in (0, 1), got {self.shrink}."
            )
        if self.max_steps < 1:
            raise ValueError(
                f"BacktrackingArmijo: max_steps must be >= 1, got {self.max_steps}."
            )

    @typecheck
    def search(
        self,
        phi: Callable[[Float[Array, ""]], Float[Array, ""]],
        phi0: Float[Array, ""],
        slope: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        if slope is None:
            raise ValueError("BacktrackingArmijo needs the slope phi'(0).")
        descent = jnp.isfinite(phi0) & jnp.isfinite(slope) & (slope < 0)

        def satisfied(s, value):
            return _acceptable(value, phi0) & (value <= phi0 + self.c * s * slope)

        def cond(carry):
            i, _, _, done, _ = carry
            return descent & (i < self.max_steps) & ~done

        def body(carry):
            i, s, _, _, at_one = carry
            value = scalar_loss(phi(s), "BacktrackingArmijo")
            done = satisfied(s, value)
            at_one = jnp.where(i == 0, value, at_one)
            return i + 1, jnp.where(done, s, s * self.shrink), value, done, at_one

        one = jnp.ones((), phi0.dtype)
        nan = jnp.full((), jnp.nan, phi0.dtype)
        init = (jnp.asarray(0), one, nan, jnp.asarray(False), nan)
        count, s, value, done, at_one = jax.lax.while_loop(cond, body, init)
        stats = LineSearchStats(
            loss_before=phi0,
            loss_after=jnp.where(done, value, phi0),
            loss_at_unit_step=at_one,
            num_evaluations=count,
        )
        return jnp.where(done, s, 0.0), stats
