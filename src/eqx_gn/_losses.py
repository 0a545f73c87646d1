r"""Losses on model outputs, with the output-space derivatives GN needs.

Every loss is a (weighted) mean over all *positions*: the leading axes of the
outputs (batch, and sequence for a language model). For outputs $z$ and per-position
weights $w_n$ (all ones by default),

$$L(z) = \frac{1}{W} \sum_n w_n\, \ell(z_n, y_n), \qquad W = \sum_n w_n.$$

Each loss gives its value, its gradient $\nabla_z L$ and its Hessian-vector product
$H u = \nabla_z^2 L\, u$ in output space. Inside ``shard_map``/``pmap``, pass the
mapped axis as ``axis_name``: $W$ becomes the global total, values are summed over
the axis, and gradients and products stay per shard (each shard's part of the
global mean), which is what the transpose of the model's linearization needs.
"""

import abc
import math
from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree, Scalar, Shaped

from ._custom_types import AxisName, typecheck
from ._sharding import error_if_any, has_explicit_axes, psum


class AbstractLoss(eqx.Module):
    """A loss on model outputs: a mean over every leading position.

    Subclasses give [`value`][eqx_gn.AbstractLoss.value],
    [`grad`][eqx_gn.AbstractLoss.grad], [`hvp`][eqx_gn.AbstractLoss.hvp] and
    [`curvature`][eqx_gn.AbstractLoss.curvature]; the concrete losses are final
    (abstract-or-final: no concrete method is ever overridden).
    """

    @abc.abstractmethod
    def value(
        self, outputs: PyTree[Array], targets: Any, *, axis_name: AxisName = None
    ) -> Scalar:
        """The loss $L(z)$ (summed over ``axis_name`` when given)."""

    @abc.abstractmethod
    def grad(
        self, outputs: PyTree[Array], targets: Any, *, axis_name: AxisName = None
    ) -> PyTree[Array]:
        r"""The gradient $\nabla_z L$, shaped like ``outputs``."""

    @abc.abstractmethod
    def hvp(
        self,
        outputs: PyTree[Array],
        targets: Any,
        tangent: PyTree[Array],
        *,
        axis_name: AxisName = None,
    ) -> PyTree[Array]:
        r"""The output-space Hessian-vector product $\nabla_z^2 L\, u$."""

    @abc.abstractmethod
    def curvature(
        self, outputs: PyTree[Array], targets: Any, *, axis_name: AxisName = None
    ) -> tuple[PyTree[Array], Callable[[PyTree[Array]], PyTree[Array]]]:
        r"""$\nabla_z L$ and the map $u \mapsto \nabla_z^2 L\, u$ at ``outputs``.

        What the GN quadratic model evaluates once per batch: a loss can share the
        work the two have in common (the softmax, the normaliser, input checks)
        across every product the map is applied to.
        """


def _check_weights(weights, positions: tuple[int, ...], what: str):
    weights = jnp.asarray(weights)
    if weights.shape != positions:
        raise ValueError(
            f"{what}: weights have shape {weights.shape} but the outputs' positions "
            f"have shape {positions}."
        )
    if not (jnp.issubdtype(weights.dtype, jnp.floating) or weights.dtype == bool):
        raise ValueError(
            f"{what}: weights must be floats or bools, got {weights.dtype}."
        )
    return weights


def _split_targets(targets, what: str):
    """``labels`` or ``(labels, weights)`` -> ``(labels, weights or None)``."""
    if isinstance(targets, tuple):
        if len(targets) != 2:
            raise ValueError(
                f"{what}: targets must be an array or a (targets, weights) pair, got "
                f"a tuple of length {len(targets)}."
            )
        return targets
    return targets, None


def _total_weight(weights, shape: tuple[int, ...], dtype, axis_name: AxisName):
    if weights is None:
        local = jnp.asarray(math.prod(shape), dtype)
    else:
        local = jnp.sum(weights.astype(dtype))
    return psum(local, axis_name)


def _scale(weights, total, dtype, positions: tuple[int, ...]):
    """Per-position factor w_n / W, shaped like the positions.

    Never a bare scalar: callers append feature axes to it, and a scalar would then
    broadcast against the outputs by rank promotion.
    """
    if weights is None:
        return jnp.broadcast_to((1.0 / total).astype(dtype), positions)
    return weights.astype(dtype) / total


