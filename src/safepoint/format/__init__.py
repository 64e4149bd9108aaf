"""Layer 2: what a checkpoint is. State trees to a checksummed manifest plus raw blobs."""

from safepoint.format.checkpoint import (
    MANIFEST,
    Manifest,
    Prepared,
    VerifyReport,
    checksum,
    iter_tree_summary,
    json_copy,
    load_tree,
    prepare,
    read_manifest,
    step_key,
    verify_checkpoint,
    write_checkpoint,
)
from safepoint.format.tree import INLINE_LIMIT

__all__ = [
    "INLINE_LIMIT",
    "MANIFEST",
    "Manifest",
    "Prepared",
    "VerifyReport",
    "checksum",
    "iter_tree_summary",
    "json_copy",
    "load_tree",
    "prepare",
    "read_manifest",
    "step_key",
    "verify_checkpoint",
    "write_checkpoint",
]
