r"""Trust rules: who owns the step scale of the next GN subproblem.

A solver proposes a direction $d$; the line search chooses how far along it to
go, $s$. A trust rule reads what that outer step saw and sets a scale $t > 0$ for
the next subproblem: the inner-loop solvers ([`eqx_gn.InnerOptimizer`][],
[`eqx_gn.ProxLinear`][]) multiply their learning rate by $t$, so the next
direction is about $t$ times as long, and [`eqx_gn.CG`][] divides its damping by
$t$. The line search still decides each step; the rule keeps the next direction
at a length the GN model can be trusted with, so the search does not have to keep
cutting it (or reject it) step after step.

This is the split of optimistix's descents and searches: a solver proposes a
direction and the decrease its model predicts; the line search chooses how far to
go; the trust rule chooses how to scale the next subproblem. Any rule works with
any solver. [`eqx_gn.FixedTrust`][] is the paper's rule for the inner-loop solvers,
[`eqx_gn.LevenbergMarquardt`][] the classic rule of a damped system (CG's default),
[`eqx_gn.AdaptiveTrust`][] the rule that follows the chosen step size.
"""

import abc
from typing import Generic, TypeVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._line_search import LineSearchStats
from ._misc import check_number

#: A trust rule's state: ``None`` for `FixedTrust`, the scale $t$ for the others.
TrustState = TypeVar("TrustState")
#: The scale $t > 0$ of the next subproblem, the state of the rules that have one.
TrustScale = Float[Array, ""]


class AbstractTrustRule(eqx.Module, Generic[TrustState]):
    """A rule that scales the next GN subproblem from the last outer step, generic
    over its state (as the solvers are over theirs)."""

    @abc.abstractmethod
    def init(self, dtype) -> TrustState:
        """The rule's state before the first step."""

    @abc.abstractmethod
    def scale(self, state: TrustState) -> Float[Array, ""] | None:
        """The scale $t$ of the next subproblem; ``None`` for none at all (the
        solvers then compute exactly what they compute without a rule)."""

    @abc.abstractmethod
    def update(
        self,
        state: TrustState,
        step_size: Float[Array, ""],
        line_search: LineSearchStats,
        predicted_decrease: Float[Array, ""],
        true_decrease: Float[Array, ""] | None = None,
    ) -> TrustState:
        """The state after an outer step chose ``step_size`` (0: rejected).

        ``predicted_decrease`` is the solver's prediction for its direction and
        ``true_decrease`` (when the solver measured it) the true loss's decrease
        at the same point on the same data; ``line_search`` holds the loss at
        $s = 1$ on the line-search batches."""


@final
class FixedTrust(AbstractTrustRule[None]):
    """The paper's rule: no scale, the subproblem is the same at every step."""

    def init(self, dtype) -> None:
        del dtype
        return None

    def scale(self, state: None) -> None:
        del state
        return None

    def update(
        self, state, step_size, line_search, predicted_decrease, true_decrease=None
    ) -> None:
        del step_size, line_search, predicted_decrease, true_decrease
        return state


