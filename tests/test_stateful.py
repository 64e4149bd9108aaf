"""The Stateful protocol: capture, restore_into, and the RNG adapters."""

from __future__ import annotations

import random
from collections import OrderedDict, namedtuple
from typing import Any

import numpy as np
import pytest

from safepoint.errors import StateMismatch
from safepoint.stateful import GlobalRNG, Stateful, capture, restore_into


class Counter:
    """A minimal object following the PyTorch convention."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.loads = 0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
        self.loads += 1


class Box:
    """A minimal object with get_state/set_state."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def get_state(self) -> list[int]:
        return list(self.items)

    def set_state(self, state: list[int]) -> None:
        self.items = list(state)


class Picky(Counter):
    """Refuses states whose value is negative, before anything is loaded."""

    def validate_state(self, state: dict[str, Any]) -> None:
        if state["value"] < 0:
            raise ValueError("value must be non-negative")


class Trainer:
    """A state_dict holding live objects: they are captured too."""

    def __init__(self) -> None:
        self.counter = Counter(3)
        self.rng = random.Random(1)

    def state_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "rng": self.rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_into({"counter": self.counter, "rng": self.rng}, state)


def test_protocol_is_runtime_checkable() -> None:
    assert isinstance(Counter(), Stateful)
    assert isinstance(GlobalRNG(), Stateful)
    assert not isinstance(Box([]), Stateful)
    assert not isinstance({"a": 1}, Stateful)


def test_capture_replaces_live_objects_and_rebuilds_containers() -> None:
    array = np.arange(3)
    inner = [1, 2]
    tree = OrderedDict(
        model=Counter(7), box=Box([1, 2]), plain=(None, 1.5, "s", b"b", array, inner)
    )
    captured = capture(tree)
    assert captured == {
        "model": {"value": 7},
        "box": [1, 2],
        "plain": (None, 1.5, "s", b"b", array, [1, 2]),
    }
    assert type(captured) is dict
    assert captured["plain"][4] is array  # leaves are passed through, not copied
    assert captured["plain"][5] is not inner  # containers are rebuilt


def test_capture_is_recursive_through_state_dicts() -> None:
    captured = capture({"trainer": Trainer()})
    assert captured["trainer"]["counter"] == {"value": 3}
    assert captured["trainer"]["rng"] == random.Random(1).getstate()


def test_capture_turns_namedtuples_into_tuples() -> None:
    Point = namedtuple("Point", "x y")
    assert type(capture(Point(1, Counter(2)))) is tuple
    restored = restore_into(Point(0, Counter()), (5, {"value": 6}))
    assert type(restored) is Point and restored.x == 5 and restored[1].value == 6


def test_other_mappings_and_tuples_are_saved_as_plain_containers(tmp_path: Any) -> None:
    """What docs/checkpointer.md says: an OrderedDict, a defaultdict (without its factory),
    a collections.Counter, a dict subclass come back as dicts; a namedtuple as a tuple."""
    import collections

    from safepoint import Checkpointer

    class Config(dict):
        pass

    Point = namedtuple("Point", "x y")
    state = {"od": OrderedDict(b=1, a=2), "dd": collections.defaultdict(list, k=[1]),
             "counts": collections.Counter("aab"), "config": Config(lr=0.1), "p": Point(1, 2),
             "w": np.arange(3.0)}
    ckpt = Checkpointer("containers", location=tmp_path)
    ckpt.save(1, state)
    restored = ckpt.restore().state
    for key in ("od", "dd", "counts", "config"):
        assert type(restored[key]) is dict and restored[key] == dict(state[key])
    assert list(restored["od"]) == ["b", "a"]  # the order stays
    assert type(restored["p"]) is tuple and restored["p"] == (1, 2)
    ckpt.close()


def test_classes_are_not_live_objects() -> None:
    assert capture({"cls": Counter}) == {"cls": Counter}


def test_restore_into_keeps_identity_and_fills_plain_leaves() -> None:
    counter, box = Counter(), Box([])
    target = {"model": counter, "layers": [box, 0], "step": 0}
    saved = {"model": {"value": 9}, "layers": [[4, 5], 17], "step": 42, "extra": "kept"}
    result = restore_into(target, saved)
    assert result["model"] is counter and counter.value == 9
    assert result["layers"][0] is box and box.items == [4, 5]
    assert result["layers"][1] == 17 and result["step"] == 42
    assert result["extra"] == "kept"  # keys only in the checkpoint stay in the result
    assert target["step"] == 0  # the target's containers are not modified


def test_restore_into_nested_live_objects() -> None:
    trainer = Trainer()
    saved = capture({"t": trainer})
    expected = trainer.rng.random()
    trainer.counter.value = 100
    restore_into({"t": trainer}, saved)
    assert trainer.counter.value == 3
    assert trainer.rng.random() == expected


def test_restore_into_accepts_lists_for_tuples() -> None:
    assert restore_into((1, 2), [3, 4]) == (3, 4)


@pytest.mark.parametrize(
    ("target", "saved", "path", "words"),
    [
        ({"a": {"b": 1}}, {"a": {}}, "state['a']", "'b' is in the target but not"),
        ({"a": [Counter(), 1]}, {"a": [{"value": 1}]}, "state['a']", "2 items"),
        ({"a": [1, {"b": 1}]}, {"a": [1, 5]}, "state['a'][1]", "has a dict here"),
        ({"a": (1,)}, {"a": "x"}, "state['a']", "has a tuple here"),
        ({"m": Counter()}, {"m": [1]}, "state['m']", "needs a dict"),
        ({"r": random.Random()}, {"r": 3}, "state['r']", "Random.getstate"),
    ],
)
def test_restore_into_names_the_path_of_a_mismatch(
    target: Any, saved: Any, path: str, words: str
) -> None:
    with pytest.raises(StateMismatch) as caught:
        restore_into(target, saved)
    assert str(caught.value).startswith(path + ":")
    assert caught.value.tree_path == path
    assert words in str(caught.value)


