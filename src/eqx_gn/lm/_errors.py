"""The error of everything a user can fix before a run starts."""


class ConfigError(ValueError):
    """A bad configuration, or input data that cannot be used, found before any
    training step runs. The message is one line that says what to change."""