@final
class AdaptiveTrust(AbstractTrustRule[TrustScale]):
    r"""The scale follows the step the line search chose.

    With $s$ the chosen step size and $\rho$ the actual over the predicted decrease
    at $s = 1$ (when the search evaluated it):

    - $s < $ ``shrink_below`` ($\frac14$): the direction was about $1/s$ too long
      for the true loss, so $t \leftarrow t \max(s, \text{min\_factor})$
      (``min_factor`` $\frac14$); a rejection ($s = 0$) gives
      $t \leftarrow t \cdot \text{min\_factor}$;
    - ``shrink_below`` $\le s < 1$: $t$ stays (a line search often prefers a
      somewhat shorter step; shrinking on every such step compounds and starves
      the solver, measured in the runner: the scale fell to its floor on runs
      that the fixed rule trained well);
    - $s = 1$ and $\rho \ge \frac14$ (or $\rho$ unknown): the full step was the
      best, so $t \leftarrow \text{grow} \cdot t$ (``grow`` 2);
    - $s = 1$ and $\rho < \frac14$: $t$ stays;

    always within ``[min_scale, max_scale]``, from $t = 1$. With ``max_scale`` above
    1 the rule also lengthens a learning rate set too small; ``max_scale = 1``
    makes the learning rate given to the solver the largest it uses. The inner
    solvers rescale their warm-start iterate with $t$ (see
    [`eqx_gn.InnerState`][]), so a shrink shortens the next direction at once.

    The defaults are measured (`tiny` LM, bundled text, 32 and 128 sequences, inner
    learning rates 1/8 to 8 times the default; the solvers guide has the table):
    a shrink floor of $\frac1{16}$ and growth of $\frac32$ left the scale at
    $10^{-3}$ after the first steps past the warm-up, whose directions are too long
    at every learning rate, and it took 15 steps to recover; a warm-start iterate
    left at its old scale kept the next direction too long whatever $t$ was.

    **It ratchets with warm-started inner loops** (measured since, `tiny` at 256
    sequences, K = 64): the iterate carried over, $(1 - s) d$, makes a chosen
    $s$ well below 1 the steady state rather than a sign of too long a direction
    (the paper's fixed rule at its best learning rate chose $s$ between 0.09 and
    0.35 at most steps), so the rule shrinks at most steps and sits at
    ``min_scale``. The runner's default is now the model's own inner step length
    ([`eqx_gn.InnerOptimizer`][]'s ``step_length="model"``) with no rule.

    This is the role of Levenberg-Marquardt damping in trust-region methods, with
    the line search's choice as the measure of agreement (kfac-jax adapts its
    damping from $\rho$ the same way; optimistix keeps the step scale in a search
    object apart from the descent that proposes the direction).
    """

    grow: float | Float[Array, ""] = 2.0
    shrink_below: float | Float[Array, ""] = 0.25
    min_factor: float | Float[Array, ""] = 0.25
    min_scale: float | Float[Array, ""] = 1e-3
    max_scale: float | Float[Array, ""] = 8.0

    def __check_init__(self):
        def check(name, ok, what):
            check_number("AdaptiveTrust", name, getattr(self, name), ok, what)

        check("grow", lambda v: v >= 1, ">= 1")
        check("min_factor", lambda v: 0 < v <= 1, "in (0, 1]")
        check("shrink_below", lambda v: 0 < v <= 1, "in (0, 1]")
        check("min_scale", lambda v: v > 0, "> 0")
        if not isinstance(self.max_scale, jax.core.Tracer) and not isinstance(
            self.min_scale, jax.core.Tracer
        ):
            if not float(self.max_scale) >= float(self.min_scale):
                raise ValueError(
                    f"AdaptiveTrust: max_scale must be >= min_scale, got "
                    f"{self.max_scale} < {self.min_scale}."
                )
            if not float(self.min_scale) <= 1 <= float(self.max_scale):
                raise ValueError(
                    "AdaptiveTrust: the start, scale 1, must lie in [min_scale, "
                    f"max_scale], got [{self.min_scale}, {self.max_scale}]."
                )

    def init(self, dtype) -> TrustScale:
        return jnp.ones((), dtype)

    def scale(self, state: TrustScale) -> TrustScale:
        return state

    def update(
        self,
        state: TrustScale,
        step_size: Float[Array, ""],
        line_search: LineSearchStats,
        predicted_decrease: Float[Array, ""],
        true_decrease: Float[Array, ""] | None = None,
    ) -> TrustScale:
        del true_decrease  # the rule reads the search's rho (see above)
        dtype = state.dtype
        s = jnp.asarray(step_size, dtype)
        actual = line_search.loss_before - line_search.loss_at_unit_step
        rho = actual / jnp.where(predicted_decrease > 0, predicted_decrease, jnp.nan)
        agrees = ~(rho < 0.25)  # NaN (unknown) counts as agreement
        factor = jnp.where(
            s >= 1,
            jnp.where(agrees, self.grow, 1.0),
            jnp.where(s < self.shrink_below, jnp.maximum(s, self.min_factor), 1.0),
        ).astype(dtype)
        new = jnp.clip(state * factor, self.min_scale, self.max_scale)
        return new.astype(dtype)


