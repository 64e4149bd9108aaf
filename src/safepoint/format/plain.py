"""Plain trees and JSON text.

A *plain* tree is made of plain JSON values only (exact dicts with str keys other than
``"$"``, exact lists, str, bool, None, int64 ints, finite floats); it stands for itself as
a node of a manifest, so that a state of many small leaves costs no Python walk. This
module says whether a tree is plain, and writes and reads the JSON text of manifests:
with orjson (an order of magnitude faster than the standard library on large trees), and
with the standard library wherever orjson would not give back exactly what was written.
"""

from __future__ import annotations

import gc
import json
import marshal
from typing import Any

import orjson

from safepoint import knobs

_PLAIN_LEAVES = frozenset({str, int, float, bool, type(None)})
_PLAIN = _PLAIN_LEAVES | {dict, list}
_INT64 = 2**63


def is_plain(obj: Any, depth: int = 0, memo: dict[int, bool] | None = None) -> bool:
    """Whether ``obj`` is a tree of plain JSON values that stands for itself as a node:
    exact dicts with str keys other than ``"$"``, exact lists, str, bool, None, int64 ints
    and finite floats.

    The types of a container's entries are gathered in C (``set(map(type, ...))``), so the
    check costs a few steps per container and next to nothing per leaf. ``memo`` (by
    ``id``, for one walk of a tree that stays alive) keeps every container's answer, so
    that asking again at each level of a mixed tree costs nothing more.
    """
    return _plain(obj, depth, True, memo)


def is_plain_node(node: Any, depth: int = 0, memo: dict[int, bool] | None = None) -> bool:
    """Whether a node read from a manifest is plain JSON that stands for itself: lists and
    objects without a ``"$"`` key, all the way down (JSON gave its keys as strings, and any
    number it holds is one a node may hold)."""
    return _plain(node, depth, False, memo)


def _plain(obj: Any, depth: int, exact: bool, memo: dict[int, bool] | None) -> bool:
    if memo is not None:
        known = memo.get(id(obj))
        if known is not None:
            return known
    if depth >= knobs.MAX_DEPTH:
        return False  # too deep, or a cycle: the full encoder (decoder) says which
    kind = type(obj)
    if kind is dict:
        if "$" in obj or (exact and not set(map(type, obj)) <= {str}):
            return False
        values: Any = obj.values()
    elif kind is list:
        values = obj
    else:
        return False
    types = set(map(type, values))
    answer = types <= _PLAIN and not (exact and (int in types or float in types) and any([
        v - v != 0.0 if type(v) is float else not -_INT64 <= v < _INT64  # not finite; not int64
        for v in values if type(v) is float or type(v) is int]))
    if answer and (dict in types or list in types):
        for value in values:
            if (type(value) is dict or type(value) is list) and not _plain(value, depth + 1, exact, memo):
                answer = False
                break
    if memo is not None:
        memo[id(obj)] = answer
    return answer


def plain_copy(obj: Any) -> Any:
    """A deep copy of a plain tree (:func:`is_plain`), made in C."""
    return marshal.loads(marshal.dumps(obj))


_STRICT = orjson.OPT_STRICT_INTEGER | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS \
    | orjson.OPT_PASSTHROUGH_DATETIME


def _deepest(reads: Any) -> int:
    """The deepest nesting of arrays that ``reads(depth)`` accepts (orjson's own limits)."""
    low, high = 1, 1 << 14  # low is accepted, high is not
    while high - low > 1:
        middle = (low + high) // 2
        try:
            reads(middle)
            low = middle
        except (orjson.JSONEncodeError, orjson.JSONDecodeError):
            high = middle
    return low


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


_WRITE_LIMIT = _deepest(lambda depth: orjson.dumps(_nested(depth)))
_READ_LIMIT = _deepest(lambda depth: orjson.loads(b"[" * depth + b"]" * depth))
_WRAP = max(0, _WRITE_LIMIT - knobs.MAX_DEPTH)
"""Lists to wrap a tree in, so that orjson refuses it exactly when it nests more than
``knobs.MAX_DEPTH`` containers deep."""


