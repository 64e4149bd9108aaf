"""Layer 2: what a checkpoint is. State trees to a checksummed, validated manifest plus
byte ranges in data files (see ``docs/format.md``)."""

from safepoint.format.chunks import CHUNKS, ChunkIndex, chunk_references, is_chunk_key
from safepoint.format.layout import (
    LATEST,
    LEASE,
    data_folder,
    generation_of_segment,
    journal_name,
    latest_key,
    manifest_key,
    segment_name,
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
from safepoint.format.plain import plain_json
from safepoint.format.read import Loaded, VerifyReport, check_tree, load_tree, verify_checkpoint
from safepoint.format.summary import iter_tree_summary
from safepoint.format.write import Prepared, prepare, write_checkpoint

__all__ = [
    "CHUNKS",
    "LATEST",
    "LEASE",
    "ChunkIndex",
    "Loaded",
    "Manifest",
    "Prepared",
    "VerifyReport",
    "check_tree",
    "checksum",
    "chunk_references",
    "data_folder",
    "describe_os_error",
    "generation_of_segment",
    "is_chunk_key",
    "iter_tree_summary",
    "journal_name",
    "json_copy",
    "latest_key",
    "load_tree",
    "manifest_key",
    "plain_json",
    "prepare",
    "read_manifest",
    "segment_name",
    "step_of_folder",
    "step_of_manifest",
    "step_text",
    "verify_checkpoint",
    "write_checkpoint",
]
