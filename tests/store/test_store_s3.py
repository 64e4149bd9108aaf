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


# ------------------------------------------------- parts and retries, seen by a proxy


def _big_state() -> dict[str, Any]:
    return {"w": np.arange(8 << 20, dtype=np.float32), "step": 3}  # 32 MiB: two parts of 16


def test_a_large_blob_goes_up_as_parallel_parts(url: str, s3_options: dict[str, Any]) -> None:
    """A blob of 32 MiB or more is a multipart upload whose parts are in flight together
    (the proxy holds each part until a second one arrives: sequential parts never meet,
    and would each wait out the gate)."""
    import safepoint
    from s3_proxy import s3_proxy

    with s3_proxy(s3_options) as (proxy, options):
        proxy.gate(lambda seen: seen.action == "UploadPart", meet=2)
        ckpt = Checkpointer("job", location=url, storage_options=options)
        ckpt.save(1, _big_state())
        parts = [seen for seen in proxy.seen if seen.action == "UploadPart"]
        assert proxy.actions().count("CreateMultipartUpload") == 1
        assert proxy.actions().count("CompleteMultipartUpload") == 1
        assert len(parts) == 2 and all(seen.status == 200 for seen in parts)
        assert max(seen.in_flight for seen in parts) >= 2, "the parts went up one at a time"
        restored = ckpt.restore()
        ckpt.close()
    np.testing.assert_array_equal(restored.state["w"], _big_state()["w"])
    report = safepoint.check(open_store(url, storage_options=s3_options))
    assert report.clean, report.findings


@pytest.mark.parametrize("action", ["PutObject", "UploadPart", "CompleteMultipartUpload"])
def test_transient_errors_are_retried_by_the_client(url: str, s3_options: dict[str, Any], action: str) -> None:
    """Two 500s in a row on a write are retried by botocore's own retry (adaptive mode,
    ten attempts: the store's default), the save succeeds and restores exactly."""
    import safepoint
    from s3_proxy import s3_proxy

    with s3_proxy(s3_options) as (proxy, options):
        proxy.fail(lambda seen: seen.action == action, 2, status=500, code="InternalError")
        ckpt = Checkpointer("job", location=url, storage_options=options)
        ckpt.save(1, _big_state())
        failed = [seen for seen in proxy.seen if seen.action == action and seen.status == 500]
        assert len(failed) == 2  # both injected errors were met, and the save went on
        restored = ckpt.restore()
        ckpt.close()
    np.testing.assert_array_equal(restored.state["w"], _big_state()["w"])
    assert restored.state["step"] == 3
    report = safepoint.check(open_store(url, storage_options=s3_options))
    assert report.clean, report.findings


def test_the_retry_settings_are_the_backends_own(url: str, s3_options: dict[str, Any]) -> None:
    """``config_kwargs={"retries": ...}`` in the storage options is what decides: with two
    retries, a write failing every time is tried exactly three times, the first and two
    retries (no loop of ours around botocore's), and the save fails clearly, leaving the
    earlier step as it was."""
    import safepoint
    from s3_proxy import s3_proxy

    with s3_proxy(s3_options) as (proxy, options):
        options = {**options, "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
        ckpt = Checkpointer("job", location=url, storage_options=options)
        ckpt.save(1, {"x": np.arange(10), "step": 1})
        proxy.fail(lambda seen: seen.action == "PutObject", 1000, status=500, code="InternalError")
        before = len(proxy.seen)
        with pytest.raises(safepoint.SaveFailed, match="step 2") as failure:
            ckpt.save(2, {"x": np.arange(10), "step": 2})
        tried = [seen for seen in proxy.seen[before:] if seen.action == "PutObject"]
        assert len(tried) == 3 and all(seen.path.endswith("/job/000000000002.json") for seen in tried), \
            [seen.path for seen in proxy.seen[before:]]  # the step's manifest, and nothing after it
        assert "injected by the test proxy" in str(failure.value)  # the server's own message
        assert "previous checkpoints are untouched" in str(failure.value)
        ckpt.close()
    reader = Checkpointer("job", location=url, storage_options=s3_options)
    assert reader.latest_step() == 1 and reader.restore().state["step"] == 1
    reader.close()
