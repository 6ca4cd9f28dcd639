"""Errors that reach the user. Each message says which file, which key or size, and what to do."""


class EchoGenError(Exception):
    """Base class for every error this package raises on purpose."""


class CheckpointError(EchoGenError, ValueError):
    """A weights file cannot be read, or does not match the model it is loaded into."""


class InputError(EchoGenError, ValueError):
    """A user-supplied value (size, prompt, image, option) is out of range or malformed."""


class MissingDependencyError(EchoGenError, ImportError):
    """An optional package needed for this feature is not installed."""
