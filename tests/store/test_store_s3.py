"""The fsspec store on S3 (a local moto server): fresh listings, storage options."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from safepoint.checkpointer import Checkpointer
from safepoint.store import FsspecStore, open_store

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "safepoint-tests"


@pytest.fixture
def url() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"


def _other_writer(s3_options: dict[str, Any]) -> Any:
    """An independent S3 client, as another process would have (no shared caches)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)


def test_another_writer_is_seen_at_once(url: str, s3_options: dict[str, Any]) -> None:
    store = FsspecStore(url, **s3_options)
    store.write_blob("job/000000000001/a.bin", [b"a"], durable=True)
    assert store.list("job/000000000001") == ["a.bin"]
    assert not store.exists("job/000000000001/manifest.json")

    other = _other_writer(s3_options)
    root = url[len("s3://") :]
    other.pipe_file(f"{root}/job/000000000001/manifest.json", b"committed elsewhere")
    other.pipe_file(f"{root}/job/000000000001/b.bin", b"0123456789")

    assert store.list("job/000000000001") == ["a.bin", "b.bin", "manifest.json"]
    assert store.exists("job/000000000001/manifest.json")
    assert store.stat("job/000000000001/b.bin").size == 10
    out = bytearray(10)
    assert store.read_into("job/000000000001/b.bin", memoryview(out)) == 10
    assert out == b"0123456789"

    other.rm(f"{root}/job/000000000001/manifest.json")
    assert not store.exists("job/000000000001/manifest.json")
    assert store.list("job/000000000001") == ["a.bin", "b.bin"]


def test_storage_options_through_open_store_and_checkpointer(url: str, s3_options: dict[str, Any]) -> None:
    store = open_store(url, storage_options=s3_options)
    assert isinstance(store, FsspecStore)
    ckpt = Checkpointer("job", location=url, storage_options=s3_options)
    weights = np.arange(5000, dtype=np.float32)
    ckpt.save(1, {"w": weights}, metadata={"loss": 0.5})
    restored = Checkpointer("job", location=url, storage_options=s3_options).restore()
    assert restored.step == 1
    assert restored.metadata == {"loss": 0.5}
    np.testing.assert_array_equal(restored.state["w"], weights)
    assert [e for e in store.list("job") if e != "lease"] == ["000000000001", "000000000001.json", "latest.json"]
