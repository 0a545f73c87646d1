"""The jitted functions of a run, and the process-wide cache of their compiled forms.

Every function returns its outputs constrained to the run's `StateLayout` (the
sharding of every array of the training state on the mesh), so a compiled step
takes its own outputs back. A compiled function is shared
by every run of the process (a comparison, a resumed run, tests) whose *key* is
equal: the function, its recipe (`eqx_gn.lm.run._recipes`: exactly the settings the
optimizer is built from), the model's configuration, and the shapes, dtypes and
shardings of every array it is called with.
"""

import collections
import time
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ... import GaussNewton, GNStats, eigenpairs, mean_loss, trace_estimate
from ..data._pipeline import inputs_and_targets
from ._phase_optimizers import LM_LOSS
from ._recipes import with_learning_rate


def _next_key(key_data):
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key_data))[0])


@eqx.filter_jit
def first_order_step(apply, optimizer, lr, model, opt_state, key_data, batch, layout):
    """One optax step at learning rate ``lr`` (the optimizer is built at unit
    peak) on ``batch``: ``(batch_size, seq_len + 1)``, or ``(A, batch_size / A,
    seq_len + 1)`` micro-batches whose gradients are averaged (gradient
    accumulation: the same mean loss and gradient, in ``A`` smaller passes).
    ``apply`` is the model's ``fn(model, inputs)`` (`eqx_gn.lm.apply_fn`)."""

    def loss_fn(model, batch):
        inputs, targets = inputs_and_targets(batch)
        return LM_LOSS.value(apply(model, inputs), targets)

    value_and_grad = eqx.filter_value_and_grad(loss_fn)
    if batch.ndim == 2:
        loss, grads = value_and_grad(model, batch)
    else:

        def accumulate(carry, micro_batch):
            loss, grads = value_and_grad(model, micro_batch)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        first = value_and_grad(model, batch[0])
        (loss, grads), _ = jax.lax.scan(accumulate, first, batch[1:])
        loss, grads = jax.tree.map(lambda x: x / batch.shape[0], (loss, grads))
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    model = eqx.apply_updates(model, updates)
    out = (model, opt_state, _next_key(key_data), {"train_loss": loss})
    return layout.constrain(out)


#: The GN statistics in each GN step's metrics record, in this order.
GN_METRICS = (
    "step_size",
    "loss_before",
    "loss_after",
    "predicted_decrease",
    "actual_decrease",
    "true_decrease",
    "model_start",
    "model_end",
    "damping",
    "rejected",
    "nonfinite",
    "line_search_evaluations",
    "trust_scale",
)


@eqx.filter_jit
def gn_step(gn, lr, model, gn_state, key_data, batches, ls_batches, layout):
    """One GN step on stacked micro-batches and line-search batches, at inner
    learning rate ``lr``."""
    gn = with_learning_rate(gn, lr)
    model, gn_state, stats = gn.step(
        model, gn_state, inputs_and_targets(batches), inputs_and_targets(ls_batches)
    )
    metrics = {"train_loss": stats.loss_before}
    metrics |= {name: getattr(stats, name) for name in GN_METRICS}
    out = (model, gn_state, _next_key(key_data), metrics)
    return layout.constrain(out)


@eqx.filter_jit
def init_opt_state(optimizer, model, layout):
    """The optimizer's state before its first step."""
    if isinstance(optimizer, GaussNewton):
        state = optimizer.init(model)
    else:
        state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    return layout.constrain(state)


@eqx.filter_jit
def eval_loss(apply, model, batches, layout):
    """The mean loss over stacked validation batches."""
    loss = mean_loss(apply, LM_LOSS, model, inputs_and_targets(batches))
    return layout.constrain(loss)


#: What ``curvature_every`` records: Lanczos steps, eigenvalues and Hutchinson probes.
CURVATURE_ITERATIONS, CURVATURE_TOP, CURVATURE_PROBES = 20, 3, 8


@eqx.filter_jit
def curvature_record(apply, model, batches, layout, blocks=None):
    """The top eigenvalues and the trace (with its standard error) of the full GN
    matrix of the mean loss on the first of the stacked validation batches, with
    fixed keys (so that a resumed run records the same numbers).

    With ``blocks`` (a layerwise GN run's partition) the trace is estimated on the
    block-diagonal matrix: the same trace (the diagonal is the same), split into the
    blocks' traces, in the order of ``blocks.names``; the eigenvalues stay those of
    the full matrix."""
    batch = inputs_and_targets(batches[0])
    key_lanczos, key_trace = jax.random.split(jax.random.key(0))
    pairs = eigenpairs(
        apply,
        model,
        batch,
        loss=LM_LOSS,
        key=key_lanczos,
        num_iterations=CURVATURE_ITERATIONS,
        num_eigenvalues=CURVATURE_TOP,
    )
    trace = trace_estimate(
        apply,
        model,
        batch,
        loss=LM_LOSS,
        key=key_trace,
        num_probes=CURVATURE_PROBES,
        blocks=blocks,
    )
    record = {
        "curvature_top": pairs.eigenvalues,
        "curvature_trace": trace.trace,
        "curvature_trace_stderr": trace.trace_stderr,
    }
    if blocks is not None:
        record["curvature_block_traces"] = trace.block_traces
        record["curvature_block_trace_stderrs"] = trace.block_trace_stderrs
    return jax.lax.with_sharding_constraint(record, layout.replicated)


assert set(GN_METRICS) <= {f.name for f in GNStats.__dataclass_fields__.values()}


def _signature(args) -> tuple:
    arrays = jax.tree.leaves(eqx.filter(args, eqx.is_array))
    return tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in arrays)


class CompileCache:
    """Compiled functions by key, least recently used dropped beyond ``maxsize``."""

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._compiled: collections.OrderedDict = collections.OrderedDict()

    def get(self, fn: Callable, key: Hashable, args: tuple) -> tuple[Callable, float]:
        """``fn`` compiled for ``args`` (and the seconds spent compiling it now).

        ``key`` must determine everything ``fn`` computes that the shapes, dtypes
        and shardings of the arrays in ``args`` do not: the recipe and the model's
        configuration.
        """
        full = (fn, key, _signature(args), jax.config.jax_enable_x64)
        if full in self._compiled:
            self._compiled.move_to_end(full)
            return self._compiled[full], 0.0
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        if len(self._compiled) >= self.maxsize:
            self._compiled.popitem(last=False)
        self._compiled[full] = compiled
        return compiled, time.perf_counter() - start


#: The cache shared by the runs of this process.
COMPILED = CompileCache()


def json_ready(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as Python bools, ints and floats."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.dtype == bool:
            out[name] = bool(value)
        elif np.issubdtype(value.dtype, np.integer):
            out[name] = int(value)
        else:
            out[name] = float(value)
    return out
