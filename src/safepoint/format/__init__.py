"""Layer 2: what a checkpoint is. State trees to a checksummed, validated manifest plus
byte ranges in data files (see ``docs/format.md``)."""

from safepoint.format.layout import (
    JOURNAL,
    LATEST,
    data_folder,
    latest_key,
    manifest_key,
    step_of_folder,
    step_of_manifest,
    step_text,
)
from safepoint.format.manifest import (
    Manifest,
    checksum,
    describe_os_error,
    json_copy,
    read_manifest,
)
from safepoint.format.read import Loaded, VerifyReport, check_tree, load_tree, verify_checkpoint
from safepoint.format.summary import iter_tree_summary
from safepoint.format.write import Prepared, prepare, write_checkpoint

__all__ = [
    "JOURNAL",
    "LATEST",
    "Loaded",
    "Manifest",
    "Prepared",
    "VerifyReport",
    "check_tree",
    "checksum",
    "data_folder",
    "describe_os_error",
    "iter_tree_summary",
    "json_copy",
    "latest_key",
    "load_tree",
    "manifest_key",
    "prepare",
    "read_manifest",
    "step_of_folder",
    "step_of_manifest",
    "step_text",
    "verify_checkpoint",
    "write_checkpoint",
]
