"""Collectives for code running inside ``jax.shard_map`` or ``jax.pmap``.

A GN product is a mean over positions, so data-parallel shards combine by a sum
of per-shard partial sums divided by the global number of positions. Only the
axis name is needed; nothing else about the mesh leaks into the maths.

Inside ``shard_map`` (with ``check_vma``), the transpose of a computation on a
replicated (device-invariant) value already sums over the axis; inside ``pmap`` it
does not. To sum exactly once in every case, parameters and tangents are first
marked device-varying, the per-shard contributions are computed, and one explicit
``psum`` combines them.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._custom_types import AxisName


def _axis_tuple(axis_name: AxisName) -> tuple:
    if axis_name is None:
        return ()
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        manual = getattr(aval, "manual_axis_type", None)
        vma = getattr(manual, "varying", frozenset())
    return frozenset(vma)


def has_explicit_axes(x) -> bool:
    """Whether ``x`` is typed on a mesh with ``AxisType.Explicit`` axes: under
    ``jax.set_mesh`` with an explicit mesh (``jax.make_mesh``'s default), or an
    array placed on one. Such values carry their sharding in their type, and
    contractions or gathers over their sharded axes must be unambiguous."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    types = getattr(mesh, "axis_types", None) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def as_varying(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Mark every array leaf of ``tree`` as varying over ``axis_name``."""
    axes = _axis_tuple(axis_name)
    if not axes:
        return tree

    def cast(x):
        if not isinstance(x, jax.Array):
            return x
        missing = tuple(a for a in axes if a not in _varying_axes(x))
        if not missing:
            return x
        return jax.lax.pcast(x, missing, to="varying")

    return jax.tree.map(cast, tree)


def error_if_any(x: jax.Array, bad: jax.Array, msg: str) -> jax.Array:
    """``eqx.error_if(x, jnp.any(bad), msg)``, usable inside ``shard_map`` too.

    ``eqx.error_if`` fails to trace on device-varying values under ``shard_map``
    (its ``lax.cond`` branches disagree on the varying axes). So when ``bad`` varies
    over mapped axes, it is reduced over them first (every shard then raises if any
    shard has a bad entry), and the check runs on a device-invariant zero that is
    added back to ``x`` to keep it alive.
    """
    pred = jnp.any(bad)
    axes = tuple(sorted(_varying_axes(pred), key=str))
    if axes:
        pred = jax.lax.pmax(pred.astype(jnp.int32), axes) > 0
    # The check runs on a scalar: routing ``x`` itself through the check's
    # conditional would pin it to one device under jit with sharded inputs.
    return x + eqx.error_if(jnp.zeros((), x.dtype), pred, msg)


def psum(tree: PyTree, axis_name: AxisName) -> PyTree:
    """``jax.lax.psum`` over ``axis_name``; the identity when it is ``None``."""
    axes = _axis_tuple(axis_name)
    if not axes:
        return tree
    return jax.lax.psum(tree, axes)


def data_mesh(num_devices: int | None = None, axis: str = "data") -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"num_devices={n} but only {len(devices)} "
            f"{'device is' if len(devices) == 1 else 'devices are'} visible "
            f"({jax.default_backend()} backend)."
        )
    return Mesh(np.asarray(devices[:n]), (axis,))


def shard_batch(
    batch: PyTree, mesh: Mesh, axis: str = "data", *, batch_axis: int = 0
) -> PyTree:
    """Put every array leaf of ``batch`` on ``mesh``, split along ``batch_axis``.

    Use ``batch_axis=1`` for micro-batches stacked along a leading axis, as
    [`eqx_gn.GaussNewton.step`][] takes them.
    """
    size = mesh.shape[axis]

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim <= batch_axis or x.shape[batch_axis] % size:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {x.shape}: its "
                f"axis {batch_axis} must be divisible by the {size} devices of mesh "
                f"axis {axis!r}."
            )
        spec = [None] * x.ndim
        spec[batch_axis] = axis
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Put every array leaf of ``tree`` on every device of ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array) else x, tree
    )
