"""``safepoint.exchange``: diffs of two steps, and exports to .npz, .safetensors and .pt."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint import Checkpointer
from safepoint.errors import CheckpointNotFound, CorruptCheckpoint, InvalidName, SafepointError
from safepoint.exchange import StepDiff, diff_steps, export_format, export_step
from safepoint.format import iter_tree_summary


def save(store: Path, name: str, *states: Any, **kwargs: Any) -> Checkpointer:
    """Save ``states`` as steps 1, 2, ... of ``name``."""
    ckpt = Checkpointer(name, location=store, **kwargs)
    for step, state in enumerate(states, start=1):
        ckpt.save(step, state)
    return ckpt


def by_path(diff: StepDiff) -> dict[str, Any]:
    return {leaf.path: leaf for leaf in diff.leaves}


def same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    """Same dtype, shape and bytes."""
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# ============================================================================= diff


def base_state() -> dict[str, Any]:
    return {
        "w": np.linspace(-1, 1, 20_000, dtype=np.float32),
        "i": np.arange(100, dtype=np.int64),
        "same": np.ones((64, 64)),
        "gone": np.zeros(3, np.int16),
        "step": 1,
        "lr": 0.1,
        "note": "first",
        "nested": {"layers": [{"k": np.arange(5.0)}, {"k": np.arange(5.0)}]},
    }


def test_diff_reports_added_removed_and_changed_leaves_with_max_abs_difference(tmp_path: Path) -> None:
    a = base_state()
    b = base_state()
    b["w"] = a["w"].copy()
    b["w"][123] += 2.5
    b["w"][7] -= 0.25
    b["i"] = a["i"] * 3  # largest change at the last element: 99 * 2
    del b["gone"]
    b["fresh"] = np.zeros((2, 3), np.float32)
    b["step"], b["lr"], b["note"] = 2, 0.05, "second"
    b["nested"]["layers"][1]["k"] = np.arange(5.0) + 0.5
    save(tmp_path, "t", a, b)

    diff = diff_steps("t", 1, 2, location=tmp_path)
    found = by_path(diff)
    assert list(found) == [  # tree order: a removed leaf stays where it stood
        "state['w']", "state['i']", "state['gone']", "state['step']", "state['lr']",
        "state['note']", "state['nested']['layers'][1]['k']", "state['fresh']"]
    assert [leaf.path for leaf in diff.added] == ["state['fresh']"]
    assert [leaf.path for leaf in diff.removed] == ["state['gone']"]
    assert {leaf.path for leaf in diff.changed} == {
        "state['w']", "state['i']", "state['step']", "state['lr']", "state['note']",
        "state['nested']['layers'][1]['k']"}
    assert diff.unchanged == 2  # same, layers[0]
    w = found["state['w']"]
    assert (w.changes, w.max_abs_diff) == (("data",), float(np.float32(a["w"][123] + 2.5) - a["w"][123]))
    assert w.a.dtype == w.b.dtype == "float32" and w.a.shape == (20_000,)
    i = found["state['i']"]
    assert i.max_abs_diff == 198 and isinstance(i.max_abs_diff, int)
    assert found["state['step']"].max_abs_diff == 1
    assert found["state['lr']"].max_abs_diff == pytest.approx(0.05)
    note = found["state['note']"]
    assert (note.changes, note.max_abs_diff) == (("value",), None)
    assert (note.a.value, note.b.value) == ("'first'", "'second'")
    assert found["state['nested']['layers'][1]['k']"].max_abs_diff == 0.5
    fresh = found["state['fresh']"]
    assert (fresh.a, fresh.b.dtype, fresh.b.shape, fresh.b.nbytes) == (None, "float32", (2, 3), 24)
    assert found["state['gone']"].b is None and found["state['gone']"].a.dtype == "int16"
    assert not diff.identical


def test_diff_paths_are_those_of_show(tmp_path: Path) -> None:
    state = {"a": [1, (2, np.zeros(3))], 5: {"x": None}, "o": OrderedDict(k=np.ones(2)),
             "e": [], "t": ()}
    ckpt = save(tmp_path, "t", state, {})
    shown = [row[0] for row in iter_tree_summary(ckpt.manifest(1).body["tree"])]
    diff = diff_steps("t", 1, 2, location=tmp_path)
    assert [leaf.path for leaf in diff.removed] == shown
    assert diff_steps("t", 2, 1, location=tmp_path).added[0].path == shown[0]


def test_identical_steps_and_a_step_with_itself(tmp_path: Path) -> None:
    save(tmp_path, "t", base_state(), base_state())
    for a, b in ((1, 2), (2, 2)):
        diff = diff_steps("t", a, b, location=tmp_path)
        assert diff.identical and diff.leaves == [] and diff.unchanged == 9
        assert diff.to_json()["counts"] == {"added": 0, "removed": 0, "changed": 0, "unchanged": 9}


def test_diff_of_dtype_shape_and_type_changes(tmp_path: Path) -> None:
    a = {"cast": np.arange(6, dtype=np.float32), "grow": np.zeros(4), "kind": np.zeros(3),
         "flag": np.array([True, False, True]), "n": 3}
    b = {"cast": np.arange(6, dtype=np.float64) * 2, "grow": np.zeros(5), "kind": [0.0, 0.0, 0.0],
         "flag": np.array([True, True, True]), "n": 3.5}
    save(tmp_path, "t", a, b)
    found = by_path(diff_steps("t", 1, 2, location=tmp_path))
    cast = found["state['cast']"]
    assert cast.changes == ("dtype",) and cast.max_abs_diff == 5.0  # compared as float64
    grow = found["state['grow']"]
    assert grow.changes == ("shape",) and grow.max_abs_diff is None
    assert (grow.a.shape, grow.b.shape) == ((4,), (5,))
    # an array that became a list: the old leaf is removed, three new leaves are added
    assert found["state['kind']"].status == "removed"
    assert found["state['kind'][0]"].status == "added"
    assert found["state['flag']"].max_abs_diff == 1
    n = found["state['n']"]
    assert n.changes == ("type", "value") and n.max_abs_diff == 0.5


def test_max_abs_diff_is_exact_for_extreme_integers_and_handles_nan(tmp_path: Path) -> None:
    info = np.iinfo(np.int64)
    a = {"i": np.array([info.min, 0, 5]), "u": np.array([0, 2**64 - 1], np.uint64),
         "f": np.array([1.0, np.nan, np.inf, 2.0]), "g": np.array([np.nan, 1.0]),
         "c": np.array([1 + 1j, 2 - 2j]), "x": float("nan"), "big": 2**80}
    b = {"i": np.array([info.max, 0, 5]), "u": np.array([2**64 - 1, 2**64 - 1], np.uint64),
         "f": np.array([1.5, np.nan, np.inf, 2.0]), "g": np.array([2.0, 1.0]),
         "c": np.array([1 + 4j, 2 - 2j]), "x": 1.0, "big": 2**80 + 7}
    save(tmp_path, "t", a, b)
    diff = diff_steps("t", 1, 2, location=tmp_path)
    found = by_path(diff)
    assert found["state['i']"].max_abs_diff == 2**64 - 1  # no overflow, no float rounding
    assert found["state['u']"].max_abs_diff == 2**64 - 1
    assert found["state['f']"].max_abs_diff == 0.5  # nan == nan, inf == inf
    assert math.isnan(found["state['g']"].max_abs_diff)  # a nan against a number
    assert found["state['c']"].max_abs_diff == 3.0
    assert math.isnan(found["state['x']"].max_abs_diff)
    assert found["state['big']"].max_abs_diff == 7
    text = json.dumps(diff.to_json(), allow_nan=False)  # strict JSON
    assert '"max_abs_diff": "nan"' in text


def test_diff_of_bfloat16_arrays(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.arange(3000, dtype=np.float32).astype(ml_dtypes.bfloat16)
    b = a.copy()
    b[10] = ml_dtypes.bfloat16(100.0)  # was 10
    save(tmp_path, "t", {"h": a}, {"h": b})
    (leaf,) = diff_steps("t", 1, 2, location=tmp_path).leaves
    assert (leaf.a.dtype, leaf.changes, leaf.max_abs_diff) == ("bfloat16", ("data",), 90.0)


def test_diff_of_torch_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    a = {"h": torch.arange(3000, dtype=torch.bfloat16), "p": torch.nn.Parameter(torch.ones(4)),
         "g": torch.zeros(3)}
    b = {"h": torch.arange(3000, dtype=torch.bfloat16) * 2, "p": torch.ones(4),
         "g": torch.zeros(3, dtype=torch.int64)}
    save(tmp_path, "t", a, b)
    found = by_path(diff_steps("t", 1, 2, location=tmp_path))
    h = found["state['h']"]
    assert (h.a.type, h.a.dtype, h.changes) == ("torch.Tensor", "bfloat16", ("data",))
    assert h.max_abs_diff == 2992.0  # 2 * 2992 - 2992 with bfloat16 rounding of 5984
    p = found["state['p']"]  # a Parameter saved again as a plain tensor: same bytes
    assert (p.changes, p.max_abs_diff) == (("attrs",), 0.0)
    assert found["state['g']"].changes == ("dtype",)
    assert found["state['g']"].max_abs_diff == 0.0


def test_memory_order_alone_is_not_a_data_change(tmp_path: Path) -> None:
    c = np.arange(2000.0).reshape(40, 50)
    save(tmp_path, "t", {"m": c}, {"m": np.asfortranarray(c)})
    (leaf,) = diff_steps("t", 1, 2, location=tmp_path).leaves
    assert "order" in leaf.changes and leaf.max_abs_diff == 0.0


def _data_file(ckpt: Checkpointer, step: int, path: str) -> Path:
    manifest = ckpt.manifest(step)
    blob = next(b for b in manifest.blobs if b["path"] == path)
    rel = manifest.files[blob["ranges"][0][0]][0]
    return Path(ckpt.store.url) / ckpt.name / rel


def test_diff_reads_only_the_data_of_changed_leaves(tmp_path: Path) -> None:
    big = np.ones(1 << 20, np.float32)  # 4 MiB: a data file of its own
    ckpt = save(tmp_path, "t", {"big": big, "small": np.zeros(2000)},
                {"big": big, "small": np.full(2000, 0.5)})
    for step in (1, 2):
        _data_file(ckpt, step, "state['big']").unlink()  # never read: checksums decide
    (leaf,) = diff_steps("t", 1, 2, location=tmp_path).leaves
    assert (leaf.path, leaf.max_abs_diff) == ("state['small']", 0.5)
    for step in (1, 2):
        _data_file(ckpt, step, "state['small']").unlink()
    assert diff_steps("t", 1, 2, location=tmp_path, values=False).leaves[0].max_abs_diff is None
    with pytest.raises(CorruptCheckpoint, match="missing"):
        diff_steps("t", 1, 2, location=tmp_path)


def test_diff_verifies_what_it_reads(tmp_path: Path) -> None:
    ckpt = save(tmp_path, "t", {"x": np.zeros(5000)}, {"x": np.ones(5000)})
    path = _data_file(ckpt, 2, "state['x']")
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        diff_steps("t", 1, 2, location=tmp_path)


def test_diff_errors_name_what_is_missing(tmp_path: Path) -> None:
    save(tmp_path, "t", {"x": 1}, {"x": 2})
    with pytest.raises(CheckpointNotFound, match="no checkpoint named 'nope'"):
        diff_steps("nope", 1, 2, location=tmp_path)
    with pytest.raises(CheckpointNotFound, match=r"has no step 9 .* its steps are 1, 2"):
        diff_steps("t", 1, 9, location=tmp_path)
    with pytest.raises(InvalidName):
        diff_steps("t", -1, 2, location=tmp_path)
    assert not (tmp_path / "nope").exists()


# =========================================================================== export


def mixed_state() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "model": {"fc.weight": rng.standard_normal((64, 32)).astype(np.float32),
                  "fc.bias": rng.standard_normal(32).astype(np.float32)},
        "ids": np.arange(-5000, 5000, dtype=np.int64),
        "layers": [{"w": np.arange(6, dtype=np.float32).reshape(2, 3)}],
        "scale": np.float32(0.5),
        "step": 42,
        "lr": 1e-3,
        "done": False,
        "tag": "run-7",
    }


def test_format_follows_the_suffix_unless_given() -> None:
    assert export_format("a.npz") == "npz"
    assert export_format("a.SAFETENSORS") == "safetensors"
    assert export_format("a.pt") == export_format("a.pth") == "torch"
    assert export_format("weights.bin", "safetensors") == "safetensors"
    assert export_format("a.npz", "pt") == "torch"
    with pytest.raises(SafepointError, match="cannot tell the export format"):
        export_format("a.bin")
    with pytest.raises(SafepointError, match="unknown export format 'zip'"):
        export_format("a.npz", "zip")


def test_export_npz_round_trips_bit_exactly(tmp_path: Path) -> None:
    state = mixed_state()
    state["raw"] = b"\x00ab\x00"
    state["fortran"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    state["big_endian"] = np.arange(5, dtype=">i4")
    save(tmp_path / "s", "t", state)
    result = export_step("t", to=tmp_path / "out.npz", location=tmp_path / "s")
    assert (result.format, result.step, result.skipped) == ("npz", 1, [])
    assert result.size == (tmp_path / "out.npz").stat().st_size
    with np.load(tmp_path / "out.npz", allow_pickle=False) as data:
        loaded = dict(data)
    assert sorted(loaded) == sorted(["model.fc.weight", "model.fc.bias", "ids", "layers.0.w",
                                     "scale", "step", "lr", "done", "tag", "raw", "fortran",
                                     "big_endian"])
    assert same_bits(loaded["model.fc.weight"], state["model"]["fc.weight"])
    assert same_bits(loaded["ids"], state["ids"])
    assert same_bits(loaded["layers.0.w"], state["layers"][0]["w"])
    assert same_bits(loaded["scale"], np.asarray(np.float32(0.5)))
    assert same_bits(loaded["big_endian"], state["big_endian"])
    assert np.array_equal(loaded["fortran"], state["fortran"])
    assert loaded["step"].dtype == np.int64 and loaded["step"].item() == 42
    assert (loaded["lr"].item(), loaded["done"].item(), loaded["tag"].item()) == (1e-3, False, "run-7")
    assert loaded["raw"].tobytes() == b"\x00ab\x00"  # bytes as uint8, exactly
    entry = next(e for e in result.entries if e.key == "ids")
    assert (entry.path, entry.kind, entry.dtype, entry.shape, entry.nbytes) == (
        "state['ids']", "array", "int64", (10_000,), 80_000)


def test_export_safetensors_round_trips_bit_exactly(tmp_path: Path) -> None:
    st_numpy = pytest.importorskip("safetensors.numpy")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from safetensors import safe_open

    state = mixed_state()
    state["half"] = np.linspace(-3, 3, 5000, dtype=np.float32).astype(ml_dtypes.bfloat16)
    state["best"] = None
    state["fortran"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    save(tmp_path / "s", "t", state)
    result = export_step("t", to=tmp_path / "out.safetensors", location=tmp_path / "s")
    loaded = st_numpy.load_file(tmp_path / "out.safetensors")
    assert sorted(loaded) == sorted(["model.fc.weight", "model.fc.bias", "ids", "layers.0.w",
                                     "scale", "half", "fortran"])
    assert np.array_equal(loaded["fortran"], state["fortran"])
    assert same_bits(loaded["model.fc.weight"], state["model"]["fc.weight"])
    assert same_bits(loaded["ids"], state["ids"])
    assert same_bits(loaded["half"], state["half"])
    assert same_bits(loaded["scale"], np.asarray(np.float32(0.5)))
    with safe_open(tmp_path / "out.safetensors", "np") as f:
        metadata = f.metadata()
    assert {k: json.loads(v) for k, v in metadata.items()} == {
        "step": 42, "lr": 1e-3, "done": False, "tag": "run-7", "best": None}
    kinds = {e.key: e.kind for e in result.entries}
    assert kinds["half"] == "array" and kinds["best"] == "metadata"


def test_export_safetensors_loads_into_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    state = {"h": torch.randn(300, 7).to(torch.bfloat16), "f": torch.randn(50),
             "i": torch.arange(10, dtype=torch.int64), "w": np.arange(4, dtype=np.float32)}
    save(tmp_path / "s", "t", state)
    export_step("t", to=tmp_path / "m.safetensors", location=tmp_path / "s")
    loaded = st_torch.load_file(tmp_path / "m.safetensors")
    assert loaded["h"].dtype == torch.bfloat16
    assert torch.equal(loaded["h"].view(torch.int16), state["h"].view(torch.int16))
    assert torch.equal(loaded["f"], state["f"]) and torch.equal(loaded["i"], state["i"])
    assert torch.equal(loaded["w"], torch.from_numpy(state["w"]))


def test_export_torch_keeps_the_nesting_and_loads_with_weights_only(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[0].weight.data = model[0].weight.data  # keep float32
    state = mixed_state()
    state["net"] = model
    state["half"] = torch.randn(100).to(torch.bfloat16)
    state["np_half"] = np.arange(10, dtype=np.float32).astype(ml_dtypes.bfloat16)
    state["np_half_scalar"] = ml_dtypes.bfloat16(1.5)
    state["opt"] = {"state": {0: {"m": torch.ones(3)}}, "betas": (0.9, 0.999), "x": None}
    state["raw"] = b"\x01\x02"
    save(tmp_path / "s", "t", state)
    export_step("t", to=tmp_path / "out.pt", location=tmp_path / "s")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fresh.load_state_dict(loaded["net"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    weight = loaded["model"]["fc.weight"]
    assert weight.dtype == torch.float32
    assert weight.numpy().tobytes() == state["model"]["fc.weight"].tobytes()
    assert loaded["ids"].dtype == torch.int64 and torch.equal(loaded["ids"], torch.from_numpy(state["ids"]))
    assert loaded["half"].dtype == torch.bfloat16
    assert torch.equal(loaded["half"].view(torch.int16), state["half"].view(torch.int16))
    assert loaded["np_half"].dtype == torch.bfloat16
    assert loaded["np_half"].view(torch.int16).numpy().tobytes() == state["np_half"].tobytes()
    assert loaded["scale"].dtype == torch.float32 and loaded["scale"].shape == ()
    assert loaded["np_half_scalar"].dtype == torch.bfloat16 and loaded["np_half_scalar"].shape == ()
    assert loaded["np_half_scalar"].item() == 1.5
    assert (loaded["step"], loaded["lr"], loaded["done"], loaded["tag"]) == (42, 1e-3, False, "run-7")
    assert loaded["opt"]["betas"] == (0.9, 0.999) and loaded["opt"]["x"] is None
    assert torch.equal(loaded["opt"]["state"][0]["m"], torch.ones(3))
    assert loaded["raw"] == b"\x01\x02"


def test_export_picks_the_step_and_defaults_to_the_newest(tmp_path: Path) -> None:
    save(tmp_path / "s", "t", {"x": np.zeros(3)}, {"x": np.ones(3)})
    assert export_step("t", to=tmp_path / "new.npz", location=tmp_path / "s").step == 2
    assert np.load(tmp_path / "new.npz")["x"].tolist() == [1, 1, 1]
    assert export_step("t", step=1, to=tmp_path / "old.npz", location=tmp_path / "s").step == 1
    assert np.load(tmp_path / "old.npz")["x"].tolist() == [0, 0, 0]
    with pytest.raises(CheckpointNotFound, match=r"has no step 5 .* its steps are 1, 2"):
        export_step("t", step=5, to=tmp_path / "x.npz", location=tmp_path / "s")
    with pytest.raises(CheckpointNotFound, match="no checkpoint named 'nope'"):
        export_step("nope", to=tmp_path / "x.npz", location=tmp_path / "s")


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    save(tmp_path / "s", "t", {"x": np.zeros(3)})
    target = tmp_path / "out.npz"
    target.write_bytes(b"mine")
    with pytest.raises(SafepointError, match="exists; pass --force"):
        export_step("t", to=target, location=tmp_path / "s")
    assert target.read_bytes() == b"mine"
    export_step("t", to=target, location=tmp_path / "s", overwrite=True)
    assert np.load(target)["x"].tolist() == [0, 0, 0]
    with pytest.raises(SafepointError, match="does not exist"):
        export_step("t", to=tmp_path / "no" / "out.npz", location=tmp_path / "s")
    with pytest.raises(SafepointError, match="is a folder"):
        export_step("t", to=tmp_path, format="npz", location=tmp_path / "s")


@pytest.mark.parametrize(("suffix", "leaf", "why"), [
    (".npz", None, "not None"),
    (".npz", 2**70, "exactly as an array"),
    (".safetensors", b"raw", "not a bytes"),
    (".safetensors", np.zeros(3, np.complex128), "cannot hold a complex128 array"),
    (".safetensors", np.array(["a", "b"]), "cannot hold a str32 array"),
    (".pt", np.array(["a", "b"]), "cannot hold a str32 array"),
    (".pt", np.datetime64("2024-01-01"), "cannot hold a datetime64"),
])
def test_a_leaf_the_format_cannot_hold_is_refused_by_path(
        tmp_path: Path, suffix: str, leaf: Any, why: str) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    save(tmp_path / "s", "t", {"ok": np.zeros(3), "bad": {"leaf": leaf}})
    target = tmp_path / f"out{suffix}"
    with pytest.raises(SafepointError) as caught:
        export_step("t", to=target, location=tmp_path / "s")
    message = str(caught.value)
    assert message.startswith("state['bad']['leaf']: ") and why in message
    assert "--skip-unsupported" in message and "\n" not in message
    assert list(tmp_path.glob("*out*")) == []  # nothing written, no temporary file left
    result = export_step("t", to=target, location=tmp_path / "s", skip_unsupported=True)
    assert [p for p, _ in result.skipped] == ["state['bad']['leaf']"]
    assert [e.path for e in result.entries] == ["state['ok']"]


def test_bfloat16_is_refused_by_npz(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    save(tmp_path / "s", "t", {"h": np.zeros(3, ml_dtypes.bfloat16), "n": None, "m": None})
    with pytest.raises(SafepointError, match=r"state\['h'\]: an .npz file cannot record the "
                       r"dtype bfloat16.*\(2 more leaves cannot be written either: "
                       r"state\['n'\], state\['m'\]\); export to .safetensors or .pt"):
        export_step("t", to=tmp_path / "out.npz", location=tmp_path / "s")


def test_flat_keys_join_with_dots_and_collisions_are_refused(tmp_path: Path) -> None:
    save(tmp_path / "s", "t", {"a.b": np.zeros(1), "a": {"b": np.ones(1)}})
    with pytest.raises(SafepointError, match=r"state\['a.b'\] and state\['a'\]\['b'\] would "
                       "both be the key 'a.b'"):
        export_step("t", to=tmp_path / "out.npz", location=tmp_path / "s")
    save(tmp_path / "s", "keys", {(1, 2): np.zeros(1), 3: np.ones(1)})
    with pytest.raises(SafepointError, match=r"a dict key of type tuple \(\(1, 2\)\)"):
        export_step("keys", to=tmp_path / "k.npz", location=tmp_path / "s")
    result = export_step("keys", to=tmp_path / "k.npz", location=tmp_path / "s",
                         skip_unsupported=True)
    assert [e.key for e in result.entries] == ["3"]
    save(tmp_path / "s", "bare", np.arange(3))
    export_step("bare", to=tmp_path / "b.npz", location=tmp_path / "s")
    assert list(np.load(tmp_path / "b.npz")) == ["state"]


def test_empty_containers_are_listed_as_skipped_in_flat_formats(tmp_path: Path) -> None:
    save(tmp_path / "s", "t", {"x": np.zeros(2), "e": {}, "l": []})
    result = export_step("t", to=tmp_path / "out.npz", location=tmp_path / "s")
    assert [p for p, _ in result.skipped] == ["state['e']", "state['l']"]


def test_pickled_values_are_refused(tmp_path: Path) -> None:
    save(tmp_path / "s", "t", {"obj": {1, 2}}, allow_pickle=True)
    with pytest.raises(SafepointError, match=r"holds values stored with pickle \(state\['obj'\]\)"):
        export_step("t", to=tmp_path / "out.npz", location=tmp_path / "s")
