"""Every safepoint error survives pickling with all its fields (it crosses process and Dask
boundaries), keeps its message, and is also the builtin it means."""

from __future__ import annotations

import errno
import pickle
import traceback
from typing import Any

import pytest

from safepoint import errors
from safepoint.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InputChanged,
    InvalidName,
    KindMismatch,
    LeaseHeld,
    NotAStore,
    SafepointError,
    SaveFailed,
    StaleAttempt,
    StateMismatch,
    StepExists,
    StepMismatch,
    SubstepCompleted,
    UnsafeCheckpoint,
    UnsupportedType,
    WriteConflict,
)

EXAMPLES: list[tuple[SafepointError, dict[str, Any], tuple[type, ...]]] = [
    (SafepointError("base", extra=1), {"extra": 1}, ()),
    (InvalidName("bad name '../x'", name="../x"), {"name": "../x"}, (ValueError,)),
    (CheckpointNotFound("no step 3", name="job", step=3), {"name": "job", "step": 3},
     (FileNotFoundError, OSError)),
    (CorruptCheckpoint("checksum mismatch", path="/s/job/1/a.bin", step=1, expected="0a",
                       actual="0b"),
     {"path": "/s/job/1/a.bin", "step": 1, "expected": "0a", "actual": "0b"}, ()),
    (UnsafeCheckpoint("pickled", path="m.json", leaves=["state['x']"]),
     {"path": "m.json", "leaves": ["state['x']"]}, ()),
    (UnsupportedType("state['a']: cannot store a Foo", tree_path="state['a']", type_name="m.Foo"),
     {"tree_path": "state['a']", "type_name": "m.Foo"}, (TypeError,)),
    (StepExists("step 5 exists", name="job", step=5), {"name": "job", "step": 5},
     (FileExistsError, OSError)),
    (SaveFailed("disk full", name="job", step=7, errno=errno.ENOSPC),
     {"name": "job", "step": 7, "errno": errno.ENOSPC}, (OSError,)),
    (StaleAttempt("taken over", name="job", attempt=1, current=2),
     {"name": "job", "attempt": 1, "current": 2}, ()),
    (StateMismatch("state['x']: wrong", tree_path="state['x']"), {"tree_path": "state['x']"},
     (ValueError,)),
    (InputChanged("data.csv changed", path="data.csv"), {"path": "data.csv"}, ()),
    (StepMismatch("step 1 was 'load', now 'clean'", name="job", index=1, recorded="load",
                  current="clean"),
     {"name": "job", "index": 1, "recorded": "load", "current": "clean"}, (ValueError,)),
    (SubstepCompleted("'load' already ran", name="job", substep="load"),
     {"name": "job", "substep": "load"}, (RuntimeError,)),
    (NotAStore("/x is not a store", location="/x"), {"location": "/x"}, (FileNotFoundError,)),
    (WriteConflict("changed", key="job/latest.json"), {"key": "job/latest.json"}, ()),
    (LeaseHeld("held", name="job", holder={"host": "h", "pid": 1}, heartbeat=5.0),
     {"name": "job", "holder": {"host": "h", "pid": 1}, "heartbeat": 5.0}, ()),
    (KindMismatch("a run", name="job", found="run", wanted="flow"),
     {"name": "job", "found": "run", "wanted": "flow"}, (ValueError,)),
]


@pytest.mark.parametrize(("error", "fields", "builtins"), EXAMPLES, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_every_field(error: SafepointError, fields: dict[str, Any],
                                        builtins: tuple[type, ...]) -> None:
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert type(copy) is type(error)
        assert str(copy) == str(error) == error.message
        for key, value in fields.items():
            assert getattr(copy, key) == value, key
        assert isinstance(copy, SafepointError)
        for builtin in builtins:
            assert isinstance(copy, builtin)


def test_fields_changed_after_raising_are_pickled_too() -> None:
    error = CorruptCheckpoint("damaged", path="m.json")
    error.step = 12  # e.g. the checkpointer adds the step it was restoring
    assert pickle.loads(pickle.dumps(error)).step == 12


def test_save_failed_is_an_oserror_with_its_errno() -> None:
    error = SaveFailed("disk full", name="job", step=1, errno=errno.ENOSPC)
    try:
        raise error
    except OSError as caught:
        assert caught.errno == errno.ENOSPC


def test_every_public_error_is_covered() -> None:
    covered = {type(e) for e, _, _ in EXAMPLES}
    assert {getattr(errors, n) for n in errors.__all__} == covered


def test_within_restates_a_path_for_the_tree_the_user_knows() -> None:
    error = UnsupportedType("state['a'][0]: cannot store an object (builtins.object); convert it",
                            tree_path="state['a'][0]", type_name="builtins.object")
    moved = error.within("data['fit']", "step 'fit' completed")
    assert str(moved) == ("step 'fit' completed: data['fit']['a'][0]: cannot store an object "
                          "(builtins.object); convert it")
    assert (moved.tree_path, moved.type_name) == ("data['fit']['a'][0]", "builtins.object")
    assert error.within("args", replaces="state['args']").tree_path == "state['a'][0]"


def test_trimming_keeps_the_exception_and_its_chain() -> None:
    def user_code() -> None:
        try:
            {}["key"]
        except KeyError as exc:
            raise ValueError("bad") from exc

    def engine() -> None:  # stands for safepoint's frames: its code object claims their file
        user_code()

    engine.__code__ = engine.__code__.replace(co_filename=errors.PACKAGE_DIR + "/engine.py")
    entry = errors.user_frames(engine)
    with pytest.raises(ValueError) as info:
        entry()
    error = info.value
    assert isinstance(error.__cause__, KeyError) and error.__cause__.__traceback__ is not None
    names = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert names == ["test_trimming_keeps_the_exception_and_its_chain", "entry",
                     "user_code"]
