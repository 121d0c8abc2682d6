"""Read and write PyTorch ``.pth`` state-dict checkpoints safely, without importing torch.

Official RWKV checkpoints are ``torch.save(state_dict)`` files in torch's zip format::

    <prefix>/data.pkl     pickle of the dict; tensors reference storages by persistent id
    <prefix>/data/<key>   raw storage bytes (little-endian unless <prefix>/byteorder says "big")
    <prefix>/byteorder, <prefix>/version, ...

``<prefix>`` is whatever torch chose (the file stem, or ``archive``); torch itself takes it from
the first entry, and so do we.

Loading never runs code from the file: ``data.pkl`` goes through a restricted unpickler whose
``find_class`` resolves only the globals a state dict needs (``collections.OrderedDict``, the
``torch._utils._rebuild_*`` tensor builders, torch storage classes and dtypes), each mapped to a
harmless local stand-in. Any other global raises :class:`UnsafeCheckpointError` before it can be
called. Tensors are first collected as references and only materialised with numpy once the whole
pickle has been checked, one storage at a time (peak memory: the result plus one storage).

Saving is torch-free too: :func:`save_pth` emits the handful of protocol-2 pickle opcodes torch
itself writes (``_rebuild_tensor_v2`` over typed storages, ``_rebuild_tensor_v3`` for dtypes that
have no legacy storage class) and lays the zip out like torch's writer (stored entries, payloads
64-byte aligned), so ``torch.load(path, weights_only=True)`` reads it back exactly.

The legacy pre-1.6 (non-zip) torch format is detected and refused with a hint to re-save it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "load_pth", "save_pth"]

PathLike = str | os.PathLike[str]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the state-dict allow-list."""


class CheckpointFormatError(ValueError):
    """The file is not a readable torch zip checkpoint holding a flat ``str -> tensor`` dict."""


def _refuse_build(self: Any, state: Any) -> None:
    raise CheckpointFormatError(f"pickle tried to set the state of a {type(self).__name__}")


def _sealed(cls: type) -> type:
    """Make the pickle BUILD opcode fail on instances of a frozen, slotted dataclass.

    Such dataclasses get a ``__setstate__`` that assigns fields with ``object.__setattr__``, so a
    crafted BUILD could rewrite a validated tensor reference or, worse, one of the shared
    allow-list objects below for every later load. Ours refuses instead.
    """
    cls.__setstate__ = _refuse_build
    return cls


@_sealed
@dataclass(frozen=True, slots=True)
class _DType:
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"
    storage: str | None  # legacy typed-storage class, e.g. "BFloat16Storage" (None: v3 only)
    np_dtype: np.dtype