def plain_json(obj: Any) -> memoryview | None:
    """The JSON text of ``obj`` when ``obj`` is a plain tree (:func:`is_plain`), else None;
    for a large tree, several times faster than :func:`is_plain` and encoding it.

    Every check runs in C: orjson refuses non-str keys, ints beyond 53 bits (left to
    :func:`is_plain`, which keeps int64 ints), subclasses, bytes and most other objects,
    and (wrapped in lists) trees that nest too deep; a walk of the containers a level at a
    time (``gc.get_referents``) refuses every type but the plain ones, which orjson would
    write as something else (a tuple, an Enum, a UUID); the nulls in the text are the
    tree's Nones only, not a NaN or an infinity (which orjson writes as null); and a
    ``"$"`` key shows in the text. The text is a view of orjson's output, which is
    wrapped in lists: the manifest copies it once, into its own text.
    """
    kind = type(obj)
    if kind is not dict and kind is not list:
        return None
    if not set(map(type, obj.values() if kind is dict else obj)) <= _PLAIN:
        return None  # an array or another object at the top: not worth encoding the rest
    wrap = _WRAP
    wrapped = obj
    for _ in range(wrap):
        wrapped = [wrapped]
    try:
        text = orjson.dumps(wrapped, option=_STRICT)
    except (TypeError, ValueError):
        return None
    if b"$" in text and b'"$":' in text:  # a "$" key (or one ending in '"$'): tagged objects decide
        return None
    nulls = text.count(b"null")  # Nones, NaNs, infinities; "null" inside a str counts too
    nones = _plain_types_nones(obj, count=nulls > 0)
    return memoryview(text)[wrap : len(text) - wrap] if nones is not None and nones == nulls else None


def _plain_types_nones(obj: Any, *, count: bool) -> int | None:
    """The Nones among the values of ``obj`` (0 unless ``count``), or None if a value or
    a key of any of its containers is of a type that is not plain. Only for a tree orjson
    has written (no cycle, bounded depth). Each level is handed whole to the next
    ``get_referents`` call: the leaves show nothing, so no Python filters out the
    containers. A dict with str keys only shows its values: its keys are then exact str;
    any other dict shows its keys too."""
    level, nones = [obj], 0
    while level:
        found = gc.get_referents(*level)
        kinds = set(map(type, found))
        if not kinds <= _PLAIN:
            return None
        if count and type(None) in kinds:
            nones += found.count(None)
        level = found
    return nones


def dumps(body: Any) -> bytes:
    """Strict JSON text of a manifest's ``body`` (plain values, finite floats; see
    :mod:`safepoint.format.manifest`)."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # a lone surrogate in a str: escaped by the standard library
        return json.dumps(body, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


_DIGITS = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_NUMBER = b"0" * 19  # orjson reads an int outside [-2**63, 2**64) as a float


def _no_constants(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def loads(text: bytes) -> Any:
    """The value of strict JSON ``text``: parsed by orjson, or by the standard library where
    it may hold what orjson reads otherwise (ints of 19 digits or more, lone surrogates
    written as escapes by older versions) or refuses (the standard library decides what
    is wrong). Raises ``ValueError`` or ``RecursionError``."""
    return parse(text)[0]


def parse(text: bytes, max_depth: int | None = None) -> tuple[Any, bool]:
    """:func:`loads`, and whether the value was found to nest at most ``max_depth`` arrays
    and objects deep (read by orjson wrapped in lists to the depth where it refuses; not
    tried for a short text, which is walked as fast)."""
    if _LONG_NUMBER not in text.translate(_DIGITS):
        wrap = 0 if max_depth is None else _READ_LIMIT - max_depth
        if wrap > 0 and len(text) > 16 * wrap:  # else the few lists made cost more than a walk
            try:
                value = orjson.loads(b"[" * wrap + text + b"]" * wrap)
            except orjson.JSONDecodeError:
                pass
            else:
                for _ in range(wrap):  # one item at every level: the text is one value
                    if type(value) is not list or len(value) != 1:
                        break
                    value = value[0]
                else:
                    return value, True
        try:
            return orjson.loads(text), False
        except orjson.JSONDecodeError:
            pass
    return json.loads(text, parse_constant=_no_constants), False


__all__ = ["dumps", "is_plain", "is_plain_node", "loads", "parse", "plain_copy", "plain_json"]
