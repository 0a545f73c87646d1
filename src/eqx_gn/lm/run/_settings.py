"""How a setting is declared: its default, description, flag and checks, in the
field's metadata, and how a value is checked against its own declaration.

`TrainConfig` and `GNConfig` declare their settings with `declare`; GN's are
declared once, in `GNConfig`, and `TrainConfig`'s Gauss-Newton group is made
from them.
"""

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from .._errors import ConfigError, setting
from ._checks import check_integer, check_range

#: A field defines the run: a resumed run must keep it.
DEFINES = "defines"
#: A field says how the run is carried out: a resumed run may change it.
EXECUTION = "execution"

Check = Callable[[str, Any], None]


def declare(
    default: Any,
    help: str,
    *,
    role: str = DEFINES,
    metavar: str | None = None,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: int = 1,
    check: Check | None = None,
    hidden: bool = False,
    solver: str | None = None,
) -> Any:
    """A setting: its default and description, and how it is checked: an
    ``int`` is at least ``minimum``, a ``Literal`` one of its values (or of
    ``choices``), and ``check(name, value)`` runs on any value but ``None``.
    ``solver`` names the one GN solver a GN setting applies to (``"cg"``)."""
    metadata = {
        "help": help,
        "role": role,
        "metavar": metavar,
        "flag": flag,
        "choices": choices,
        "minimum": minimum,
        "check": check,
        "hidden": hidden,
        "solver": solver,
    }
    return dataclasses.field(default=default, metadata=metadata)


def is_declared(field: dataclasses.Field) -> bool:
    """Whether a dataclass field is a setting made by `declare`."""
    return "help" in field.metadata


def in_range(low: float, high: float, closed: str) -> Check:
    """The check of a value between ``low`` and ``high`` (see `check_range`)."""
    return lambda name, value: check_range(name, value, low, high, closed)


def value_type(field: dataclasses.Field) -> type:
    """The type of a setting's values other than ``None``: ``str`` for a choice."""
    annotation = field.type
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation):
        if typing.get_origin(annotation) is Literal:
            return str
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if typing.get_origin(annotation) is Literal:
            return str
    return annotation


def choices_of(field: dataclasses.Field) -> tuple[str, ...] | None:
    """A setting's allowed values: its ``choices``, or its ``Literal``'s values;
    ``None`` for a free value."""
    if field.metadata["choices"] is not None:
        return field.metadata["choices"]
    annotation = field.type
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is Literal:
            return typing.get_args(candidate)
    return None


def _allows_none(field: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(field.type)


def check_value(field: dataclasses.Field, value: Any, hint: str = "") -> None:
    """A setting's value against its own declaration: its type's choices (``hint``
    added to the error) or lower bound, then its ``check``."""
    if value is None and _allows_none(field):
        return
    choices = choices_of(field)
    if choices is not None:
        if value not in choices:
            raise ConfigError(
                f"unknown {setting(field.name)} {value!r}; choose one of "
                f"{', '.join(choices)}{hint}"
            )
    elif value_type(field) is int:
        check_integer(field.name, value, field.metadata["minimum"])
    if field.metadata["check"] is not None:
        field.metadata["check"](field.name, value)
