"""``run.lines``: exact lines and offsets, a resume that never reads before its offset, a
changed input detected, and outputs holding each record once."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from run_helpers import Boom, saved

import safepoint.run as runs
import safepoint.run.lines as lines_module
from safepoint.errors import InputChanged
from safepoint.policy import every, manual, on_progress


def crash_after(store: Path, path: Path, count: int, **options: Any) -> list[str]:
    """Read ``count`` lines of ``path`` in run "job" (``options`` go to ``run.lines``),
    checkpoint, and fail."""
    got = []
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        for line in run.lines(path, **options):
            got.append(line)
            if len(got) == count:
                run.checkpoint()
                raise Boom
    return got


def read_rest(store: Path, path: Path, **options: Any) -> list[str]:
    with runs.resume("job", location=store) as run:
        return list(run.lines(path, **options))


def messy_text(count: int, seed: int) -> str:
    """Lines of every length, with non-ASCII text, CRLF, and other line-break characters."""
    rng = random.Random(seed)
    words = ["x", "naïve", "日本語", "a\rb", "tab\tsep", "\u2028sep", "form\x0cfeed", "ok\r", ""]
    out = []
    for i in range(count):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        if i % 997 == 0:
            line += "y" * rng.randint(1, 300_000)  # longer than a read block
        out.append(line + ("\r\n" if rng.random() < 0.2 else "\n"))
    return "".join(out)


@pytest.mark.parametrize("seed", [1, 2])
def test_lines_are_those_of_the_file_and_resume_exactly(tmp_path: Path, store: Path, seed: int) -> None:
    text = messy_text(3000, seed) + "last line without newline"
    path = tmp_path / "messy.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = text.split("\n")
    expected = [line + "\n" for line in expected[:-1]] + [expected[-1]]
    with runs.resume("whole", location=store) as run:
        assert list(run.lines(path)) == expected
    for cut in (1, 997, 1500, 2999, 3000):
        head = crash_after(store, path, cut)
        record = saved(store, "job").record
        assert record.source["offset"] == len("".join(head).encode("utf-8"))
        assert head + read_rest(store, path) == expected


def test_other_encodings_and_a_refused_one(tmp_path: Path, store: Path) -> None:
    path = tmp_path / "latin.txt"
    text = "".join(f"café {i}\n" for i in range(5000))
    path.write_bytes(text.encode("latin-1"))
    head = crash_after(store, path, 1234, encoding="latin-1")
    assert "".join(head + read_rest(store, path, encoding="latin-1")) == text
    with pytest.raises(ValueError, match="0x0A"), runs.resume("other", location=store) as run:
        run.lines(path, encoding="utf-16")


def test_an_undecodable_byte_names_the_file_and_offset(tmp_path: Path, store: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\n" * 10 + b"bad \xff byte\n")
    with pytest.raises(UnicodeDecodeError) as raised, runs.resume("job", location=store) as run:
        list(run.lines(path))
    assert f"in {path} at byte 54" in "\n".join(raised.value.__notes__)


class Recorder:
    """Wraps a binary file and records every byte range read and every seek."""

    def __init__(self, file: Any, log: list[tuple[str, int, int]]) -> None:
        self.file, self.log = file, log

    def read(self, size: int = -1) -> bytes:
        start = self.file.tell()
        data = self.file.read(size)
        self.log.append(("read", start, start + len(data)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.log.append(("seek", offset, whence))
        return self.file.seek(offset, whence)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_resuming_reads_no_byte_before_the_offset(
    numbers: Any, store: Path, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    path, values = numbers(200_000, seed=3)
    done = int(len(values) * fraction) or 1
    crash_after(store, path, done)
    offset = saved(store, "job").record.source["offset"]
    log: list[tuple[str, int, int]] = []
    real_open = open

    def recording_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return Recorder(real_open(file, mode, *args, **kwargs), log)

    monkeypatch.setattr(lines_module, "open", recording_open, raising=False)
    with runs.resume("job", location=store) as run:
        total = sum(int(line) for line in run.lines(path))
    assert total == sum(values[done:])
    reads = [(start, end) for kind, start, end in log if kind == "read" and end > start]
    assert log[0] == ("seek", offset, 0)
    assert min(start for start, _ in reads) == offset
    assert sum(end - start for start, end in reads) == path.stat().st_size - offset


def test_a_changed_file_is_detected(numbers: Any, store: Path) -> None:
    path, _values = numbers(20_000, seed=4)
    crash_after(store, path, 10_000)
    stat = path.stat()

    with path.open("a") as f:  # it grew
        f.write("12345\n")
    with pytest.raises(InputChanged, match="size changed") as info, \
            runs.resume("job", location=store) as run:
        run.lines(path)
    assert "Start over with `safepoint rm job`" in str(info.value)  # the run's real name

    data = bytearray(path.read_bytes()[:-6])
    offset = saved(store, "job").record.source["offset"]
    data[offset + 1] = ord("7") if data[offset + 1] != ord("7") else ord("3")  # same size, same mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(InputChanged, match="where the run resumes"), runs.resume("job", location=store) as run:
        run.lines(path)

    path.write_bytes(bytes(data[:100]))  # it shrank below the offset
    with pytest.raises(InputChanged, match="fewer than"), runs.resume("job", location=store) as run:
        run.lines(path)

    other = path.with_name("other.txt")
    other.write_bytes(bytes(data))
    with pytest.raises(InputChanged, match="this run reads"), runs.resume("job", location=store) as run:
        run.lines(other)


def test_on_change_ignore_goes_on_from_the_offset(numbers: Any, store: Path) -> None:
    path, values = numbers(1000, seed=5)
    crash_after(store, path, 400)
    with path.open("a") as f:
        f.write("1000000\n")
    with runs.resume("job", location=store) as run:
        rest = [int(line) for line in run.lines(path, on_change="ignore")]
    assert rest == [*values[400:], 1_000_000]


def test_a_file_changed_during_the_run_is_detected(numbers: Any, store: Path) -> None:
    path, _ = numbers(5000, seed=6)
    with pytest.raises(InputChanged, match="changed while the run was reading"), \
            runs.resume("job", location=store, policy=every(items=100)) as run:
        for i, _ in enumerate(run.lines(path)):
            if i == 150:
                with path.open("a") as f:
                    f.write("1\n")


def test_an_output_holds_each_record_once_after_a_failure(numbers: Any, store: Path, tmp_path: Path) -> None:
    path, values = numbers(5000, seed=7)
    out = tmp_path / "out.txt"
    with pytest.raises(Boom), runs.resume("job", location=store, policy=every(items=100)) as run:
        sink = run.open_output(out)
        for i, line in enumerate(run.lines(path)):
            sink.write(line)
            if i == 2345:
                raise Boom  # 45 lines written after the last checkpoint
    assert saved(store, "job").record.outputs == {str(out): len("".join(
        f"{v}\n" for v in values[:2300]).encode())}
    with runs.resume("job", location=store) as run:
        sink = run.open_output(out)
        for line in run.lines(path):
            sink.write(line)
    assert out.read_text() == path.read_text()


def test_a_binary_output_closed_by_the_caller_is_still_committed(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        with run.open_output(out, "wb") as sink:
            sink.write(b"header")
        run.checkpoint()
        raise Boom
    with runs.resume("job", location=store) as run:
        sink = run.open_output(out, "wb")
        assert isinstance(sink, io.BufferedIOBase)
        sink.write(b"+body")
    assert out.read_bytes() == b"header+body"


def test_an_output_shorter_than_its_checkpoint_is_refused(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with pytest.raises(Boom), runs.resume("job", location=store, policy=manual()) as run:
        run.open_output(out).write("some text")
        run.checkpoint()
        raise Boom
    out.write_text("some")
    with pytest.raises(InputChanged, match="has 4 bytes") as info, \
            runs.resume("job", location=store) as run:
        run.open_output(out)
    assert "Start over with `safepoint rm job`" in str(info.value)  # the run's real name


def test_a_resumed_run_knows_how_far_through_the_file_it_is(numbers: Any, store: Path) -> None:
    path, _ = numbers(20_000, seed=8)
    size = path.stat().st_size
    with pytest.raises(Boom), runs.resume("job", location=store, policy=on_progress(0.25)) as run:
        for i, _ in enumerate(run.lines(path)):
            if i == 12_000:
                raise Boom
    first = saved(store, "job").record
    assert 0.5 <= first.fraction < 0.6 and first.fraction == first.source["offset"] / size
    with pytest.raises(Boom), runs.resume("job", location=store, policy=on_progress(0.25)) as run:
        for i, _ in enumerate(run.lines(path), start=first.position):
            if i == 14_000:
                raise Boom  # before 75%: no checkpoint since the resume
    assert saved(store, "job").record.position == first.position


def test_the_progress_bar_shows_where_the_run_resumed(numbers: Any, store: Path, capsys: Any) -> None:
    path, _ = numbers(20_000, seed=9)
    crash_after(store, path, 10_000)
    with runs.resume("job", location=store, progress=True) as run:
        for _ in run.lines(path):
            pass
    shown = capsys.readouterr().out
    assert "job (resumed at 50%)" in shown and "100%" in shown and "20,000 lines" in shown
