"""One-line checks of a setting's value, each raising `ConfigError` with the
setting's name, what it must be and what it got."""

import math
from typing import Any

from .._errors import ConfigError, setting


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"unknown {setting(name)} {value!r}; choose one of {', '.join(choices)}"
        )


def check_integer(name: str, value: Any, low: int = 1) -> None:
    """``value`` is an integer (not a bool) of at least ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{setting(name)} must be an integer >= {low}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """``value`` is a finite number > 0."""
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{setting(name)} must be > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """``value`` is a finite number >= 0."""
    if not _is_number(value) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{setting(name)} must be >= 0, got {value!r}")


def check_range(name: str, value: Any, low: float, high: float, closed: str) -> None:
    """``value`` lies between ``low`` and ``high``; ``closed`` says which ends
    belong to the range: ``"[)"``, ``"()"``, ``"[]"``."""
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (low <= value if closed[0] == "[" else low < value) and (
            value <= high if closed[1] == "]" else value < high
        )
    if not ok:
        raise ConfigError(
            f"{setting(name)} must be in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
