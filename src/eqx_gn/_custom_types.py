"""Type aliases shared across eqx_gn, and the one runtime type-check decorator."""

import functools
import inspect
import re
from collections.abc import Callable, Hashable
from typing import Any, TypeAlias

import equinox as eqx
import jax
import numpy as np
from beartype import beartype
from jaxtyping import (
    Array,
    ArrayLike,
    Bool,
    Float,
    PyTree,
    Real,
    Shaped,
    TypeCheckError,
    jaxtyped,
)


def _describe(value: Any) -> str:
    """A short description of ``value``: an array's dtype and shape, or a PyTree's
    first leaves with their paths (never the whole object)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    leaves = jax.tree_util.tree_leaves_with_path(value)
    if not leaves:
        return f"{type(value).__name__} with no leaves"

    def kind(leaf):
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            return f"{leaf.dtype}{list(leaf.shape)}"
        return type(leaf).__name__

    def where(path):
        return jax.tree_util.keystr(path) or "(root)"

    for path, leaf in leaves:  # the first leaf that is not a float array
        if not (hasattr(leaf, "dtype") and np.issubdtype(leaf.dtype, np.inexact)):
            return (
                f"{type(value).__name__} whose leaf {where(path)} is {kind(leaf)} "
                f"({len(leaves)} leaves)"
            )
    parts = [f"{where(path)}: {kind(leaf)}" for path, leaf in leaves[:3]]
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 3 else ""
    return f"{type(value).__name__} with leaves " + ", ".join(parts) + more


def _one_line(fn: Callable, args, kwargs, error: TypeCheckError) -> str:
    """The type-check failure of a call of ``fn`` in one line: the argument, what
    it must be, and what it was."""
    text = str(error)
    name = re.search(r"typechecking parameter '(\w+)'", text)
    expected = re.search(r"Expected type: (.*)", text)
    want = expected.group(1).strip() if expected else "its annotation"
    want = re.sub(r"<class '(.*)'>\.?$", r"\1", want).replace("jaxlib._jax.", "")
    want = want.replace("jax.Array", "Array")
    if len(want) > 160:
        want = want[:157] + "..."
    if name is None:
        what = "the return value" if "return" in text else "an argument"
        return f"{fn.__qualname__}: {what} does not match its annotation {want}."
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        got = _describe(bound.arguments[name.group(1)])
    except (TypeError, KeyError):
        got = "a value of another type"
    return f"{fn.__qualname__}: {name.group(1)} must be {want}; got {got}."


def typecheck(fn: Callable) -> Callable:
    """jaxtyping annotations checked by beartype at every call (shapes bound per
    call): the one decorator every public function and method of eqx_gn uses;
    under ``eqx.filter_jit`` put it inside the jit, so it checks tracers. A failed
    check is a one-line ``TypeError`` naming the argument, what it must be and
    what it was (its dtype and shape, or its first leaves), not the object."""
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except TypeCheckError as e:
            raise TypeError(_one_line(fn, args, kwargs, e)) from None

    return wrapper


#: An Equinox model: a Module or any PyTree whose inexact-array leaves are its
#: parameters.
Model: TypeAlias = eqx.Module | PyTree
#: The parameters of a model: ``eqx.filter(model, eqx.is_inexact_array)``.
Params: TypeAlias = PyTree[Float[Array, "..."]]
#: How a model is applied: ``fn(model, inputs) -> outputs``.
ApplyFn: TypeAlias = Callable[[Any, Any], Any]
#: One batch ``(inputs, targets)``.
Batch: TypeAlias = tuple[Any, Any]
#: A PyTree of arrays stacked along a leading axis of K micro-batches (the
#: leading ``_`` leaves K unchecked by jaxtyping: ``check_micro_batches`` checks
#: it with an error that names the leaf).
StackedLeaves: TypeAlias = PyTree[Shaped[Array | np.ndarray, "_micro_batches ..."]]
#: ``(inputs, targets)`` stacked along a leading axis of K micro-batches: every
#: leaf is shaped ``(K, B, ...)``. A PyTree here, not a ``tuple[...]``, so that a
#: bare array is met by a one-line ``ValueError`` asking for the pair.
MicroBatches: TypeAlias = StackedLeaves
#: The name of a mapped axis (``shard_map``/``pmap``), or a tuple of them.
AxisName: TypeAlias = Hashable | tuple[Hashable, ...] | None
#: An Equinox filter spec: a callable on leaves, or a bool PyTree prefix of the model.
FilterSpec: TypeAlias = Callable[[Any], bool] | PyTree[bool | Callable[[Any], bool]]
ScalarLike: TypeAlias = Float[ArrayLike, ""]
RealScalarLike: TypeAlias = Real[ArrayLike, ""]
BoolScalar: TypeAlias = Bool[Array, ""]

__all__ = [
    "ApplyFn",
    "AxisName",
    "Batch",
    "BoolScalar",
    "FilterSpec",
    "MicroBatches",
    "Model",
    "Params",
    "RealScalarLike",
    "ScalarLike",
    "StackedLeaves",
    "typecheck",
]