@final
class SoftmaxCrossEntropy(AbstractLoss):
    r"""Mean softmax cross-entropy over integer class labels.

    Outputs are logits ``(*positions, classes)``; targets are integer labels
    ``(*positions)`` or a pair ``(labels, weights)`` whose weights (a float or bool
    mask, e.g. for padding) weigh each position. With $p = \mathrm{softmax}(z_n)$,

    $$\nabla_{z_n} L = \frac{w_n}{W}(p - e_{y_n}), \qquad
      (H u)_n = \frac{w_n}{W}\bigl(p \odot u_n - p\,(p \cdot u_n)\bigr),$$

    computed by that formula: no autodiff, no materialised Hessian.
    Labels outside ``[0, classes)`` on a position of nonzero weight raise an error
    (an ``eqx.error_if`` in the traced program). ``check_labels=False`` leaves that
    check out, for callers that check their labels once on the host: the check is a
    host callback, and JAX's persistent compilation cache does not store a program
    holding one. Unchecked, an out-of-range label reads a clipped class: a wrong
    loss, silently.
    """

    check_labels: bool = eqx.field(default=True, static=True)

    def _prepare(self, outputs, targets):
        if outputs.ndim < 1:
            raise ValueError("SoftmaxCrossEntropy: outputs must have a class axis.")
        what = "SoftmaxCrossEntropy"
        labels, weights = _split_targets(targets, what)
        labels = jnp.asarray(labels)
        one_hot = labels.shape == outputs.shape
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            hint = " (one-hot targets? pass jnp.argmax(targets, axis=-1))"
            raise ValueError(
                f"{what}: targets must be integer class labels, got {labels.dtype} "
                f"with shape {labels.shape}{hint if one_hot else ''}."
            )
        if one_hot:
            raise ValueError(
                f"{what}: the labels have the outputs' shape {labels.shape}: either "
                "fn's outputs lack the class axis (logits are (*positions, classes)) "
                "or the targets are one-hot (pass jnp.argmax(targets, axis=-1))."
            )
        if labels.shape != outputs.shape[:-1]:
            raise ValueError(
                f"{what}: labels have shape {labels.shape} but the logits' positions "
                f"have shape {outputs.shape[:-1]}."
            )
        if weights is not None:
            weights = _check_weights(weights, labels.shape, what)
        num_classes = outputs.shape[-1]
        bad = (labels < 0) | (labels >= num_classes)
        if weights is not None:
            bad = bad & (weights != 0)
        if not self.check_labels:
            return outputs, labels, weights
        # Guard the logits, not the labels: hvp never reads the labels, and under jit
        # a check on a value that nothing reads is dead code, removed silently.
        outputs = error_if_any(
            outputs, bad, f"SoftmaxCrossEntropy: a label is outside [0, {num_classes})."
        )
        return outputs, labels, weights

    @typecheck
    def value(
        self,
        outputs: Float[Array, "*positions classes"],
        targets: Shaped[Array, "..."] | tuple[Array, Array],
        *,
        axis_name: AxisName = None,
    ) -> Scalar:
        outputs, labels, weights = self._prepare(outputs, targets)
        logp = jax.nn.log_softmax(outputs, axis=-1)
        safe = jnp.clip(labels, 0, outputs.shape[-1] - 1)
        if has_explicit_axes(logp):
            # A gather along a sharded class axis has no unambiguous sharding on an
            # explicit mesh; selecting with a mask and summing is exact (one term).
            hit = jax.nn.one_hot(safe, outputs.shape[-1], dtype=jnp.bool_)
            nll = -jnp.sum(jnp.where(hit, logp, 0), axis=-1)
        else:
            nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        total = _total_weight(weights, labels.shape, outputs.dtype, axis_name)
        scale = _scale(weights, total, outputs.dtype, labels.shape)
        return psum(jnp.sum(nll * scale), axis_name)

    def _curvature(self, outputs, targets, axis_name):
        outputs, labels, weights = self._prepare(outputs, targets)
        p = jax.nn.softmax(outputs, axis=-1)
        total = _total_weight(weights, labels.shape, outputs.dtype, axis_name)
        scale = _scale(weights, total, outputs.dtype, labels.shape)[..., None]
        onehot = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)

        def hvp(u):
            pu = p * u
            return (pu - p * jnp.sum(pu, axis=-1, keepdims=True)) * scale

        return (p - onehot) * scale, hvp

    @typecheck
    def curvature(
        self,
        outputs: Float[Array, "*positions classes"],
        targets: Shaped[Array, "..."] | tuple[Array, Array],
        *,
        axis_name: AxisName = None,
    ) -> tuple[
        Float[Array, "*positions classes"],
        Callable[
            [Float[Array, "*positions classes"]], Float[Array, "*positions classes"]
        ],
    ]:
        return self._curvature(outputs, targets, axis_name)

    @typecheck
    def grad(
        self,
        outputs: Float[Array, "*positions classes"],
        targets: Shaped[Array, "..."] | tuple[Array, Array],
        *,
        axis_name: AxisName = None,
    ) -> Float[Array, "*positions classes"]:
        return self._curvature(outputs, targets, axis_name)[0]

    @typecheck
    def hvp(
        self,
        outputs: Float[Array, "*positions classes"],
        targets: Shaped[Array, "..."] | tuple[Array, Array],
        tangent: Float[Array, "*positions classes"],
        *,
        axis_name: AxisName = None,
    ) -> Float[Array, "*positions classes"]:
        return self._curvature(outputs, targets, axis_name)[1](tangent)


