"""``run.lines(path)``: the lines of a text file, resumable at a byte offset.

The file is read in binary blocks; each block is cut at its last newline and decoded at
once, so a line costs about what it costs in a plain ``for line in open(path)`` loop. The
byte offset of any position is exact: it is summed from the lengths of the lines of the
current block only when a checkpoint needs it.

A resumed run seeks to the saved offset; nothing before it is read again. Before it reads
on, it checks that the file is the one the checkpoint was reading: same size, same
modification time, and the same bytes at the offset (a checksum of up to 4 KiB after it,
taken at the checkpoint). A difference raises :class:`~safepoint.errors.InputChanged`
unless ``on_change="ignore"``; the file must not change during the run either (checked at
each block read).

Lines split on ``\\n`` only and keep it; ``\\r\\n`` stays as it is in the file. The last line
may lack a newline. The encoding must write a newline as the byte ``0x0A`` (UTF-8, ASCII,
Latin-1, cp1252, Shift JIS, GB18030...; not UTF-16).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal

import crc32c as _crc32c

from safepoint.errors import InputChanged

BLOCK = 64 * 1024
"""Bytes read at a time."""
SAMPLE = 4096
"""Bytes after a checkpoint's offset whose checksum identifies the file on resume."""

OnChange = Literal["error", "ignore"]


def _crc(data: bytes) -> str:
    return f"{_crc32c.crc32c(data) & 0xFFFFFFFF:08x}"


_ASCII_BREAKS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e")
_OTHER_BREAKS = (*_ASCII_BREAKS, "\x85", "\u2028", "\u2029")
"""What ``str.splitlines`` splits on besides \n and \r."""


def _only_newlines(text: str) -> bool:
    """Whether ``text.splitlines(keepends=True)`` splits exactly at each \n: no other line
    break than \n and \r\n occurs (each test is a fast scan for one character; an ASCII
    text, known in constant time, cannot hold the others)."""
    if any(mark in text for mark in (_ASCII_BREAKS if text.isascii() else _OTHER_BREAKS)):
        return False
    return "\r" not in text or text.count("\r") == text.count("\r\n")


def check_encoding(encoding: str) -> None:
    try:
        newline = "\n".encode(encoding)
    except LookupError as exc:
        raise ValueError(f"run.lines(): unknown encoding {encoding!r}") from exc
    if newline != b"\n":
        raise ValueError(
            f"run.lines() reads encodings that write a newline as the byte 0x0A (utf-8, ascii, "
            f"latin-1, cp1252...); {encoding!r} does not (it writes {newline!r})")


