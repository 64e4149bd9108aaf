"""Object-store benchmarks: S3 requests per commit, counted against a moto server on
127.0.0.1 (counts, not times: exact, so they carry no spread).

1. A Checkpointer's small save once it holds the name: the requests of each save.
2. A task of 20 small durable sub-steps (a step record and a state checkpoint each): the
   requests per commit while it runs, and for the whole job (opening, completion and
   cleanup included).

    python -m bench --only s3

Skipped when s3fs or moto is not installed.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import Report, Skip
from safepoint import Checkpointer, knobs
from safepoint.store import FsspecStore
from safepoint.tasks import TaskContext, task

BUCKET = "safepoint-bench"
SUBSTEPS = 20
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_SECURITY_TOKEN": "testing", "AWS_SESSION_TOKEN": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


def square(k: int) -> int:
    return k * k


@task
def squares(ctx: TaskContext, n: int) -> int:
    """``n`` durable sub-steps; the state (the values so far) commits after each."""
    values = ctx.state.setdefault("values", [])
    for k in range(len(values), n):
        values.append(ctx.step(f"s{k}", square, k))
    return sum(values)


@contextmanager
def moto_server() -> Iterator[dict[str, Any]]:
    """Storage options for a fresh moto S3 server on 127.0.0.1 with the bucket ``BUCKET``."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise Skip(f"needs s3fs and moto ({exc.name} is not installed)") from exc
    saved = {key: os.environ.get(key) for key in ENV}
    os.environ.update(ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                   "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(BUCKET)
        yield options
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def counted_store(url: str, options: dict[str, Any]) -> tuple[FsspecStore, Counter[str]]:
    """A store whose S3 client counts its API calls by operation."""
    store = FsspecStore(url, **options)
    store.fs.ls(BUCKET)  # connects the client
    calls: Counter[str] = Counter()
    store.fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return store, calls


def _text(calls: Counter[str]) -> str:
    return ", ".join(f"{count} {name}" for name, count in sorted(calls.items()))


def run(report: Report, quick: bool) -> None:
    ttl, knobs.LEASE_TTL = knobs.LEASE_TTL, 3600.0  # no heartbeat inside the counted calls
    try:
        with moto_server() as options:
            store, calls = counted_store(f"s3://{BUCKET}/save", options)
            ckpt = Checkpointer("job", location=store)
            for step in (1, 2, 3):
                ckpt.save(step, {"step": step, "loss": 0.5})
                if step == 2:
                    ckpt.close()  # waits for the first save's sweep, which shares the client
            per_save = []
            for step in (4, 5, 6):
                before = Counter(calls)
                ckpt.save(step, {"step": step, "loss": 0.5})
                per_save.append(sum(calls.values()) - sum(before.values()))
                during = Counter(calls)
                during.subtract(before)
            ckpt.close()
            report.target(f"S3: requests per small save of a Checkpointer ({_text(+during)}); "
                          "no target", max(per_save), unit=" requests")

            store, calls = counted_store(f"s3://{BUCKET}/task", options)
            with squares.context((SUBSTEPS,), {}, job_id="job", location=store) as ctx:
                before = Counter(calls)
                ctx._result = squares.fn(ctx, SUBSTEPS)
                commits = ctx.commits
                during = Counter(calls)
                during.subtract(before)
            per_commit = sum(during.values()) / commits
            report.target(f"S3: requests per small task checkpoint, {commits} commits of "
                          f"{SUBSTEPS} sub-steps ({_text(+during)}) ≤ 4", per_commit, at_most=4.0,
                          unit=" requests")
            report.target(f"S3: requests for the whole task of {commits} commits, opening, "
                          "completion and cleanup included (no target)",
                          float(sum(calls.values())), unit=" requests")
    finally:
        knobs.LEASE_TTL = ttl