@final
class LevenbergMarquardt(AbstractTrustRule[TrustScale]):
    r"""Levenberg-Marquardt's rule, from the agreement of model and loss.

    With $\rho = (L(\theta_0) - L(\theta_0 + d)) / (q(0) - q(d))$, the true over
    the predicted decrease of the solver's direction, both on the data the solver
    predicted on (``true_decrease``, which every solver of this library measures:
    see [`eqx_gn.SolverStats`][]):

    - $\rho <$ ``low`` ($\frac14$): $t \leftarrow t / \text{factor}$ (for
      [`eqx_gn.CG`][], damping $\lambda / t$ grows by ``factor``, $\frac32$);
    - $\rho >$ ``high`` ($\frac34$): $t \leftarrow \text{factor} \cdot t$;
    - otherwise $t$ stays;

    within ``[min_scale, max_scale]``, from $t = 1$. A model that predicts no
    decrease ($q(d) \ge q(0)$) or a loss of $+\infty$ counts as $\rho <$ ``low``.

    Why the solver's own data: a $\rho$ whose true decrease is read on other
    batches (the line search's) measures the gap between two batches as much as
    the model. Measured with CG on `tiny` at 256 sequences: the line-search
    batches' decrease was a small fraction of the prediction on CG's batches at
    almost every step, so the damping grew without end (to $10^4$ times its start)
    and the run stalled; see the solvers guide.

    Without ``true_decrease`` (a solver that does not measure it, or NaN) the
    loss at $s = 1$ on the line-search batches stands in, and when that is unknown
    too (a search that did not evaluate it, as [`eqx_gn.GridLineSearch`][]'s warm
    walk may not) the step the search chose: $s <$ ``low`` counts as
    $\rho <$ ``low``, any other step keeps $t$.
    """

    factor: float | Float[Array, ""] = 1.5
    low: float | Float[Array, ""] = 0.25
    high: float | Float[Array, ""] = 0.75
    min_scale: float | Float[Array, ""] = 1e-8
    max_scale: float | Float[Array, ""] = 1e8

    def __check_init__(self):
        values = {}
        for name in ("factor", "low", "high", "min_scale", "max_scale"):
            value = getattr(self, name)
            if isinstance(value, jax.core.Tracer):
                return
            values[name] = float(value)
        v = values
        if not v["factor"] >= 1:
            raise ValueError(
                f"LevenbergMarquardt: factor must be >= 1, got {self.factor}."
            )
        if not v["low"] <= v["high"]:
            raise ValueError(
                f"LevenbergMarquardt: need low <= high, got {self.low}, {self.high}."
            )
        if not 0 < v["min_scale"] <= 1 <= v["max_scale"]:
            raise ValueError(
                "LevenbergMarquardt: need 0 < min_scale <= 1 <= max_scale (the rule "
                f"starts at 1), got [{self.min_scale}, {self.max_scale}]."
            )

    def init(self, dtype) -> TrustScale:
        return jnp.ones((), dtype)

    def scale(self, state: TrustScale) -> TrustScale:
        return state

    def update(
        self,
        state: TrustScale,
        step_size: Float[Array, ""],
        line_search: LineSearchStats,
        predicted_decrease: Float[Array, ""],
        true_decrease: Float[Array, ""] | None = None,
    ) -> TrustScale:
        dtype = state.dtype
        actual = line_search.loss_before - line_search.loss_at_unit_step
        if true_decrease is not None:
            # The prediction's own data: rho then measures the model, not the
            # difference between two batches' losses.
            actual = jnp.where(jnp.isfinite(true_decrease), true_decrease, actual)
        positive = predicted_decrease > 0
        rho = actual / jnp.where(positive, predicted_decrease, 1.0)
        unknown = jnp.isnan(rho) & positive
        bad = ~positive | (rho < self.low)
        bad = jnp.where(unknown, jnp.asarray(step_size) < self.low, bad)
        good = ~unknown & positive & (rho > self.high)
        factor = jnp.where(bad, 1 / self.factor, jnp.where(good, self.factor, 1.0))
        new = jnp.clip(state * factor.astype(dtype), self.min_scale, self.max_scale)
        return new.astype(dtype)
