"""Type aliases shared across eqx_gn."""

from collections.abc import Callable, Hashable
from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

#: An Equinox model (any PyTree whose inexact-array leaves are its parameters).
Model: TypeAlias = Any
#: The parameters of a model: ``eqx.filter(model, eqx.is_inexact_array)``.
Params: TypeAlias = PyTree[Float[Array, "..."]]
#: How a model is applied: ``fn(model, inputs) -> outputs``.
ApplyFn: TypeAlias = Callable[[Any, Any], Any]
#: A batch ``(inputs, targets)``.
Batch: TypeAlias = tuple[Any, Any]
#: The name of a mapped axis (``shard_map``/``pmap``), or a tuple of them.
AxisName: TypeAlias = Hashable | tuple[Hashable, ...] | None
#: An Equinox filter spec: a callable on leaves, or a bool PyTree prefix of the model.
FilterSpec: TypeAlias = Callable[[Any], bool] | PyTree[bool | Callable[[Any], bool]]
ScalarLike: TypeAlias = Float[ArrayLike, ""]
BoolScalar: TypeAlias = Bool[Array, ""]

__all__ = [
    "ApplyFn",
    "AxisName",
    "Batch",
    "BoolScalar",
    "FilterSpec",
    "Model",
    "Params",
    "ScalarLike",
]
