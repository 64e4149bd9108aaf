"""``run.open_output(path)``: output files whose committed length is part of each checkpoint.

At every checkpoint each output is flushed, its length goes into the checkpoint, and (when
durable) its data is made durable before the checkpoint is committed. A resumed run cuts
the file back to the committed length, so whatever a crashed attempt wrote after its last
checkpoint disappears, and the run writes it again: each record is in the file exactly once.

An output is written sequentially (appended to); seeking back inside it is not supported.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import IO, Any, Literal

from safepoint.errors import InputChanged
from safepoint.store.local import fsync_dir

OutputMode = Literal["w", "wb"]


class Output:
    """One open output: the caller's file object and a descriptor of our own for syncing
    (the caller may close its file; ours stays valid until the run ends)."""

    def __init__(self, path: str, file: IO[Any], fd: int) -> None:
        self.path, self.file, self.fd = path, file, fd

    def committed_length(self) -> int:
        """Flush what the caller wrote and return the file's length."""
        if not self.file.closed:
            self.file.flush()
        return os.fstat(self.fd).st_size


class Outputs:
    """The outputs of one run."""

    def __init__(self, committed: dict[str, int], *, durable: bool, name: str) -> None:
        self.committed = committed
        self.name = name  # of the run, for messages
        self.durable = durable
        self.open_files: dict[str, Output] = {}

    def open(self, path: str | os.PathLike[str], mode: OutputMode, encoding: str) -> IO[Any]:
        if mode not in ("w", "wb"):
            raise ValueError(f"open_output() mode must be 'w' (text) or 'wb' (binary), not {mode!r}")
        full = os.path.abspath(os.fspath(path))
        if full in self.open_files:
            raise ValueError(f"{full} is already open as an output of this run")
        length = self.committed.get(full)
        if length is None:
            binary: Any = open(full, "wb")  # noqa: SIM115 (the run closes it)
            if self.durable:
                fsync_dir(os.path.dirname(full))  # the new file's name survives a power loss
        else:
            binary = self._reopen(full, length, self.name)
        fd = os.dup(binary.fileno())
        file = binary if mode == "wb" else io.TextIOWrapper(binary, encoding=encoding)
        self.open_files[full] = Output(full, file, fd)
        return file

    @staticmethod
    def _reopen(path: str, length: int, name: str) -> Any:
        try:
            binary = open(path, "r+b")  # noqa: SIM115 (the run closes it)
        except FileNotFoundError:
            binary = None
        size = os.fstat(binary.fileno()).st_size if binary is not None else -1
        if binary is None or size < length:
            if binary is not None:
                binary.close()
            what = "is missing" if size < 0 else f"has {size} bytes"
            raise InputChanged(
                f"output {path} {what}, but the checkpoint committed {length} bytes of it: it "
                f"was changed outside the run. Start over with `safepoint rm {name}`", path=path)
        binary.truncate(length)  # drop what a crashed attempt wrote after its checkpoint
        binary.seek(length)
        return binary

    def snapshot(self) -> tuple[dict[str, int], list[int]]:
        """The committed lengths (flushing every output) and the descriptors to sync."""
        lengths = dict(self.committed)
        for path, output in self.open_files.items():
            lengths[path] = output.committed_length()
        return lengths, [output.fd for output in self.open_files.values()]

    def close(self, *, discard: bool = False) -> None:
        """Close every output; ``discard``: drop what was written since the last checkpoint
        and is still buffered (a writer that was taken over: the file is the newer one's)."""
        for output in self.open_files.values():
            if discard and not output.file.closed:
                with contextlib.suppress(OSError, ValueError):
                    null = os.open(os.devnull, os.O_WRONLY)
                    try:
                        os.dup2(null, output.file.fileno())  # the buffer is flushed into nothing
                    finally:
                        os.close(null)
            with contextlib.suppress(OSError, ValueError):
                output.file.close()
            os.close(output.fd)
        self.open_files.clear()


__all__ = ["Output", "OutputMode", "Outputs"]
