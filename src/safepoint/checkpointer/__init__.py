"""Layer 4: numbered checkpoints of one name (see :class:`Checkpointer`)."""

from safepoint.checkpointer.core import (
    Checkpointer,
    CorruptCheckpointWarning,
    Restored,
    split_location,
)
from safepoint.checkpointer.steps import (
    Cleanup,
    collect_garbage,
    committed_steps,
    is_name,
    latest_manifest,
    latest_problem,
    list_names,
    remove_name,
    remove_steps,
    require_store,
)

__all__ = [
    "Checkpointer",
    "Cleanup",
    "CorruptCheckpointWarning",
    "Restored",
    "collect_garbage",
    "committed_steps",
    "is_name",
    "latest_manifest",
    "latest_problem",
    "list_names",
    "remove_name",
    "remove_steps",
    "require_store",
    "split_location",
]
