"""safepoint: interrupt any long computation at any moment and continue from its last
checkpoint, with nothing lost and nothing done twice."""

from safepoint.checkpointer import Checkpointer, CorruptCheckpointWarning, Restored
from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InputChanged,
    InvalidName,
    SafepointError,
    SaveFailed,
    StaleAttempt,
    StateMismatch,
    StepExists,
    UnsafeCheckpoint,
    UnsupportedType,
)
from safepoint.stateful import GlobalRNG, Stateful

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFound",
    "Checkpointer",
    "CorruptCheckpoint",
    "CorruptCheckpointWarning",
    "GlobalRNG",
    "InputChanged",
    "InvalidName",
    "Restored",
    "SafepointError",
    "SaveFailed",
    "StaleAttempt",
    "StateMismatch",
    "Stateful",
    "StepExists",
    "UnsafeCheckpoint",
    "UnsupportedType",
    "__version__",
]
