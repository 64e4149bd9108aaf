"""The torch leaf codec: bit-exact round trips of every dtype, and end to end via Checkpointer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safepoint.format._torch import CODECS  # noqa: E402  (needs torch)

CODEC = CODECS[0]
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def random_bits(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> Any:
    """A tensor of arbitrary bit patterns (NaNs and infinities included) of ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    count = int(np.prod(shape)) * dtype.itemsize
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (count,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        return raw.bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def round_trip(tensor: Any) -> Any:
    array, attrs = CODEC.to_numpy(tensor)
    assert isinstance(array, np.ndarray) and array.dtype.kind != "V"
    return CODEC.from_numpy(array, attrs)


def assert_bit_equal(restored: Any, original: Any) -> None:
    assert restored.dtype == original.dtype and restored.shape == original.shape
    assert torch.equal(_bytes(restored), _bytes(original))


def _bytes(tensor: Any) -> Any:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5)], ids=str)
def test_every_dtype_round_trips_bit_exactly(dtype: Any, shape: tuple[int, ...]) -> None:
    original = random_bits(shape, dtype)
    assert_bit_equal(round_trip(original), original)


def test_bfloat16_keeps_its_dtype_in_the_attributes() -> None:
    array, attrs = CODEC.to_numpy(torch.ones(2, dtype=torch.bfloat16))
    assert array.dtype == np.uint16
    assert attrs == {
        "dtype": "bfloat16",
        "device": "cpu",
        "requires_grad": False,
        "parameter": False,
    }


def test_cpu_tensors_are_stored_without_a_copy() -> None:
    tensor = torch.arange(6.0)
    array, _ = CODEC.to_numpy(tensor)
    assert array.ctypes.data == tensor.data_ptr()
    bf16 = torch.arange(6.0, dtype=torch.bfloat16)
    assert CODEC.to_numpy(bf16)[0].ctypes.data == bf16.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_tensors_keep_their_shape(dtype: Any) -> None:
    original = random_bits((6, 8), dtype)
    for view in (original.T, original[::2, 1::3], original.expand(2, 6, 8)):
        assert_bit_equal(round_trip(view), view)


def test_lazy_conj_and_neg_views_are_resolved() -> None:
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    assert torch.equal(round_trip(z.conj()), torch.tensor([1 - 2j, 3 + 4j]))
    assert torch.equal(round_trip(z.conj().imag), torch.tensor([-2.0, 4.0]))


def test_requires_grad_and_parameters_come_back() -> None:
    weight = torch.nn.Parameter(torch.randn(3))
    restored = round_trip(weight)
    assert isinstance(restored, torch.nn.Parameter) and restored.requires_grad
    assert torch.equal(restored, weight)
    frozen = round_trip(torch.nn.Parameter(torch.randn(2), requires_grad=False))
    assert isinstance(frozen, torch.nn.Parameter) and not frozen.requires_grad
    grad = round_trip(torch.randn(2, requires_grad=True))
    assert type(grad) is torch.Tensor and grad.requires_grad and grad.is_leaf


def test_read_only_arrays_are_copied_and_writable_ones_are_shared() -> None:
    array, attrs = CODEC.to_numpy(torch.arange(4.0))
    array = array.copy()
    shared = CODEC.from_numpy(array, attrs)
    assert shared.data_ptr() == array.ctypes.data
    array.setflags(write=False)
    copied = CODEC.from_numpy(array, attrs)
    assert copied.data_ptr() != array.ctypes.data
    copied.add_(1)  # writable, and the stored array is unchanged
    assert array.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_an_unknown_dtype_name_is_reported_as_damage() -> None:
    from safepoint.errors import CorruptCheckpoint

    with pytest.raises(CorruptCheckpoint, match="unknown dtype 'load'"):
        CODEC.from_numpy(np.zeros(2, np.uint8), {"dtype": "load"})


def test_sparse_tensors_are_refused_with_advice() -> None:
    from safepoint.errors import UnsupportedType

    with pytest.raises(UnsupportedType, match="to_dense"):
        CODEC.to_numpy(torch.eye(3).to_sparse())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_saved_from_the_host_and_load_on_the_cpu() -> None:
    original = random_bits((4, 4), torch.bfloat16).cuda()
    array, attrs = CODEC.to_numpy(original)
    assert attrs["device"].startswith("cuda")
    restored = CODEC.from_numpy(array, attrs)
    assert restored.device.type == "cpu"
    assert_bit_equal(restored, original.cpu())


