"""Layer 6: resumable, idempotent jobs with named sub-steps, progress and checkpoint
strategies, built on the execution core (:mod:`safepoint.run`).

    @safepoint.task
    def job(ctx, path):
        rows = ctx.step("load", load_rows, path)     # runs once; recorded
        for i in ctx.range(len(rows)):               # resumes at the first uncommitted item
            ctx.state["total"] = ctx.state.get("total", 0) + process(rows[i])
            ctx.progress((i + 1) / len(rows))
        return ctx.state["total"]

    safepoint.run_task(job, "in.csv", job_id="nightly")
"""

from safepoint.errors import StepMismatch, SubstepCompleted
from safepoint.tasks.task import Task, TaskContext, default_job_id, default_policy, run_task, task

__all__ = [
    "StepMismatch",
    "SubstepCompleted",
    "Task",
    "TaskContext",
    "default_job_id",
    "default_policy",
    "run_task",
    "task",
]
