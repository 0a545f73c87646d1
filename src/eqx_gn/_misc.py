"""Small PyTree helpers (``None`` leaves, as in filtered Equinox models, are skipped)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._sharding import has_explicit_axes


def is_none(x) -> bool:
    """``is_leaf`` for flattening a filtered model with its ``None`` holes kept."""
    return x is None


def vdot(x, y) -> Array:
    """``jnp.vdot(x, y)``; on explicitly sharded arrays, ``sum(conj(x) * y)``.

    ``jnp.vdot`` flattens both operands and contracts them with a dot: on an
    explicit mesh the flattening of a sharded minor axis is an unsupported reshape,
    and a contraction over a sharded axis is ambiguous (``ShardingTypeError``). An
    elementwise product followed by a full reduction is neither: the reduction's
    result is replicated. Elsewhere ``jnp.vdot`` is kept, bit for bit.
    """
    if has_explicit_axes(x) or has_explicit_axes(y):
        return jnp.sum(jnp.conj(x) * y)
    return jnp.vdot(x, y)


def tree_vdot(a, b) -> Array:
    """The inner product of two PyTrees of the same structure."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    terms = [vdot(x, y) for x, y in pairs]
    if not terms:
        return jnp.zeros(())
    return sum(terms[1:], start=terms[0])


def tree_axpy(alpha, x, y):
    """``alpha * x + y`` leaf by leaf, in the dtype of each leaf of ``y``."""
    return jax.tree.map(lambda u, v: (alpha * u).astype(v.dtype) + v, x, y)


def tree_scale(alpha, x):
    """``alpha * x`` leaf by leaf, in the dtype of each leaf of ``x``."""
    return jax.tree.map(lambda u: (alpha * u).astype(u.dtype), x)


def tree_zeros_like(x):
    return jax.tree.map(jnp.zeros_like, x)


def tree_all_finite(x) -> Array:
    """``True`` when every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def tree_where(pred, on_true, on_false):
    """Select whole PyTrees by a scalar predicate."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def check_number(owner: str, name: str, value, ok, what: str) -> None:
    """``ValueError`` naming ``owner.name`` unless ``ok(float(value))``; a traced
    ``value`` (a hyperparameter swept under ``jit``) is not checked.

    Hyperparameters that are numbers are ordinary Module fields, not static ones:
    a Python number is a constant of the trace, and a scalar array is traced, so a
    sweep over it compiles once (and can be vmapped)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, bool) or jnp.ndim(value) != 0:
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}.")
    if not ok(float(value)):
        raise ValueError(f"{owner}: {name} must be {what}, got {value}.")


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``, for one-line re-raised errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def describe_leaves(tree, name: str, limit: int = 3) -> str:
    """``name[path] of shape (...)`` for the first few leaves of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    parts = [
        f"{name}{jax.tree_util.keystr(path)} of shape {tuple(jnp.shape(x))}"
        for path, x in leaves[:limit]
    ]
    more = len(leaves) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")
