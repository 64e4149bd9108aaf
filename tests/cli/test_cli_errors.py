"""Never a traceback: a missing location, no credentials, no network, no permission and
even a bug end in one line saying what to do, with exit status 1 or 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_support import Invoke, one_line_error, parse_json

import safepoint
from safepoint.cli import common, inspect
from safepoint.store import LocalStore

SRC = str(Path(safepoint.__file__).resolve().parents[1])
NO_AWS = ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
          "AWS_ENDPOINT_URL", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
          "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


@pytest.mark.parametrize("command", [["ls", "{}"], ["ls", "-l", "{}"], ["show", "x", "-l", "{}"],
                                     ["verify", "-l", "{}"], ["rm", "x", "-l", "{}"],
                                     ["gc", "-l", "{}"], ["watch", "{}", "--once"],
                                     ["diff", "x", "1", "2", "-l", "{}"],
                                     ["export", "x", "--to", "x.npz", "-l", "{}"]])
def test_a_location_that_does_not_exist_is_exit_2(invoke: Invoke, tmp_path: Path,
                                                  command: list[str]) -> None:
    typo = tmp_path / "typo"
    result = invoke(*(part.format(typo) for part in command))
    one_line_error(result, f"no store at {typo}: it does not exist", status=2)


def test_the_default_location_missing_says_how_it_was_chosen(invoke: Invoke) -> None:
    one_line_error(invoke("ls"), "(the default store: $SAFEPOINT_DIR, else ./.safepoint",
                   status=2)


def test_a_file_is_not_a_store(invoke: Invoke, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    one_line_error(invoke("ls", tmp_path / "f"), "is a file, not a store", status=2)


def test_two_different_locations_are_refused(invoke: Invoke, store_dir: Path, tmp_path: Path) -> None:
    one_line_error(invoke("ls", store_dir, "-l", tmp_path), "two locations given", status=2)
    assert invoke("ls", store_dir, "-l", store_dir).exit_code == 0


def test_s3_without_credentials_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if k not in NO_AWS}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               PYTHONPATH=SRC, COLUMNS="80")
    done = subprocess.run([sys.executable, "-m", "safepoint", "ls", "s3://bucket/x"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: cannot read s3://bucket/x: no usable credentials")
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in done.stderr


def test_an_unreachable_endpoint_is_one_line(invoke: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    for name in NO_AWS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    opened = common.open_store

    def quick(location: Any) -> Any:  # one attempt, not the store's patient ten
        return opened(location, storage_options={
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}})

    monkeypatch.setattr(common, "open_store", quick)
    try:
        result = invoke("ls", "s3://bucket/x")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    one_line_error(result, "cannot reach s3://bucket/x", "EndpointConnectionError",
                   "check the network and the endpoint (AWS_ENDPOINT_URL)")


def test_permission_denied_is_one_line(invoke: Invoke, store_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: LocalStore, prefix: str = "") -> Any:
        raise PermissionError(13, "Permission denied", str(store_dir))

    monkeypatch.setattr(LocalStore, "scan", denied)
    one_line_error(invoke("ls", store_dir), f"permission denied on {store_dir}",
                   "check that you may read")


def test_a_bug_is_one_line_unless_debugging(invoke: Invoke, store_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(store: Any) -> Any:
        raise RuntimeError("an internal\nmistake")

    monkeypatch.setattr(inspect, "summarize_store", broken)
    one_line_error(invoke("ls", store_dir), "unexpected RuntimeError: an internal mistake",
                   "SAFEPOINT_DEBUG=1 shows the traceback")
    result = invoke("ls", store_dir, env={"SAFEPOINT_DEBUG": "1"})
    assert isinstance(result.exception, RuntimeError)


def test_json_commands_fail_with_one_line_too(invoke: Invoke, store_dir: Path) -> None:
    one_line_error(invoke("show", "nope", "-l", store_dir, "--json"), "no checkpoint named")
    assert parse_json(invoke("ls", store_dir, "--json"))


def test_a_warning_is_one_line(invoke: Invoke, store_dir: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    real = inspect.summarize_store

    def warned(store: Any) -> Any:
        warnings.warn("a record was\ndamaged; skipped", UserWarning, stacklevel=1)
        return real(store)

    monkeypatch.setattr(inspect, "summarize_store", warned)
    result = invoke("ls", store_dir)
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: a record was damaged; skipped\n"
