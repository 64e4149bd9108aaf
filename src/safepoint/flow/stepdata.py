"""The ``data`` mapping a step receives: values in memory, and stored outputs read on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any


class StepData(MutableMapping[str, Any]):
    """Heavy data passed from step to step.

    Holds what loaders returned and what steps put there in this process, and, under each
    completed step's name, the data that step returned. After a resume, a returned value
    recorded in the store is read the first time a step asks for it (``data["clean"]``),
    then kept: a value nobody asks for is never read, and none is read twice. Testing
    membership or listing keys reads nothing.
    """

    def __init__(self, values: dict[str, Any], stored: Mapping[str, Callable[[], Any]]) -> None:
        self._values = values
        self._stored = {k: v for k, v in stored.items() if k not in values}  # never both

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        read = self._stored.get(key)
        if read is None:
            known = ", ".join(repr(k) for k in self) or "nothing yet"
            raise KeyError(f"no data {key!r}; the flow's data holds {known}")
        value = read()
        self._values[key] = value
        del self._stored[key]
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._stored.pop(key, None)
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._values:
            del self._values[key]
            self._stored.pop(key, None)
        elif key in self._stored:
            del self._stored[key]
        else:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._values or key in self._stored

    def __iter__(self) -> Iterator[str]:
        yield from list(self._values)
        yield from list(self._stored)

    def __len__(self) -> int:
        return len(self._values) + len(self._stored)

    def is_loaded(self, key: str) -> bool:
        """True when ``key`` is in memory (False for a stored output not read yet)."""
        return key in self._values

    def __repr__(self) -> str:
        shown = [repr(k) for k in self._values] + [f"{k!r} (stored)" for k in self._stored]
        return f"StepData({', '.join(shown)})"
