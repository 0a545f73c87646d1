r"""Gauss-Newton as an optax transformation, for the standard Equinox training loop.

```python
tx = eqx_gn.as_optax(gn, model)
params = eqx.filter(model, eqx.is_inexact_array)
state = tx.init(params)
updates, state = tx.update(
    None, state, params, batches=batches, line_search_batches=ls_batches
)
model = eqx.apply_updates(model, updates)
```

One ``update`` is one [`GaussNewton.step`][eqx_gn.GaussNewton.step]: GN computes its
own direction from ``batches`` (the incoming gradients are not used and may be
``None``) and its step size from ``line_search_batches``, and the update is
$s\,d$, so that ``eqx.apply_updates`` gives the model ``step`` gives. The extra
arguments are keyword arguments of ``update``, as optax's own line searches take
theirs (`optax.GradientTransformationExtraArgs`); ``optax.chain`` passes them on.
"""

from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._custom_types import MicroBatches, Model, typecheck
from ._gauss_newton import GaussNewton, GNState, GNStats


@final
class GNOptaxState(eqx.Module):
    """The state of [`eqx_gn.as_optax`][]: GN's own state, and the statistics of
    the last step (zeros before the first) for logging."""

    gn: GNState
    stats: GNStats


def _is_none(x) -> bool:
    return x is None


def _no_stats(dtype) -> GNStats:
    zero = jnp.zeros((), dtype)
    count = jnp.zeros((), jnp.int32)
    no = jnp.zeros((), bool)
    return GNStats(
        loss_before=zero,
        loss_after=zero,
        step_size=zero,
        model_start=zero,
        model_end=zero,
        predicted_decrease=zero,
        actual_decrease=zero,
        true_decrease=zero,
        damping=zero,
        solver_iterations=count,
        line_search_evaluations=count,
        rejected=no,
        nonfinite=no,
        trust_scale=jnp.ones((), dtype),
    )


class _Bound(eqx.Module):
    """GN bound to the loop's parameters: the model GN steps, rebuilt from
    ``params``, and a GN whose ``fn`` puts back the leaves ``params`` leaves out."""

    gn: GaussNewton
    model: Model

    def split(self, params) -> tuple[GaussNewton, Model]:
        leaves = jax.tree.leaves(self.model)
        if not jax.tree.leaves(params) and leaves:
            raise ValueError(
                "as_optax: params holds no arrays; pass "
                "eqx.filter(model, eqx.is_inexact_array)"
            )
        try:
            # Every leaf of the model that params leaves out (None there).
            rest = jax.tree.map(
                lambda p, m: m if p is None else None,
                params,
                self.model,
                is_leaf=_is_none,
            )
        except ValueError as e:
            raise ValueError(
                "as_optax: params does not have the structure of the model given to "
                f"as_optax (pass eqx.filter(model, ...) of that model): {e}"
            ) from None
        frozen = [x for x in jax.tree.leaves(rest) if eqx.is_inexact_array(x)]
        if not frozen:  # every float leaf trains: GN steps the model as it is
            return self.gn, eqx.combine(params, rest)
        # Frozen float leaves: GN's parameters are params alone, and its fn sees
        # the frozen leaves as constants.
        fn = self.gn.fn

        def frozen_fn(trainable, inputs):
            return fn(eqx.combine(trainable, rest), inputs)

        return eqx.tree_at(lambda g: g.fn, self.gn, frozen_fn), params


@typecheck
def as_optax(gn: GaussNewton, model: Model) -> optax.GradientTransformationExtraArgs:
    r"""``gn`` as an optax transformation for ``model``'s parameters.

    ``init(params)`` and ``update(grads, state, params, *, batches,
    line_search_batches)``, where ``params`` is ``eqx.filter(model, filter)`` of
    the model given here: the float leaves it holds are GN's parameters; every
    other leaf of ``model`` (integer and static leaves, and float leaves the filter
    leaves out, which stay frozen at their values in ``model``) is taken from
    ``model``. ``grads`` is ignored (GN computes its own direction) and may be
    ``None``; ``batches`` and ``line_search_batches`` are
    [`GaussNewton.step`][eqx_gn.GaussNewton.step]'s. The update is $s\,d$ (zero for
    a rejected step), so ``eqx.apply_updates(model, updates)`` is ``step``'s new
    model, and ``state.stats`` its [`eqx_gn.GNStats`][]. Composes in
    ``optax.chain``, which passes the extra arguments on.
    """
    bound = _Bound(gn, model)

    def init(params) -> GNOptaxState:
        g, m = bound.split(params)
        leaves = jax.tree.leaves(eqx.filter(params, eqx.is_inexact_array))
        return GNOptaxState(g.init(m), _no_stats(jnp.result_type(*leaves, jnp.float32)))

    def update(
        updates,
        state: GNOptaxState,
        params=None,
        *,
        batches: MicroBatches | None = None,
        line_search_batches: MicroBatches | None = None,
        **extra_args,
    ):
        del updates, extra_args  # GN computes its own direction
        if params is None:
            raise ValueError("as_optax: update needs params (the third argument)")
        if batches is None or line_search_batches is None:
            missing = "batches" if batches is None else "line_search_batches"
            raise ValueError(
                f"as_optax: update needs {missing}= (K stacked micro-batches, as "
                "GaussNewton.step takes them)"
            )
        g, m = bound.split(params)
        _, gn_state, stats, direction = g._step_with_direction(
            m, state.gn, batches, line_search_batches
        )
        s = stats.step_size  # 0 when rejected or non-finite
        trained = eqx.filter(params, eqx.is_inexact_array)
        new_updates = jax.tree.map(
            lambda p, d: jnp.where(s > 0, (s * d).astype(p.dtype), jnp.zeros_like(p)),
            trained,
            direction,
        )
        # The state's dtypes stay those of init, for loops that carry it (scan).
        stats = jax.tree.map(lambda new, old: new.astype(old.dtype), stats, state.stats)
        return new_updates, GNOptaxState(gn_state, stats)

    return optax.GradientTransformationExtraArgs(init, update)
