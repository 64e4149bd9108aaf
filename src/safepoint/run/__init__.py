"""Layer 5: named resumable executions. ``with safepoint.resume("job") as run: ...``

See :func:`resume` and ``docs/runs.md``.
"""

from safepoint.run.inspect import RunInfo, describe_run
from safepoint.run.persist import JOURNAL
from safepoint.run.run import CommitMode, Run, resume

__all__ = ["JOURNAL", "CommitMode", "Run", "RunInfo", "describe_run", "resume"]