@final
class MeanSquaredError(AbstractLoss):
    r"""Half the squared error, averaged over positions.

    $$L(z) = \frac{1}{W}\sum_n w_n\,\tfrac12 \lVert z_n - y_n \rVert^2,$$

    where a position is an index into all but the last ``feature_ndim`` axes of the
    outputs (``feature_ndim=0`` for scalar outputs per position). Targets have the
    outputs' shape, or are a pair ``(targets, weights)``. The output-space Hessian is
    $H = \mathrm{diag}(w_n / W)$, so the GN matrix is $J^\top H J$.
    """

    feature_ndim: int = eqx.field(default=1, static=True)

    def __check_init__(self):
        if self.feature_ndim < 0:
            raise ValueError(f"feature_ndim must be >= 0, got {self.feature_ndim}.")

    def _prepare(self, outputs, targets):
        if outputs.ndim < self.feature_ndim:
            raise ValueError(
                f"MeanSquaredError: outputs of shape {outputs.shape} have fewer than "
                f"feature_ndim={self.feature_ndim} axes."
            )
        positions = outputs.shape[: outputs.ndim - self.feature_ndim]
        y, weights = _split_targets(targets, "MeanSquaredError")
        if weights is not None:
            weights = _check_weights(weights, positions, "MeanSquaredError")
        y = jnp.asarray(y, outputs.dtype)
        if y.shape != outputs.shape:
            raise ValueError(
                f"MeanSquaredError: targets have shape {y.shape} but outputs have "
                f"shape {outputs.shape}."
            )
        return y, weights, positions

    def _position_scale(self, outputs, weights, positions, axis_name):
        total = _total_weight(weights, positions, outputs.dtype, axis_name)
        scale = _scale(weights, total, outputs.dtype, positions)
        return jnp.reshape(scale, jnp.shape(scale) + (1,) * self.feature_ndim)

    @typecheck
    def value(
        self,
        outputs: Float[Array, "..."],
        targets: Float[Array | np.ndarray, "..."] | tuple[Array, Array],
        *,
        axis_name: AxisName = None,
    ) -> Scalar:
        y, weights, positions = self._prepare(outputs, targets)
        scale = self._position_scale(outputs, weights, positions, axis_name)
        return psum(0.5 * jnp.sum(scale * (outputs - y) ** 2), axis_name)

    @typecheck
    def grad(
        self,
        outputs: Float[Array, "..."],
        targets: Float[Array | np.ndarray, "..."] | tuple[Array, Array],
        *,
        axis_name: AxisName = None,
    ) -> Float[Array, "..."]:
        y, weights, positions = self._prepare(outputs, targets)
        return self._position_scale(outputs, weights, positions, axis_name) * (
            outputs - y
        )

    @typecheck
    def hvp(
        self,
        outputs: Float[Array, "..."],
        targets: Float[Array | np.ndarray, "..."] | tuple[Array, Array],
        tangent: Float[Array, "..."],
        *,
        axis_name: AxisName = None,
    ) -> Float[Array, "..."]:
        _, weights, positions = self._prepare(outputs, targets)
        if jnp.shape(tangent) != outputs.shape:
            raise ValueError(
                f"MeanSquaredError.hvp: tangent has shape {jnp.shape(tangent)} but the "
                f"outputs have shape {outputs.shape}."
            )
        return self._position_scale(outputs, weights, positions, axis_name) * tangent

    @typecheck
    def curvature(
        self,
        outputs: Float[Array, "..."],
        targets: Float[Array | np.ndarray, "..."] | tuple[Array, Array],
        *,
        axis_name: AxisName = None,
    ) -> tuple[
        Float[Array, "..."], Callable[[Float[Array, "..."]], Float[Array, "..."]]
    ]:
        r"""$\nabla_z L$ and $u \mapsto \nabla_z^2 L\, u$, sharing the normaliser."""
        y, weights, positions = self._prepare(outputs, targets)
        scale = self._position_scale(outputs, weights, positions, axis_name)
        return scale * (outputs - y), lambda u: scale * u


