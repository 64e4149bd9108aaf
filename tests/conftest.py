"""Shared fixtures: a fresh store on every backend (a local directory, ``memory://``, and
``s3://`` on a local S3-compatible server, moto's, on 127.0.0.1).

``make_store()`` returns a new empty store on the backend of the current ``backend``
parameter; tests that take it run once per backend. S3 tests skip when moto or s3fs are
missing.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from safepoint.store import FsspecStore, LocalStore, Store

BACKENDS = ["local", "memory", "s3"]
S3_BUCKET = "safepoint-tests"
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_options() -> Iterator[dict[str, Any]]:
    """Storage options for an S3 server on 127.0.0.1 with the bucket ``S3_BUCKET``."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    saved = {key: os.environ.get(key) for key in _S3_ENV}
    os.environ.update(_S3_ENV)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        "key": "testing",
        "secret": "testing",
    }
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(S3_BUCKET)
    yield options
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of a store backend; tests taking it run once per backend."""
    return request.param


@pytest.fixture
def make_store(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    """A factory of fresh, empty stores on ``backend``."""
    made: list[Store] = []

    def make() -> Store:
        unique = uuid.uuid4().hex[:10]
        if backend == "local":
            store: Store = LocalStore(tmp_path / f"store-{unique}")
        elif backend == "memory":
            store = FsspecStore(f"memory://safepoint-tests/{unique}")
        else:
            options = request.getfixturevalue("s3_options")
            store = FsspecStore(f"s3://{S3_BUCKET}/{unique}", **options)
        made.append(store)
        return store

    yield make
    for store in made:
        if isinstance(store, FsspecStore) and backend == "memory":
            store.delete("")


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    """A fresh, empty store on ``backend``."""
    return make_store()


_THREADED_FRAMEWORK_TESTS = ("test_jax_codec.py", "test_torch_codec.py", "test_stateful.py",
                             "test_bench_smoke.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that import jax or torch last.

    Both start thread pools in the pytest process, and the crash tests fork children from
    it: a fork while another thread holds a lock can deadlock the child. With these tests
    last, no fork happens after those threads exist.
    """
    items.sort(key=lambda item: item.path.name in _THREADED_FRAMEWORK_TESTS)