_DTYPES = (
    _DType("float64", "DoubleStorage", np.dtype("<f8")),
    _DType("float32", "FloatStorage", np.dtype("<f4")),
    _DType("float16", "HalfStorage", np.dtype("<f2")),
    _DType("bfloat16", "BFloat16Storage", np.dtype(ml_dtypes.bfloat16)),
    _DType("int64", "LongStorage", np.dtype("<i8")),
    _DType("int32", "IntStorage", np.dtype("<i4")),
    _DType("int16", "ShortStorage", np.dtype("<i2")),
    _DType("int8", "CharStorage", np.dtype("i1")),
    _DType("uint8", "ByteStorage", np.dtype("u1")),
    _DType("bool", "BoolStorage", np.dtype("?")),
    _DType("complex64", "ComplexFloatStorage", np.dtype("<c8")),
    _DType("complex128", "ComplexDoubleStorage", np.dtype("<c16")),
    # Newer dtypes without a legacy storage class: torch pickles them with _rebuild_tensor_v3.
    _DType("uint16", None, np.dtype("<u2")),
    _DType("uint32", None, np.dtype("<u4")),
    _DType("uint64", None, np.dtype("<u8")),
    _DType("float8_e4m3fn", None, np.dtype(ml_dtypes.float8_e4m3fn)),
    _DType("float8_e5m2", None, np.dtype(ml_dtypes.float8_e5m2)),
)
_BY_TORCH_NAME = {d.torch_name: d for d in _DTYPES}
_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64"}
_ALIASES |= {"int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}
_BY_TORCH_NAME |= {alias: _BY_TORCH_NAME[name] for alias, name in _ALIASES.items()}
_BY_STORAGE = {d.storage: d for d in _DTYPES if d.storage}
_BY_NUMPY = {d.np_dtype: d for d in _DTYPES}
_UNTYPED = "UntypedStorage"  # raw bytes; the tensor's dtype comes from _rebuild_tensor_v3

# Legacy (torch < 1.6) files start with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ALIGN = 64  # torch aligns every record's payload to 64 bytes (lets torch.load(mmap=True) work)
# Above this size a record's local header gets a zip64 extra field. zipfile decides this itself
# for sizes > ~2 GB; forcing it from 1 GiB keeps our alignment arithmetic independent of that rule.
_ZIP64_FROM = 1 << 30


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@_sealed
@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    nbytes: int
    dtype: _DType | None  # None for an untyped (byte) storage


@_sealed
@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _StorageRef
    dtype: _DType
    offset: int  # in elements of dtype, like size and stride
    size: tuple[int, ...]
    stride: tuple[int, ...]
    neg: bool = False
    conj: bool = False


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of ints >= 0, got {value!r}")
    return tuple(value)


def _rebuild(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: Any, meta: Any
) -> _TensorRef:
    """Validate one tensor's layout; it is materialised after the whole pickle is checked."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointFormatError(f"tensor storage must be a storage, got {type(storage)}")
    if dtype is None:
        dtype = storage.dtype or _BY_TORCH_NAME["uint8"]  # torch: untyped storage -> uint8
    if not isinstance(dtype, _DType):
        raise CheckpointFormatError(f"tensor dtype must be a torch dtype, got {dtype!r}")
    if type(offset) is not int or offset < 0:
        raise CheckpointFormatError(f"tensor storage offset must be an int >= 0, got {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointFormatError(f"tensor size {size} and stride {stride} differ in rank")
    if meta and not (isinstance(meta, dict) and set(meta) <= {"neg", "conj"}):
        raise CheckpointFormatError(f"unsupported tensor metadata {meta!r}")
    meta = meta or {}
    return _TensorRef(
        storage, dtype, offset, size, stride, bool(meta.get("neg")), bool(meta.get("conj"))
    )


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, meta=None):
    return _rebuild(storage, storage_offset, size, stride, None, meta)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, hooks, dtype, meta=None
):
    return _rebuild(storage, storage_offset, size, stride, dtype, meta)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # An nn.Parameter is just its tensor for our purposes.
    if not isinstance(data, _TensorRef):
        raise CheckpointFormatError(f"parameter data must be a tensor, got {type(data)}")
    return data


@_sealed
@dataclass(frozen=True, slots=True)
class _StorageClass:
    """Stand-in for a torch storage class named in a persistent id."""

    dtype: _DType | None


@_sealed
@dataclass(frozen=True, slots=True)
class _Builder:
    """Sealed handle on a local rebuild function.

    find_class results are shared module state, and a BUILD opcode applied to a plain function
    could set its attributes (e.g. ``__defaults__``) for every later load.
    """

    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Builder(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Builder(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Builder(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Builder(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Builder(_rebuild_parameter),
    ("torch", _UNTYPED): _StorageClass(None),
    ("torch.storage", _UNTYPED): _StorageClass(None),
}
_ALLOWED |= {("torch", name): _StorageClass(d) for name, d in _BY_STORAGE.items()}
_ALLOWED |= {("torch", name): d for name, d in _BY_TORCH_NAME.items()}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage persistent ids."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self._source = source
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Called for GLOBAL/STACK_GLOBAL/INST/OBJ/EXT*, i.e. before anything can be invoked.
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global {module}.{name}; a state-dict checkpoint "
                "only needs tensors (the file may be malicious or not a plain state dict)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # torch: ("storage", storage_class, key, location, numel[elements of the class dtype])
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointFormatError(f"{self._source}: unsupported persistent id {pid!r}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if isinstance(kind, _DType):  # tolerate a bare dtype in place of the storage class
            kind = _StorageClass(kind)
        if not isinstance(kind, _StorageClass) or not isinstance(key, str):
            raise CheckpointFormatError(f"{self._source}: bad storage reference {pid!r}")
        if type(numel) is not int or numel < 0:
            raise CheckpointFormatError(f"{self._source}: bad storage size in {pid!r}")
        itemsize = kind.dtype.np_dtype.itemsize if kind.dtype else 1
        ref = _StorageRef(key, numel * itemsize, kind.dtype)
        if self._storages.setdefault(key, ref) != ref:
            raise CheckpointFormatError(f"{self._source}: storage {key!r} declared inconsistently")
        return ref


def _open_zip(path: PathLike) -> tuple[zipfile.ZipFile, str]:
    """Open ``path`` as a torch zip checkpoint; return the archive and its record prefix."""
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(2, "no such .pth checkpoint", source)
    with open(source, "rb") as f:
        head = f.read(64)
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile as e:
        if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
            raise CheckpointFormatError(
                f"{source}: legacy (torch < 1.6, non-zip) checkpoint format is not supported; "
                "re-save it with torch >= 1.6: torch.save(torch.load(f), f)"
            ) from None
        why = "truncated or corrupt zip archive" if head.startswith(b"PK") else "not a zip archive"
        raise CheckpointFormatError(f"{source}: not a torch zip checkpoint ({why}: {e})") from None
    names = zf.namelist()
    prefix = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
    if f"{prefix}/data.pkl" not in names:
        zf.close()
        raise CheckpointFormatError(f"{source}: zip archive has no <prefix>/data.pkl record")
    return zf, prefix


def _read(zf: zipfile.ZipFile, name: str, source: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise CheckpointFormatError(f"{source}: missing record {name}") from None
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as e:
        raise CheckpointFormatError(f"{source}: cannot read record {name} ({e})") from None


def _check_state_dict(obj: Any, source: str) -> dict[str, _TensorRef]:
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"{source}: expected a state dict (mapping of str to tensors), got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{source}: state dict key {key!r} is not a str")
        if not isinstance(value, _TensorRef):
            kind = "storage" if isinstance(value, _StorageRef) else type(value).__name__
            raise CheckpointFormatError(
                f"{source}: value of {key!r} is a {kind}, not a tensor; only flat str -> tensor "
                "state dicts are supported (unwrap nested dicts such as {'state_dict': ...})"
            )
    return dict(obj)


def _to_array(raw: bytes, ref: _TensorRef, big_endian: bool, source: str) -> np.ndarray:
    """Copy one tensor out of its storage bytes, honouring offset, size and stride."""
    dt = ref.dtype.np_dtype
    count = len(raw) // dt.itemsize
    if any(n == 0 for n in ref.size):
        return np.zeros(ref.size, dt)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= count:  # also what keeps as_strided from reading outside the buffer
        raise CheckpointFormatError(
            f"{source}: tensor (offset {ref.offset}, size {ref.size}, stride {ref.stride}) "
            f"overruns its storage of {count} elements"
        )
    if big_endian and dt.itemsize > 1:
        unit = dt.itemsize // 2 if dt.kind == "c" else dt.itemsize  # complex: swap each part
        raw = (
            np.frombuffer(raw, np.uint8)[: count * dt.itemsize].reshape(-1, unit)[:, ::-1].tobytes()
        )
    flat = np.frombuffer(raw, dt, count=count)[ref.offset :]
    strides = tuple(s * dt.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat, ref.size, strides, writeable=False)
    arr = np.array(view, order="C")  # own, writable, contiguous copy
    if ref.neg:
        arr = np.negative(arr)
    if ref.conj:
        arr = np.conj(arr)
    return arr


def load_pth(path: PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save(state_dict)`` checkpoint as ``{name: numpy array}`` without torch.

    Tensors come back as C-contiguous arrays of the same dtype (bf16 as ``ml_dtypes.bfloat16``);
    tensors sharing a storage become independent copies. Raises ``FileNotFoundError`` for a
    missing file, :class:`UnsafeCheckpointError` if the pickle references any global beyond what a
    state dict needs (nothing from the file is executed), and :class:`CheckpointFormatError` for
    non-zip, truncated, legacy-format or non-state-dict files. Messages name the file.
    """
    source = os.fspath(path)
    zf, prefix = _open_zip(path)
    with zf:
        pkl = _read(zf, f"{prefix}/data.pkl", source)
        try:
            obj = _RestrictedUnpickler(pkl, source).load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as e:  # malformed pickle stream: EOFError, UnpicklingError, TypeError...
            raise CheckpointFormatError(f"{source}: corrupt data.pkl ({e!r})") from None
        refs = _check_state_dict(obj, source)
        order = b"little"
        if f"{prefix}/byteorder" in zf.namelist():
            order = _read(zf, f"{prefix}/byteorder", source).strip()
            if order not in (b"little", b"big"):
                raise CheckpointFormatError(f"{source}: unknown byteorder {order!r}")
        by_storage: dict[str, list[str]] = {}
        for name, ref in refs.items():
            by_storage.setdefault(ref.storage.key, []).append(name)
        out: dict[str, np.ndarray] = {}
        for key, names in by_storage.items():  # one storage in memory at a time
            raw = _read(zf, f"{prefix}/data/{key}", source)
            if len(raw) != refs[names[0]].storage.nbytes:
                raise CheckpointFormatError(
                    f"{source}: storage {key} has {len(raw)} bytes, "
                    f"expected {refs[names[0]].storage.nbytes}"
                )
            for name in names:
                out[name] = _to_array(raw, refs[name], order == b"big", source)
    return {name: out[name] for name in refs}


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

# Protocol-2 opcodes, as named in the stdlib's pickle.py.
_PROTO2, _MARK, _TUPLE, _EMPTY_TUPLE, _EMPTY_DICT = b"\x80\x02", b"(", b"t", b")", b"}"
_SETITEM, _REDUCE, _BINPERSID, _NEWFALSE, _STOP = b"s", b"R", b"Q", b"\x89", b"."


def _p_global(module: str, name: str) -> bytes:
    # Emitted by hand: the stdlib Pickler can only name a global it can import, i.e. real torch.
    return b"c" + f"{module}\n{name}\n".encode()


def _p_str(s: str) -> bytes:
    data = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _p_int(v: int) -> bytes:
    if 0 <= v < 1 << 8:
        return b"K" + bytes([v])
    if 0 <= v < 1 << 16:
        return b"M" + struct.pack("<H", v)
    if -(1 << 31) <= v < 1 << 31:
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8  # LONG1: two's complement, room for the sign bit
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _p_ints(values: tuple[int, ...]) -> bytes:
    return _MARK + b"".join(_p_int(v) for v in values) + _TUPLE


def _pickle_tensor(key: str, dtype: _DType, shape: tuple[int, ...]) -> bytes:
    """Pickle a contiguous tensor over storage ``key`` exactly as ``torch.save`` does."""
    numel = math.prod(shape)
    # Contiguous strides as torch computes them (a 0-length dim counts as 1).
    stride = tuple(math.prod(max(n, 1) for n in shape[i + 1 :]) for i in range(len(shape)))
    if dtype.storage:  # typed storage: _rebuild_tensor_v2, storage numel in elements
        builder, storage_class, extra = "_rebuild_tensor_v2", ("torch", dtype.storage), b""
    else:  # no legacy storage class: byte storage + explicit dtype via _rebuild_tensor_v3
        builder, storage_class = "_rebuild_tensor_v3", ("torch.storage", _UNTYPED)
        numel, extra = numel * dtype.np_dtype.itemsize, _p_global("torch", dtype.torch_name)
    pid = _MARK + _p_str("storage") + _p_global(*storage_class) + _p_str(key) + _p_str("cpu")
    pid += _p_int(numel) + _TUPLE + _BINPERSID
    hooks = _p_global("collections", "OrderedDict") + _EMPTY_TUPLE + _REDUCE
    args = pid + _p_int(0) + _p_ints(shape) + _p_ints(stride) + _NEWFALSE + hooks + extra
    return _p_global("torch._utils", builder) + _MARK + args + _TUPLE + _REDUCE


def _prepare(state_dict: Mapping[str, Any]) -> list[tuple[str, _DType, np.ndarray]]:
    """Check keys/dtypes; return (name, dtype, C-contiguous little-endian array) triples."""
    out = []
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be str, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        dtype = _BY_NUMPY.get(arr.dtype)
        if dtype is None:
            supported = ", ".join(str(d.np_dtype) for d in _DTYPES)
            raise TypeError(f"{name!r}: dtype {arr.dtype} has no torch equivalent ({supported})")
        # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
        out.append((name, dtype, arr if arr.flags.c_contiguous else arr.copy(order="C")))
    return out


def _write_record(zf: zipfile.ZipFile, f: io.BufferedWriter, name: str, data: Any) -> None:
    """Write one stored (uncompressed) zip entry whose payload starts 64-byte aligned."""
    payload = memoryview(data).cast("B")
    zip64 = payload.nbytes >= _ZIP64_FROM
    # Like torch's miniz writer, pad with an "FB" extra field: local header (30 bytes) + name +
    # our field (4 + pad) + zipfile's own zip64 field (20 bytes, appended after ours).
    start = f.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -start % _ALIGN
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as dst:
        dst.write(payload)


def save_pth(state_dict: Mapping[str, Any], path: PathLike) -> None:
    """Write ``{name: array}`` as an official-layout torch ``.pth`` file, without torch.

    Values may be numpy arrays or anything ``np.asarray`` accepts (e.g. JAX arrays). dtypes keep
    their identity (bf16 stays bf16); each tensor gets its own contiguous storage. The result
    loads with ``torch.load(path, weights_only=True)`` and :func:`load_pth`. Torch-free: the
    pickle and zip layout are written directly (see the module docstring). Omitted on purpose:
    ``.format_version``, which would let torch compute record offsets assuming its own writer's
    data descriptors. The file is written to a temporary sibling and renamed into place.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(2, "directory for the .pth checkpoint does not exist", str(target))
    tensors = _prepare(state_dict)
    # torch names the archive after the file stem; fall back to its buffer default otherwise.
    prefix = target.stem if re.fullmatch(r"[A-Za-z0-9_.-]+", target.stem) else "archive"
    pkl = bytearray(_PROTO2 + _EMPTY_DICT)
    for i, (name, dtype, arr) in enumerate(tensors):
        pkl += _p_str(name) + _pickle_tensor(str(i), dtype, arr.shape) + _SETITEM
    pkl += _STOP
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            _write_record(zf, f, f"{prefix}/data.pkl", pkl)
            _write_record(zf, f, f"{prefix}/byteorder", b"little")
            for i, (_, _, arr) in enumerate(tensors):
                _write_record(zf, f, f"{prefix}/data/{i}", arr.reshape(-1).view(np.uint8))
            _write_record(zf, f, f"{prefix}/version", b"3\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