def test_a_mismatch_anywhere_leaves_every_object_untouched() -> None:
    first, picky, last = Counter(1), Picky(2), Counter(3)
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    target = {"a": first, "rng": rng, "b": [picky], "c": {"d": last}}
    saved = {"a": {"value": 10}, "rng": np.random.default_rng(5).bit_generator.state}
    saved |= {"b": [{"value": 20}], "c": {}}  # 'd' is missing
    with pytest.raises(StateMismatch, match=r"state\['c'\]"):
        restore_into(target, saved)
    saved["c"] = {"d": {"value": 30}}
    saved["b"] = [{"value": -1}]  # refused by Picky.validate_state
    with pytest.raises(StateMismatch, match=r"state\['b'\]\[0\].*non-negative"):
        restore_into(target, saved)
    assert (first.value, picky.value, last.value) == (1, 2, 3)
    assert first.loads == picky.loads == last.loads == 0
    assert rng.bit_generator.state == before


def _draws(rng: Any) -> list[float]:
    if isinstance(rng, random.Random):
        return [rng.random() for _ in range(5)] + [rng.gauss(0, 1)]
    if isinstance(rng, np.random.RandomState):
        return [*rng.random_sample(5).tolist(), rng.standard_normal()]
    if isinstance(rng, np.random.BitGenerator):
        return np.random.Generator(rng).random(5).tolist()
    return [*rng.random(5).tolist(), rng.standard_normal(), float(rng.integers(1 << 62))]


@pytest.mark.parametrize(
    "make",
    [
        lambda: random.Random(123),
        lambda: np.random.default_rng(123),
        lambda: np.random.Generator(np.random.MT19937(123)),
        lambda: np.random.Generator(np.random.Philox(123)),
        lambda: np.random.Generator(np.random.SFC64(123)),
        lambda: np.random.PCG64DXSM(123),
        lambda: np.random.RandomState(123),
    ],
    ids=["Random", "Generator", "MT19937", "Philox", "SFC64", "PCG64DXSM", "RandomState"],
)
def test_rng_adapters_round_trip_exactly(make: Any) -> None:
    rng = make()
    _draws(rng)  # move off the seed, and leave a cached gaussian behind
    saved = capture({"rng": rng})
    expected = _draws(rng)
    assert restore_into({"rng": rng}, saved)["rng"] is rng
    assert _draws(rng) == expected
    fresh = make()  # restoring into a fresh object works the same
    restore_into({"rng": fresh}, saved)
    assert _draws(fresh) == expected


def test_random_state_survives_tuples_turned_into_lists() -> None:
    rng = random.Random(5)
    version, internal, gauss = capture(rng)
    expected = rng.random()
    restore_into(rng, [version, list(internal), gauss])
    assert rng.random() == expected


def test_numpy_bit_generator_kind_must_match() -> None:
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    saved = capture(np.random.Generator(np.random.Philox(0)))
    with pytest.raises(StateMismatch, match="Philox state but this RNG uses PCG64"):
        restore_into(rng, saved)
    assert rng.bit_generator.state == before


def _global_draws() -> tuple[Any, ...]:
    return random.random(), np.random.rand(3).tolist(), random.gauss(0, 1), np.random.randn()


def test_global_rng_round_trips_exactly() -> None:
    random.seed(7)
    np.random.seed(7)
    saved = capture({"rng": GlobalRNG()})
    expected = _global_draws()
    restore_into({"rng": GlobalRNG()}, saved)
    assert _global_draws() == expected


def test_global_rng_can_leave_some_alone() -> None:
    only_python = GlobalRNG(numpy=False, torch=False)
    assert set(only_python.state_dict()) == {"python"}
    saved = capture(only_python)
    expected_python = random.random()
    np.random.seed(1)
    expected_numpy = np.random.rand()
    np.random.seed(1)
    restore_into(GlobalRNG(), saved)  # restores what the checkpoint holds, nothing more
    assert random.random() == expected_python
    assert np.random.rand() == expected_numpy


def test_global_rng_refuses_foreign_state() -> None:
    with pytest.raises(StateMismatch, match="unknown global RNG names"):
        restore_into({"rng": GlobalRNG()}, {"rng": {"cuda": 1}})


def test_torch_generator_and_global_rng() -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(3)
    torch.rand(2, generator=generator)
    torch.manual_seed(11)
    saved = capture({"gen": generator, "global": GlobalRNG()})
    assert saved["gen"].dtype == torch.uint8 and "torch" in saved["global"]
    expected = (torch.rand(4, generator=generator), torch.rand(4))
    restore_into({"gen": generator, "global": GlobalRNG()}, saved)
    assert torch.equal(torch.rand(4, generator=generator), expected[0])
    assert torch.equal(torch.rand(4), expected[1])
    with pytest.raises(StateMismatch, match="uint8 tensor"):
        restore_into(generator, torch.zeros(3))


def test_torch_module_and_optimizer_restore_in_place() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = capture({"model": model, "optimizer": optimizer})
    saved = {  # what a checkpoint hands back: tensors that share nothing with the model
        "model": {k: v.clone() for k, v in saved["model"].items()},
        "optimizer": saved["optimizer"],
    }
    weight = model.weight
    expected = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    result = restore_into({"model": model, "optimizer": optimizer}, saved)
    assert result["model"] is model and model.weight is weight
    assert torch.equal(model.weight.detach(), expected)
