"""safepoint: interrupt any long computation at any moment and continue from its last
checkpoint, with nothing lost and nothing done twice."""

from safepoint.checkpointer import Checkpointer, CorruptCheckpointWarning, Restored
from safepoint.checkpointer.group import Group, GroupTimeout, StoreGroup
from safepoint.consistency import CheckReport, check
from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InputChanged,
    InvalidName,
    KindMismatch,
    LeaseHeld,
    NotAStore,
    SafepointError,
    SaveFailed,
    StaleAttempt,
    StateMismatch,
    StepExists,
    StepMismatch,
    SubstepCompleted,
    UnsafeCheckpoint,
    UnsupportedType,
)
from safepoint.flow import Flow
from safepoint.format.shards import PerRank, Shard
from safepoint.policy import Policy, after_substep, every, manual, on_progress
from safepoint.retention import Retention, keep_all, keep_best, keep_every, keep_last
from safepoint.run import resume
from safepoint.stateful import GlobalRNG, Stateful
from safepoint.tasks import Task, TaskContext, run_task, task

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "CheckpointNotFound",
    "Checkpointer",
    "CorruptCheckpoint",
    "CorruptCheckpointWarning",
    "Flow",
    "GlobalRNG",
    "Group",
    "GroupTimeout",
    "InputChanged",
    "InvalidName",
    "KindMismatch",
    "LeaseHeld",
    "NotAStore",
    "PerRank",
    "Policy",
    "Restored",
    "Retention",
    "SafepointError",
    "SaveFailed",
    "Shard",
    "StaleAttempt",
    "StateMismatch",
    "Stateful",
    "StepExists",
    "StepMismatch",
    "StoreGroup",
    "SubstepCompleted",
    "Task",
    "TaskContext",
    "UnsafeCheckpoint",
    "UnsupportedType",
    "__version__",
    "after_substep",
    "check",
    "every",
    "keep_all",
    "keep_best",
    "keep_every",
    "keep_last",
    "manual",
    "on_progress",
    "resume",
    "run_task",
    "task",
]
