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
from safepoint.flow import Flow
from safepoint.stateful import GlobalRNG, Stateful

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFound",
    "Checkpointer",
    "CorruptCheckpoint",
    "CorruptCheckpointWarning",
    "Flow",
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
