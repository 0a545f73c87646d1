"""The error of everything a user can fix before a run starts."""


class Diverged(RuntimeError):
    """A run stopped because its training loss or parameters became non-finite.
    The message is one line: the step, the last good checkpoint, what to try."""


class ConfigError(ValueError):
    """A bad configuration, or input data that cannot be used, found before any
    training step runs. The message is one line that says what to change."""
