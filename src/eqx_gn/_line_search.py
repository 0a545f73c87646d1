r"""Line searches on the true loss along a GN direction.

A line search sees the loss along the ray, $\varphi(s) = L(\theta_0 + s\,d)$, as a
scalar function, and returns a step size $s \ge 0$. It never accepts a step whose
loss is non-finite or not lower than $\varphi(0)$: it returns $s = 0$ (reject) instead.
It may take the step size it chose at the previous outer step as a hint.
"""

import abc
from collections.abc import Callable
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._custom_types import typecheck
from ._misc import check_number


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
        previous: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        r"""Choose $s \ge 0$ given $\varphi$, $\varphi(0)$, (if ``needs_slope``)
        $\varphi'(0)$, and ``previous``, the step size chosen at the previous outer
        step (0 after a rejection; ``None`` at the first), which a search may use
        as a hint."""


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
class _Walk(eqx.Module):
    """The state of `GridLineSearch`'s walk between two evaluations."""

    index: Int[Array, ""]  # the grid point evaluated next
    down: Bool[Array, ""]  # walking towards smaller steps (else back up)
    count: Int[Array, ""]  # evaluations so far
    best_index: Int[Array, ""]  # the best acceptable point met (start if none)
    best_loss: Float[Array, ""]  # its loss (inf if none)
    start_loss: Float[Array, ""]  # the loss at the start point
    last: Float[Array, ""]  # the loss last evaluated (on the way up: to beat)
    done: Bool[Array, ""]
    at_one: Float[Array, ""]  # the loss at s = 1, NaN if not evaluated


