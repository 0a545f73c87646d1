r"""Stacks of micro-batches: the one trace-time check, and the mean loss over them.

Everything that takes K micro-batches (the solvers, the line-search objective,
[`eqx_gn.mean_loss`][]) takes them stacked: ``(inputs, targets)`` whose every leaf
is shaped ``(K, B, ...)``. ``check_micro_batches`` checks that once, before
anything is traced, and turns the failures that would otherwise surface deep inside
JAX (a batch without the micro-batch axis, targets that do not fit the outputs) into
one-line ``ValueError``\ s that name the leaf and its shape.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._custom_types import ApplyFn, AxisName, MicroBatches, Model, typecheck
from ._losses import AbstractLoss
from ._misc import describe_leaves, first_line

_LAYOUT = "leaves shaped (K, B, ...)"


def _shapes(tree) -> str:
    return str(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)
    )


def check_micro_batches(
    fn: ApplyFn,
    loss: AbstractLoss | None,
    model: Model,
    batches,
    what: str,
) -> int:
    """The number K of micro-batches in ``batches``, after checking them.

    Checks, before any tracing: ``batches`` is a pair ``(inputs, targets)``; every
    leaf has a leading axis and all agree on its size K >= 1; and, by
    ``eqx.filter_eval_shape`` (no computation), that ``fn(model, inputs)`` and
    ``loss.value(outputs, targets)`` trace on micro-batch 0. Each failure is a
    one-line ``ValueError`` naming ``what``, the leaf and its shape.
    """
    if not (isinstance(batches, tuple) and len(batches) == 2):
        got = (
            f"a tuple of length {len(batches)}"
            if isinstance(batches, tuple)
            else f"{type(batches).__name__} of shape {jnp.shape(batches)}"
            if hasattr(batches, "shape")
            else type(batches).__name__
        )
        raise ValueError(
            f"{what} must be a pair (inputs, targets) with {_LAYOUT} (K "
            f"micro-batches), got {got}."
        )
    leaves = jax.tree_util.tree_flatten_with_path(batches)[0]
    if not leaves:
        raise ValueError(f"{what} has no arrays.")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) < 1:
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs "
                f"a leading axis of K micro-batches ({_LAYOUT})."
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

    def first(tree):
        return jax.tree.map(lambda x: x[0], tree)

    inputs, targets = batches
    try:
        outputs = eqx.filter_eval_shape(lambda m, xs: fn(m, first(xs)), model, inputs)
    except Exception as e:
        raise ValueError(
            f"{what}: fn(model, inputs) failed on one micro-batch "
            f"({describe_leaves(first(inputs), 'inputs')}) with {first_line(e)}; {what} "
            f"need a leading axis of K micro-batches, {_LAYOUT}."
        ) from e
    if loss is not None:
        try:
            eqx.filter_eval_shape(
                lambda z, ys: loss.value(z, first(ys)), outputs, targets
            )
        except Exception as e:
            raise ValueError(
                f"{what}: the loss does not fit one micro-batch: outputs "
                f"{_shapes(outputs)}, targets {_shapes(first(targets))} "
                f"({first_line(e)}); {what} need {_LAYOUT}."
            ) from e
    return k


def mean_loss_unchecked(fn, loss, model, batches, axis_name):
    """``mean_loss`` without the check (for callers that checked already)."""

    def one(batch):
        inputs, targets = batch
        return loss.value(fn(model, inputs), targets, axis_name=axis_name)

    return jnp.mean(jax.lax.map(one, batches))


@typecheck
def mean_loss(
    fn: ApplyFn,
    loss: AbstractLoss,
    model: Model,
    batches: MicroBatches,
    *,
    axis_name: AxisName = None,
) -> Float[Array, ""]:
    r"""The mean loss over K stacked micro-batches,
    $\frac1K \sum_k L\bigl(f(\theta, x_k), y_k\bigr)$.

    **Arguments:**

    - ``fn``: applies the model, ``fn(model, inputs) -> outputs``.
    - ``loss``: an [`eqx_gn.AbstractLoss`][].
    - ``model``: the Equinox model.
    - ``batches``: ``(inputs, targets)`` with every leaf shaped ``(K, B, ...)``;
      micro-batch ``k`` is ``(inputs[k], targets[k])``.
    - ``axis_name``: the mapped batch axis inside ``shard_map``/``pmap``.

    The micro-batches are evaluated one after another (``lax.map``), so memory is
    that of one micro-batch. Raises a one-line ``ValueError`` when ``batches`` lack
    the leading micro-batch axis.

    ```python
    x, y = inputs.reshape(4, -1, d), labels.reshape(4, -1)  # K = 4
    value = eqx_gn.mean_loss(apply, eqx_gn.SoftmaxCrossEntropy(), model, (x, y))
    ```
    """
    check_micro_batches(fn, loss, model, batches, "batches")
    return mean_loss_unchecked(fn, loss, model, batches, axis_name)
