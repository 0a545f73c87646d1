"""Type aliases shared across eqx_gn, and the one runtime type-check decorator."""

from collections.abc import Callable, Hashable
from typing import Any, TypeAlias

import equinox as eqx
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
    jaxtyped,
)

#: ``@typecheck``: jaxtyping annotations checked by beartype at every call (shapes
#: bound per call). The one decorator every public function and method of eqx_gn
#: uses; under ``eqx.filter_jit`` put it inside the jit, so it checks tracers.
typecheck = jaxtyped(typechecker=beartype)

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
