"""Layer 5, the execution core: named resumable executions.
``with safepoint.resume("job") as run: ...``

See :func:`resume` and ``docs/runs.md``.
"""

from safepoint.run.inspect import RunInfo, describe_run
from safepoint.run.run import CommitMode, Run, resume

__all__ = ["CommitMode", "Run", "RunInfo", "describe_run", "resume"]
