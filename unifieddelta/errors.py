"""Exceptions for bad input. Each names what is wrong; the CLI prints it as one line and exits non-zero."""


class UnifiedDeltaError(Exception):
    """Base class: an input the user can fix (a path, a parameter, a checkpoint, a profile)."""


class InvalidParameterError(UnifiedDeltaError, ValueError):
    """A parameter outside its range (p not in [0, 1), rank > min(m, n), points < 1, ...)."""


class CheckpointError(UnifiedDeltaError):
    """A path that does not exist, a folder that is not a checkpoint, a corrupt or truncated file."""


class MismatchError(UnifiedDeltaError):
    """Two checkpoints (or a model and a direction) that do not fit together: architecture, names, shapes."""


class NonFiniteError(UnifiedDeltaError):
    """NaN or Inf where a finite number is needed (a delta, a loss)."""


class OutputExistsError(UnifiedDeltaError):
    """The output path exists and overwriting was not asked for."""


class ProfileError(UnifiedDeltaError):
    """An unknown book profile, a notebook it does not list, a parameter a notebook does not declare."""


class NotebookError(UnifiedDeltaError):
    """A notebook cell raised while the book pipeline executed it."""


class DataUnavailableError(UnifiedDeltaError):
    """Data a task or a loss needs cannot be loaded (a built-in lm-eval task offline, a dataset not cached)."""