@final
class GridLineSearch(AbstractLineSearch):
    r"""The paper's line search: the best step on the grid
    $s \in \{1, c, c^2, \dots, c^{n-1}\}$ (default $c = 2^{-1/2}$, $n = 8$).

    Returns the grid point of lowest finite loss below $\varphi(0)$, or 0 if there is
    none. With ``stop_on_increase=True`` the grid is walked from $s = 1$ downwards and
    the walk stops at the first increase after an acceptable point: the same choice
    whenever $\varphi$ is unimodal along the grid, in fewer loss evaluations when a
    large step is best.

    With ``warm_start=True`` as well, the walk starts at the grid point nearest
    ``previous`` (the step chosen at the previous outer step; $s = 1$ at the first,
    the smallest grid point after a rejection) instead of at $s = 1$: it walks
    towards smaller steps by the same rule and, when none of them is lower than its
    start, towards larger steps while the loss keeps falling. Again the exhaustive
    grid's choice whenever $\varphi$ is unimodal along the grid, and three
    evaluations when the best step is where it was. It evaluates $\varphi(1)$ only
    when it reaches $s = 1$, so ``loss_at_unit_step`` is NaN otherwise (which is
    why [`eqx_gn.CG`][]'s adaptive damping, a ratio at $s = 1$, refuses it).

    With ``min_step_size`` set, a search that found no grid point below
    $\varphi(0)$ does not reject yet: it keeps halving the step past the grid's
    smallest point, $c^{n-1}/2, c^{n-1}/4, \dots$, down to the last one no smaller
    than ``min_step_size``, and takes the first whose loss is below $\varphi(0)$
    (a GN direction is a descent direction, so for a small enough step there is
    one). Only when none is does it reject. ``None`` (the default) is the paper's
    rule: no point past the grid. Every evaluation counts in ``num_evaluations``.

    ``factor`` and ``min_step_size`` may be scalar arrays: they are traced under
    ``jit``, so a sweep over them compiles once (and vmaps).
    """

    grid_size: int = eqx.field(default=8, static=True)
    # Numbers, not static: a number here is a constant of the trace, and a scalar
    # array is traced, so a sweep over it need not recompile.
    factor: float | Float[Array, ""] = 2**-0.5
    stop_on_increase: bool = eqx.field(default=False, static=True)
    warm_start: bool = eqx.field(default=False, static=True)
    min_step_size: float | Float[Array, ""] | None = None
    needs_slope = False

    def __check_init__(self):
        if self.grid_size < 1:
            raise ValueError(
                f"GridLineSearch: grid_size must be >= 1, got {self.grid_size}."
            )
        check_number(
            "GridLineSearch", "factor", self.factor, lambda v: 0 < v < 1, "in (0, 1)"
        )
        if self.warm_start and not self.stop_on_increase:
            raise ValueError(
                "GridLineSearch: warm_start=True needs stop_on_increase=True (the "
                "exhaustive grid has no start)."
            )
        floor = self.min_step_size
        concrete = not isinstance(self.factor, jax.core.Tracer)
        if floor is not None and not isinstance(floor, jax.core.Tracer) and concrete:
            smallest = self.factor ** (self.grid_size - 1)
            if not 0.0 < float(floor) < smallest:
                raise ValueError(
                    "GridLineSearch: min_step_size must be > 0 and below the grid's "
                    f"smallest step {smallest:.4g} (or None), got {floor}."
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
        previous: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        grid = self.grid.astype(phi0.dtype)
        if self.stop_on_increase:
            step, stats = self._walk(phi, phi0, grid, self._start(previous))
        else:
            step, stats = self._exhaustive(phi, phi0, grid)
        return self._past_grid(phi, phi0, grid[-1], step, stats)

    def _exhaustive(self, phi, phi0, grid):
        """Every grid point; the lowest acceptable one."""
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

    def _past_grid(self, phi, phi0, smallest, step, stats):
        """When the grid had no acceptable point (``step == 0``): halve the step
        from ``smallest`` while it stays >= ``min_step_size``, until the loss is
        below $\varphi(0)$. One ``phi`` per loop iteration (one trace)."""
        if self.min_step_size is None:
            return step, stats
        floor = jnp.asarray(self.min_step_size, phi0.dtype)

        def cond(carry):
            s, found, _, _ = carry
            return ~found & jnp.isfinite(phi0) & (0.5 * s >= floor)

        def body(carry):
            s, _, _, count = carry
            s = 0.5 * s
            value = scalar_loss(phi(s), "GridLineSearch")
            return s, _acceptable(value, phi0), value, count + 1

        init = (smallest, step > 0, stats.loss_after, jnp.asarray(0))
        s, found, value, extra = jax.lax.while_loop(cond, body, init)
        past = (step == 0) & found
        stats = LineSearchStats(
            loss_before=stats.loss_before,
            loss_after=jnp.where(past, value, stats.loss_after),
            loss_at_unit_step=stats.loss_at_unit_step,
            num_evaluations=stats.num_evaluations + extra,
        )
        return jnp.where(past, s, step), stats

    def _start(self, previous):
        """The grid index the walk starts at: 0 ($s = 1$) without ``warm_start`` or
        ``previous``, else the grid point nearest ``previous`` on a log scale."""
        if not self.warm_start or previous is None:
            return jnp.asarray(0)
        previous = jnp.asarray(previous)
        last = self.grid_size - 1
        safe = jnp.where(previous > 0, previous, 1.0)
        index = jnp.round(jnp.log(safe) / jnp.log(self.factor))
        index = jnp.clip(jnp.nan_to_num(index), 0, last).astype(int)
        return jnp.where(previous > 0, index, last)

    def _walk(self, phi, phi0, grid, start):
        """Down from ``start`` (towards smaller steps) until the first increase
        after an acceptable point or the grid's end; then, if ``start`` was the best
        point met or none was acceptable, up from ``start`` while the loss falls.
        Without ``warm_start``, ``start`` is 0 and there is no way up. One ``phi``
        per loop iteration (one trace)."""
        n = self.grid_size

        def body(c: _Walk) -> _Walk:
            value = scalar_loss(phi(grid[c.index]), "GridLineSearch")
            at_one = jnp.where(c.index == 0, value, c.at_one)
            start_loss = jnp.where(c.count == 0, value, c.start_loss)
            # Down: the first increase after an acceptable point, or the grid's end.
            down_ends = (
                jnp.isfinite(c.best_loss) & jnp.isfinite(value) & (value >= c.best_loss)
            ) | (c.index == n - 1)
            better = _acceptable(value, phi0) & (value < c.best_loss)
            best_index = jnp.where(better, c.index, c.best_index)
            best_loss = jnp.where(better, value, c.best_loss)
            turn = (
                c.down
                & down_ends
                & (start > 0)
                & ((best_index == start) | ~jnp.isfinite(best_loss))
            )
            # Up: while the loss falls, to the grid's start.
            falls = jnp.isfinite(value) & (value < c.last)
            keep_up = ~c.down & falls & (c.index > 0)
            keep_down = c.down & ~down_ends
            nxt = jnp.where(keep_down, c.index + 1, jnp.where(turn, start, c.index) - 1)
            return _Walk(
                index=jnp.clip(nxt, 0, n - 1),
                down=c.down & ~turn,
                count=c.count + 1,
                best_index=best_index,
                best_loss=best_loss,
                start_loss=start_loss,
                last=jnp.where(turn, start_loss, value),
                done=~(keep_down | turn | keep_up),
                at_one=at_one,
            )

        nan = jnp.full((), jnp.nan, phi0.dtype)
        init = _Walk(
            index=start,
            down=jnp.asarray(True),
            count=jnp.asarray(0),
            best_index=start,
            best_loss=jnp.asarray(jnp.inf, phi0.dtype),
            start_loss=nan,
            last=nan,
            done=jnp.asarray(False),
            at_one=nan,
        )
        out = jax.lax.while_loop(lambda c: ~c.done, body, init)
        found = jnp.isfinite(out.best_loss)
        stats = LineSearchStats(
            loss_before=phi0,
            loss_after=jnp.where(found, out.best_loss, phi0),
            loss_at_unit_step=out.at_one,
            num_evaluations=out.count,
        )
        return jnp.where(found, grid[out.best_index], 0.0), stats


@final
class BacktrackingArmijo(AbstractLineSearch):
    r"""Backtracking from $s = 1$ until the Armijo condition
    $\varphi(s) \le \varphi(0) + c\, s\, \varphi'(0)$ holds.

    Shrinks $s$ by ``shrink`` at most ``max_steps`` times; returns 0 if the condition
    never holds, if the direction is not a descent direction ($\varphi'(0) \ge 0$), or
    if anything is non-finite. ``c`` and ``shrink`` may be scalar arrays, traced
    under ``jit``.
    """

    # Numbers, not static: a scalar array is traced (a sweep compiles once).
    c: float | Float[Array, ""] = 1e-4
    shrink: float | Float[Array, ""] = 0.5
    max_steps: int = eqx.field(default=10, static=True)
    needs_slope = True

    def __check_init__(self):
        def in_unit(v):
            return 0 < v < 1

        check_number("BacktrackingArmijo", "c", self.c, in_unit, "in (0, 1)")
        check_number("BacktrackingArmijo", "shrink", self.shrink, in_unit, "in (0, 1)")
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
        previous: Float[Array, ""] | None = None,
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


@final
class UnitStep(AbstractLineSearch):
    r"""No search: the solver's direction is taken whole, $s = 1$.

    For solvers whose direction is already a step (an inner optimizer on the
    quadratic model at a tuned learning rate), as NVIDIA NeMo's GN proposal makes
    the line search optional. $\varphi(1)$ is evaluated once, so that a
    non-finite loss at the new point is still rejected ($s = 0$) and the step's
    loss is known; a finite loss is accepted even when it is higher than
    $\varphi(0)$ (that is what taking the step without a search means).
    """

    needs_slope = False

    @typecheck
    def search(
        self,
        phi: Callable[[Float[Array, ""]], Float[Array, ""]],
        phi0: Float[Array, ""],
        slope: Float[Array, ""] | None = None,
        previous: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, ""], LineSearchStats]:
        one = jnp.ones((), phi0.dtype)
        value = scalar_loss(phi(one), "UnitStep")
        ok = jnp.isfinite(value) & jnp.isfinite(phi0)
        stats = LineSearchStats(
            loss_before=phi0,
            loss_after=jnp.where(ok, value, phi0),
            loss_at_unit_step=value,
            num_evaluations=jnp.asarray(1),
        )
        return jnp.where(ok, one, 0.0), stats