@final
class AutodiffLoss(AbstractLoss):
    r"""Any scalar loss ``fn(outputs, targets)``, differentiated by JAX.

    ``fn`` must be a mean over positions (so that data-parallel shards of equal size
    combine by a mean). The gradient is ``jax.grad`` and the Hessian-vector product
    is forward-over-reverse, $H u = \partial_\epsilon \nabla L(z + \epsilon u)$.
    Inside ``shard_map``/``pmap`` the shards must hold equally many positions.
    """

    fn: Callable[[Any, Any], Scalar]

    def _num_shards(self, axis_name):
        return 1 if axis_name is None else psum(1, axis_name)

    @typecheck
    def value(
        self, outputs: PyTree[Array], targets: Any, *, axis_name: AxisName = None
    ) -> Scalar:
        value = jnp.asarray(self.fn(outputs, targets))
        if value.shape != ():
            raise ValueError(
                f"AutodiffLoss: fn must return a scalar, got shape {value.shape}."
            )
        return psum(value, axis_name) / self._num_shards(axis_name)

    @typecheck
    def grad(
        self, outputs: PyTree[Array], targets: Any, *, axis_name: AxisName = None
    ) -> PyTree[Array]:
        g = jax.grad(self.fn)(outputs, targets)
        n = self._num_shards(axis_name)
        return jax.tree.map(lambda x: x / n, g)

    @typecheck
    def hvp(
        self,
        outputs: PyTree[Array],
        targets: Any,
        tangent: PyTree[Array],
        *,
        axis_name: AxisName = None,
    ) -> PyTree[Array]:
        z_shapes = jax.tree.map(jnp.shape, outputs)
        u_shapes = jax.tree.map(jnp.shape, tangent)
        if z_shapes != u_shapes:
            raise ValueError(
                f"AutodiffLoss.hvp: tangent has leaf shapes {u_shapes} but the outputs "
                f"have {z_shapes}."
            )
        grad_fn = jax.grad(self.fn)
        _, hu = jax.jvp(lambda z: grad_fn(z, targets), (outputs,), (tangent,))
        n = self._num_shards(axis_name)
        return jax.tree.map(lambda x: x / n, hu)

    @typecheck
    def curvature(
        self, outputs: PyTree[Array], targets: Any, *, axis_name: AxisName = None
    ) -> tuple[PyTree[Array], Callable[[PyTree[Array]], PyTree[Array]]]:
        r"""$\nabla_z L$ (``jax.grad``) and $u \mapsto \nabla_z^2 L\, u$
        (forward-over-reverse)."""
        grad = self.grad(outputs, targets, axis_name=axis_name)
        return grad, lambda u: self.hvp(outputs, targets, u, axis_name=axis_name)