def test_end_to_end_through_the_checkpointer(tmp_path: Path) -> None:
    checkpointer_module = pytest.importorskip("safepoint.checkpointer")
    from safepoint.data import BatchIterator
    from safepoint.stateful import GlobalRNG

    def make() -> dict[str, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)).bfloat16()
        return {
            "model": model,
            "optimizer": torch.optim.AdamW(model.parameters(), lr=0.1),
            "data": BatchIterator(torch.randn(40, 4).bfloat16(), 8, shuffle=True, epochs=3),
            "generator": torch.Generator().manual_seed(5),
            "rng": GlobalRNG(),
            "step": 0,
        }

    def train(live: dict[str, Any], steps: int) -> list[Any]:
        losses = []
        for _ in range(steps):
            batch = torch.stack(list(next(live["data"])))
            noise = torch.rand(1, generator=live["generator"]).bfloat16() + torch.rand(1).bfloat16()
            loss = (live["model"](batch) + noise).square().mean()
            live["optimizer"].zero_grad()
            loss.backward()
            live["optimizer"].step()
            live["step"] += 1
            losses.append(loss.detach())
        return losses

    uninterrupted = make()
    expected = train(uninterrupted, 12)

    first = make()
    losses = train(first, 5)
    checkpointer = checkpointer_module.Checkpointer("train", location=str(tmp_path))
    checkpointer.save(first["step"], first, metadata={"loss": float(losses[-1])})

    for mmap in (False, True):
        resumed = make()
        torch.manual_seed(123)  # the global RNG moved on: restoring must put it back
        restored = checkpointer.restore(into=resumed, mmap=mmap)
        assert restored.step == 5 and restored.metadata == {"loss": float(losses[-1])}
        live = restored.state
        assert live["model"] is resumed["model"] and live["step"] == 5
        remaining = train(live, 7)
        for got, want in zip(losses + remaining, expected, strict=True):
            assert_bit_equal(got, want)
        for got, want in zip(
            live["model"].parameters(), uninterrupted["model"].parameters(), strict=True
        ):
            assert got.dtype == torch.bfloat16
            assert_bit_equal(got.detach(), want.detach())

    plain = checkpointer.restore().state  # without a target: a plain tree of tensors
    weight = plain["model"]["0.weight"]
    assert weight.dtype == torch.bfloat16 and weight.shape == (8, 4)


def test_restore_into_a_live_model_fills_its_tensors_in_place(tmp_path: Path) -> None:
    from safepoint import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).to(torch.bfloat16)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer("m", location=tmp_path)
    ckpt.save(1, {"model": model})

    fresh = torch.nn.Linear(64, 32).to(torch.bfloat16)
    pointers = {k: v.data_ptr() for k, v in fresh.state_dict().items()}
    ckpt.restore(into={"model": fresh})

    for key, value in fresh.state_dict().items():
        assert value.data_ptr() == pointers[key]  # same memory: read in place
        assert_bit_equal(value, saved[key])


def test_a_target_of_another_dtype_or_shape_is_refused(tmp_path: Path) -> None:
    from safepoint import Checkpointer, StateMismatch

    # bfloat16 is stored through a uint16 carrier: a uint16 target must not receive its bits.
    original = random_bits((100,), torch.bfloat16)
    ckpt = Checkpointer("m", location=tmp_path)
    ckpt.save(1, {"t": original})
    for wrong in (torch.zeros(100, dtype=torch.uint16), torch.zeros(99, dtype=torch.bfloat16)):
        with pytest.raises(StateMismatch, match=r"state\['t'\]"):
            ckpt.restore(into={"t": wrong})
        assert not wrong.any()
    restored = ckpt.restore(into={"t": torch.zeros(100, dtype=torch.bfloat16)}).state["t"]
    assert_bit_equal(restored, original)


def test_a_fork_snapshot_refuses_a_tensor_off_the_cpu(tmp_path: Path) -> None:
    """snapshot="fork" shares host pages only: a tensor on another device (here "meta"; a
    CUDA tensor alike) is refused before anything is forked, naming its path."""
    from safepoint import Checkpointer
    from safepoint.errors import UnsupportedType

    ckpt = Checkpointer("job", location=tmp_path, snapshot="fork")
    state = {"cpu": torch.arange(10_000, dtype=torch.float32),
             "model": {"w": torch.empty(10_000, device="meta")}}
    with pytest.raises(UnsupportedType, match=r"state\['model'\]\['w'\]: a torch.Tensor on meta; "
                                              r"snapshot='fork' saves host memory only.*"
                                              r"snapshot='copy'"):
        ckpt.save(1, state, blocking=False)
    assert ckpt.steps() == []
    ckpt.save(1, {"cpu": state["cpu"]}, blocking=False).wait()  # CPU tensors: shared pages
    assert torch.equal(ckpt.restore().state["cpu"], state["cpu"])
