"""Errors that reach the user as one line naming the culprit (file, tensor path, flag)."""


class RuntimeInputError(ValueError):
    """Bad user input: a config, checkpoint file, flag or request. The message is complete."""


class ConfigError(RuntimeInputError):
    """A config file or preset is unknown, has unknown keys or impossible values."""


class CheckpointError(RuntimeInputError):
    """A checkpoint file is missing, truncated, foreign or does not match the model."""


class ShardingError(RuntimeInputError):
    """A parameter matches no partition rule or several, or a mesh does not fit."""


class RequestError(RuntimeInputError):
    """A generation request cannot be served (prompt too long, bad sampling settings)."""
