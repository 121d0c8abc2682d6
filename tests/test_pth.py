"""Tests for rwkv_ray.pth: torch-free .pth loading/saving, checked against real torch."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from rwkv_ray.pth import CheckpointFormatError, UnsafeCheckpointError, load_pth, save_pth

torch = pytest.importorskip("torch")

# torch dtypes numpy cannot hold natively: compare them through same-width integer bits.
_VIA_BITS = {
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
}


def to_numpy(t) -> np.ndarray:
    """Exact numpy copy of a torch tensor, same dtype and shape."""
    t = t.detach().contiguous()
    if t.dtype in _VIA_BITS:
        int_dtype, np_dtype = _VIA_BITS[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype)
    return t.numpy().copy()


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-exact equality (NaNs, -0.0 included) with matching dtype and shape."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    as_bits = np.dtype(f"u{want.dtype.itemsize}") if want.dtype.kind != "c" else want.dtype
    assert np.array_equal(got.view(as_bits), want.view(as_bits))


def torch_state_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40, -3.0])
    return {
        "f32": torch.randn(5, 32, 64, generator=g),
        "bf16": torch.randn(1, 1, 64, generator=g).bfloat16(),
        "bf16_special": special.bfloat16(),
        "f16": torch.randn(7, 3, generator=g).half(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.randint(-(2**40), 2**40, (4, 5), generator=g),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(-1.5),
        "bf16_scalar": torch.tensor(3.25, dtype=torch.bfloat16),
        "empty": torch.zeros(2, 0, 3),
        "base": base,
        "transposed": base.t(),  # non-contiguous view of base's storage
        "sliced": base[2:, 3:],  # storage offset, non-contiguous, same storage again
        "u16": torch.arange(5).to(torch.uint16),  # pickled via _rebuild_tensor_v3
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }


def check_against_torch(got: dict[str, np.ndarray], want: dict) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert_same(got[name], to_numpy(tensor))


def test_torch_save_then_load_pth(tmp_path: Path) -> None:
    sd = torch_state_dict()
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    got = load_pth(path)
    check_against_torch(got, sd)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())
    got["transposed"][0, 0] = 123.0  # shared torch storage -> independent numpy copies
    assert got["base"][0, 0] != 123.0


def test_module_state_dict_and_parameters(tmp_path: Path) -> None:
    # A real nn.Module state dict is an OrderedDict carrying a `_metadata` attribute (BUILD op).
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    sd = module.state_dict()
    torch.save(sd, tmp_path / "m.pth")
    check_against_torch(load_pth(tmp_path / "m.pth"), sd)
    params = dict(module.named_parameters())  # pickled via torch._utils._rebuild_parameter
    torch.save(params, tmp_path / "p.pth")
    check_against_torch(load_pth(tmp_path / "p.pth"), params)


def test_save_pth_then_torch_load(tmp_path: Path) -> None:
    sd = torch_state_dict()
    arrays = {name: to_numpy(t) for name, t in sd.items()}
    path = tmp_path / "out.pth"
    save_pth(arrays, path)
    for mmap in (False, True):  # mmap=True relies on the 64-byte payload alignment
        back = torch.load(path, weights_only=True, mmap=mmap)
        assert list(back) == list(arrays)
        for name, tensor in back.items():
            assert tensor.dtype == sd[name].dtype
            assert_same(to_numpy(tensor), arrays[name])


def test_save_pth_then_load_pth(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {name: to_numpy(t) for name, t in torch_state_dict().items()}
    arrays |= {
        "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "big_endian": np.arange(4, dtype=">f4"),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
        "np_scalar": np.float16(2.5),
    }
    save_pth(arrays, tmp_path / "x.pth")
    got = load_pth(tmp_path / "x.pth")
    assert list(got) == list(arrays)
    for name, want in arrays.items():
        want = np.asarray(want)
        assert_same(got[name], want.astype(want.dtype.newbyteorder("<")))


def test_save_pth_layout(tmp_path: Path) -> None:
    path = tmp_path / "my-model.v1.pth"
    save_pth({"a": np.ones(3, np.float32), "b": np.zeros((2, 2), ml_dtypes.bfloat16)}, path)
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        names = zf.namelist()
        assert names[0] == "my-model.v1/data.pkl"
        assert {"my-model.v1/byteorder", "my-model.v1/data/0", "my-model.v1/data/1"} <= set(names)
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind


def _rezip(src: bytes, dest: Path, prefix: str, byteswap: dict[str, int] | None = None) -> None:
    """Copy a torch zip under a new record prefix, optionally rewriting it as big-endian."""
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            rest = info.filename.split("/", 1)[1]
            data = zin.read(info)
            if byteswap is not None and rest == "byteorder":
                data = b"big"
            elif byteswap is not None and rest.startswith("data/"):
                itemsize = byteswap[rest.removeprefix("data/")]
                data = np.frombuffer(data, np.uint8).reshape(-1, itemsize)[:, ::-1].tobytes()
            zout.writestr(f"{prefix}/{rest}", data)


@pytest.mark.parametrize("prefix", ["archive", "RWKV-x060-World-1B6-v2.1-20240328-ctx4096", "x"])
def test_load_pth_any_archive_prefix(tmp_path: Path, prefix: str) -> None:
    sd = {"w": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    buf = io.BytesIO()
    torch.save(sd, buf)  # in-memory saves use the prefix "archive"
    _rezip(buf.getvalue(), tmp_path / "ckpt.pth", prefix)
    check_against_torch(load_pth(tmp_path / "ckpt.pth"), sd)


def test_load_big_endian_checkpoint(tmp_path: Path) -> None:
    sd = {
        "f32": torch.randn(2, 3),  # storage 0
        "bf16": torch.randn(4).bfloat16(),  # storage 1
        "c64": torch.randn(2, dtype=torch.complex64),  # storage 2: swap each float32 half
        "i64": torch.arange(3),  # storage 3
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    path = tmp_path / "big.pth"
    _rezip(buf.getvalue(), path, "archive", byteswap={"0": 4, "1": 2, "2": 4, "3": 8})
    check_against_torch(load_pth(path), sd)
    check_against_torch({k: to_numpy(v) for k, v in torch.load(path).items()}, sd)  # oracle


# --- malicious and broken files ----------------------------------------------------------------


class _Evil:
    """Pickles as a call of `fn(arg)`, the classic pickle code-execution payload."""

    def __init__(self, fn, arg: str):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _write_zip_checkpoint(path: Path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")


# name -> (callable, argument template, regex of the global as the pickle names it; protocol 2
# writes builtins as "__builtin__" for Python 2 compatibility)
_PAYLOADS = {
    "os.system": (os.system, "touch {marker}", r"posix\.system"),
    "exec": (exec, "open({marker!r}, 'w').close()", r"(builtins|__builtin__)\.exec"),
}


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("payload", list(_PAYLOADS))
def test_malicious_zip_checkpoint_is_refused(tmp_path: Path, payload: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    fn, template, global_re = _PAYLOADS[payload]
    pkl = pickle.dumps({"w": _Evil(fn, template.format(marker=str(marker)))}, protocol=protocol)
    path = tmp_path / "evil.pth"
    _write_zip_checkpoint(path, pkl)
    with pytest.raises(UnsafeCheckpointError, match=global_re) as info:
        load_pth(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()
    pickle.loads(pkl)  # control: the payload is live when unpickled without restrictions
    assert marker.exists()


def test_unlisted_torch_global_is_refused(tmp_path: Path) -> None:
    # torch.load("abc") via GLOBAL + REDUCE: inside the torch namespace but not allow-listed.
    pkl = b"\x80\x02ctorch\nload\nX\x03\x00\x00\x00abc\x85R."
    _write_zip_checkpoint(tmp_path / "t.pth", pkl)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.load"):
        load_pth(tmp_path / "t.pth")


def _build_payloads() -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(buf) as zf:
        tensor_pkl = zf.read("archive/data.pkl")
    assert tensor_pkl.endswith(b"s.")  # ... REDUCE (the tensor) [BINPUT] SETITEM STOP
    neg_offset = b"}X\x06\x00\x00\x00offsetJ\xff\xff\xff\xffsb"  # BUILD {"offset": -1}
    return {
        # BUILD {"__defaults__": None} on the shared allow-listed rebuild function
        "rebuild_fn": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
        + b"}X\x0c\x00\x00\x00__defaults__Nsb.",
        "storage_class": b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeNsb.",
        "tensor": tensor_pkl[:-2] + neg_offset + b"s.",
    }


@pytest.mark.parametrize("target", ["rebuild_fn", "storage_class", "tensor"])
def test_build_cannot_patch_objects(tmp_path: Path, target: str) -> None:
    # A frozen slotted dataclass would accept BUILD via its generated __setstate__.
    _write_zip_checkpoint(tmp_path / "b.pth", _build_payloads()[target])
    with pytest.raises(CheckpointFormatError, match="set the state"):
        load_pth(tmp_path / "b.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")  # shared state is still intact
    assert_same(load_pth(tmp_path / "ok.pth")["w"], np.ones(2, np.float32))


def test_plain_pickle_file_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": _Evil(os.system, f"touch {marker}")}))
    with pytest.raises(CheckpointFormatError, match="not a zip archive"):
        load_pth(path)
    assert not marker.exists()


def test_legacy_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy.*re-save"):
        load_pth(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pth(tmp_path / "nope.pth")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointFormatError, match="not a zip archive") as info:
        load_pth(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointFormatError, match="truncated") as info:
        load_pth(path)
    assert str(path) in str(info.value)


def test_corrupt_storage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "flip.pth"
    torch.save({"w": torch.zeros(256)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:  # flip one payload byte: the CRC check must catch it
        info = zf.getinfo("flip/data/0")
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="CRC"):
        load_pth(path)


def test_tensor_overrunning_its_storage(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(buf) as zf:
        pkl = zf.read("archive/data.pkl")
    assert pkl.count(b"K\x04\x85") == 1  # the size tuple (4,)
    _write_zip_checkpoint(tmp_path / "o.pth", pkl.replace(b"K\x04\x85", b"K\x05\x85"))
    with zipfile.ZipFile(tmp_path / "o.pth", "a") as zf:
        zf.writestr("archive/data/0", bytes(16))
    with pytest.raises(CheckpointFormatError, match="overruns"):
        load_pth(tmp_path / "o.pth")


_NOT_FLAT = {
    "nested": lambda: {"model": {"w": torch.ones(2)}},
    "list": lambda: [torch.ones(2)],
    "int_value": lambda: {"w": torch.ones(2), "step": 3},
    "int_key": lambda: {3: torch.ones(2)},
}


@pytest.mark.parametrize("kind", list(_NOT_FLAT))
def test_not_a_flat_state_dict(tmp_path: Path, kind: str) -> None:
    torch.save(_NOT_FLAT[kind](), tmp_path / "n.pth")
    with pytest.raises(CheckpointFormatError, match="state dict|not a tensor|not a str") as info:
        load_pth(tmp_path / "n.pth")
    assert str(tmp_path / "n.pth") in str(info.value)


def test_save_pth_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'s'.*<U3"):
        save_pth({"s": np.array(["abc"])}, tmp_path / "a.pth")
    with pytest.raises(TypeError, match="keys must be str"):
        save_pth({1: np.ones(2)}, tmp_path / "a.pth")
    with pytest.raises(FileNotFoundError, match="missing"):
        save_pth({"w": np.ones(2)}, tmp_path / "missing" / "a.pth")
    assert os.listdir(tmp_path) == []
