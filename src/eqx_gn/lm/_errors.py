"""The error of everything a user can fix before a run starts, and how an error
names a setting (`setting`: by its name from Python, by its flag under the command
line)."""

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any


class Diverged(RuntimeError):
    """A run stopped because its training loss or parameters became non-finite.
    The message is one line: the step, the last good checkpoint, what to try."""


class ConfigError(ValueError):
    """A bad configuration, or input data that cannot be used, found before any
    training step runs. The message is one line that says what to change."""


_FLAGS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "eqx_gn_flag_names", default=None
)
_NO_VALUE = object()


def setting(name: str, value: Any = _NO_VALUE) -> str:
    """A setting as an error names it, the way the user set it: ``batch_size``
    (with a value, ``batch_size=10``) from Python, ``--batch-size``
    (``--batch-size 10``) inside `flag_names`, as under the command line."""
    flags = _FLAGS.get()
    if flags is None:
        return name if value is _NO_VALUE else f"{name}={value!r}"
    flag = flags.get(name, "--" + name.replace("_", "-"))
    if value is _NO_VALUE:
        return flag
    return flag if isinstance(value, bool) else f"{flag} {value}"


@contextlib.contextmanager
def flag_names(flags: Mapping[str, str] | None = None) -> Iterator[None]:
    """Errors raised inside name settings by their command-line flags
    (`setting`): ``--name-with-dashes``, or ``flags[name]`` where a flag is
    spelled otherwise."""
    token = _FLAGS.set(dict(flags or {}))
    try:
        yield
    finally:
        _FLAGS.reset(token)