class LineSource:
    """The lines of one file, from a byte offset, with the offset of every position."""

    kind = "lines"
    total = None  # the number of lines is not known in advance

    def __init__(self, path: str | os.PathLike[str], *, encoding: str, on_change: OnChange,
                 name: str) -> None:
        if on_change not in ("error", "ignore"):
            raise ValueError(f"on_change must be 'error' or 'ignore', not {on_change!r}")
        check_encoding(encoding)
        self.path = os.path.abspath(os.fspath(path))
        self.name = name  # of the run, for messages
        self.encoding = encoding
        self.on_change = on_change
        self.file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        st = os.fstat(self.file.fileno())
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self.start = 0
        self._first: bytes | None = None  # the first block, read early to check a resumed file
        self._block_position = 0
        self._block_offset = 0
        self._pieces: list[str] = []
        self._sizes: list[int] | None = None
        self._summed = 0
        self._summed_offset = 0
        self._raw = self._after = b""

    def check(self, saved: dict[str, Any], position: int) -> None:
        """Position the file at a checkpoint's offset, after checking it is the same file."""
        offset = int(saved["offset"])
        problem = None
        if saved.get("path") != self.path:
            problem = f"the checkpoint was reading {saved.get('path')}, this run reads {self.path}"
        elif self.size < offset:
            problem = (f"it has {self.size} bytes, fewer than the {offset} the checkpoint had "
                       "already read")
        elif self.size != saved.get("size"):
            problem = f"its size changed from {saved.get('size')} to {self.size} bytes"
        elif self.mtime_ns != saved.get("mtime_ns"):
            problem = "it was modified (its modification time changed)"
        self.file.seek(offset)
        self.start = offset
        self._first = self._read_block()
        self._set_block([], None, position, offset, b"", self._first)
        length, expected = saved.get("sample", (0, _crc(b"")))
        if problem is None and _crc(self._first[:length]) != expected:
            problem = f"its bytes at offset {offset}, where the run resumes, are not the same"
        if problem is not None and self.on_change == "error":
            self.close()
            raise InputChanged(
                f"{self.path} changed since the checkpoint at line {position} (byte {offset}): "
                f"{problem}. The lines already counted may no longer be the file's. Start over "
                f"with `safepoint rm {self.name}`, or pass on_change=\"ignore\" to go on from byte "
                f"{offset} anyway", path=self.path)

    def _read_block(self) -> bytes:
        parts = []
        want = BLOCK
        while want > 0:  # a short read is possible; only an empty one means the end
            data = self.file.read(want)
            if not data:
                break
            parts.append(data)
            want -= len(data)
        st = os.fstat(self.file.fileno())
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            if self.on_change == "error":
                raise InputChanged(
                    f"{self.path} changed while the run was reading it (size {self.size} -> "
                    f"{st.st_size} bytes); the lines read so far may no longer be the file's. "
                    "Pass on_change=\"ignore\" to read a file that grows", path=self.path)
            self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        return b"".join(parts)

    def chunks(self, position: int, run: Any = None) -> Iterator[list[str]]:
        """Lists of lines, a block at a time, from the start offset."""
        offset = self.start
        self._set_block([], None, position, offset, b"", b"")
        pending: list[bytes] = []
        while True:
            if self._first is not None:
                data, self._first = self._first, None
            else:
                data = self._read_block()
            if not data:
                if pending:  # the last line, without a newline
                    tail = b"".join(pending)
                    text = self._decode(tail, offset)
                    sizes = None if tail.isascii() else [len(tail)]
                    self._set_block([text], sizes, position, offset, tail, b"")
                    yield self._pieces
                return
            cut = data.rfind(b"\n")
            if cut < 0:
                pending.append(data)
                continue
            if pending:
                block = b"".join([*pending, data[: cut + 1]])
                pending = []
            else:
                block = data[: cut + 1]
            rest = data[cut + 1 :]
            if rest:
                pending.append(rest)
            pieces, sizes = self._split(block, offset)
            self._set_block(pieces, sizes, position, offset, block, rest)
            yield pieces
            position += len(pieces)
            offset += len(block)

    def _decode(self, data: bytes, offset: int) -> str:
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            exc.add_note(f"in {self.path} at byte {offset + exc.start}; pass encoding=... to "
                           "run.lines() if the file is not " + self.encoding)
            raise

    def _split(self, block: bytes, offset: int) -> tuple[list[str], list[int] | None]:
        text = self._decode(block, offset)
        if _only_newlines(text):
            pieces = text.splitlines(keepends=True)  # fast, and equal to a split on \n here
        else:
            pieces = [piece + "\n" for piece in text.split("\n")[:-1]]
        # a byte per character: an ASCII text (a flag of the str, read in constant time) as
        # long as its bytes (a codec that skips bytes, as a byte order mark, makes it shorter)
        one_byte_each = text.isascii() and len(text) == len(block)
        sizes = None if one_byte_each else [len(line) + 1 for line in block.split(b"\n")[:-1]]
        return pieces, sizes

    def _set_block(
        self, pieces: list[str], sizes: list[int] | None, position: int, offset: int, raw: bytes,
        after: bytes,
    ) -> None:
        """The lines now handed out (the first is line ``position``), and the bytes they
        came from (``raw``, from ``offset``) with those read after them (``after``), for the
        samples of checkpoints. They stay current until the next block is handed out."""
        self._pieces, self._sizes = pieces, sizes
        self._block_position = position
        self._block_offset = self._summed_offset = offset
        self._summed = 0
        self._raw, self._after = raw, after

    def offset_at(self, position: int) -> int:
        """Byte offset just past line ``position`` (a position inside the current block)."""
        count = position - self._block_position
        if count < self._summed:
            self._summed, self._summed_offset = 0, self._block_offset
        if self._sizes is None:  # ASCII: a line's characters are its bytes
            self._summed_offset += len("".join(self._pieces[self._summed : count]))
        else:
            self._summed_offset += sum(self._sizes[self._summed : count])
        self._summed = count
        return self._summed_offset

    def state_at(self, position: int) -> dict[str, Any]:
        """The offset of ``position`` and the file's identity, for a checkpoint: its size,
        its mtime, and a checksum of up to 4 KiB at the offset (from the bytes in memory)."""
        offset = self.offset_at(position)
        start = offset - self._block_offset
        sample = self._raw[start : start + SAMPLE]
        if len(sample) < SAMPLE:
            sample += self._after[: SAMPLE - len(sample)]
            if len(sample) < SAMPLE and offset + len(sample) < self.size:  # rare: read it
                sample = os.pread(self.file.fileno(), SAMPLE, offset)
        return {"kind": "lines", "path": self.path, "offset": offset, "size": self.size,
                "mtime_ns": self.mtime_ns, "sample": [len(sample), _crc(sample)]}

    def fraction_at(self, position: int) -> float | None:
        return self.offset_at(position) / self.size if self.size else 1.0

    def estimated_total(self, position: int) -> int | None:
        """How many lines the file has, judging by the lines read so far (for progress
        policies: the fraction itself is by bytes)."""
        offset = self.offset_at(position)
        return round(position * self.size / offset) if offset and position else None

    def close(self) -> None:
        self.file.close()


__all__ = ["BLOCK", "SAMPLE", "LineSource", "check_encoding"]
