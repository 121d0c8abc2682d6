"""States as artifacts: our state files, and the RWKV-PEFT `time_state` .pth layout.

Our format (`save_state` / `load_state`) is a NumPy `.npz` (zip of .npy; read with
`allow_pickle=False`, so loading never runs code):
  att_shift [L,B,C], wkv [L,B,H,N,N] ([key, value]), ffn_shift [L,B,C]   float32
  logits [B,V] float32          optional: the next-token logits (a `GenerationState`)
  __metadata__                  a JSON string: format, version, created (UTC ISO time),
                                config (the model's RWKV6Config dict), config_hash,
                                num_layers, hidden_size, num_heads, head_size, batch,
                                dtype, has_logits
`config_hash` is a SHA-256 of the config's shape fields (checkpoint_dtype left out: the
storage dtype of the weights does not change what a state means). Loading with a model or
config refuses a state whose shapes or config hash differ, naming the difference.

RWKV-PEFT (`--train_type state`) saves `{'blocks.i.att.time_state': [H, value, key]}` in a
.pth; the `rwkv` package, RWKV-Runner and Ai00 use it as the initial wkv state once it is
merged into the base .pth. `export_peft_state` / `import_peft_state` convert between that
and our wkv state ([key, value]: a transpose of the last two axes). The layout has no room
for the token-shift states: export refuses a state whose shift states are not zero unless
`drop_shift=True`, and import returns zero shift states.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import zipfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from rwkv_ray.generation.state import GenerationState, StateMismatchError, check_state
from rwkv_ray.models import RWKV6Config, RWKV6State
from rwkv_ray.pth import load_pth, save_pth

FORMAT = "rwkv_ray.state"
VERSION = 1
PIECES = ("att_shift", "wkv", "ffn_shift")
PEFT_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
PEFT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # how an .npz (a zip; the second: empty) starts


def _config(model_or_config) -> RWKV6Config:
    if isinstance(model_or_config, RWKV6Config):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, RWKV6Config):
        raise TypeError(f"expected a model or an RWKV6Config, got {type(model_or_config)}")
    return config


def config_hash(config: RWKV6Config) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k != "checkpoint_dtype"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _select_row(state, row: int | None) -> tuple[list[np.ndarray], np.ndarray | None]:
    pieces = [np.asarray(p, np.float32) for p in state]
    logits = getattr(state, "logits", None)
    logits = None if logits is None else np.asarray(logits, np.float32)
    if row is None:
        return pieces, logits
    batch = pieces[1].shape[1]
    if isinstance(row, bool) or not isinstance(row, int) or not -batch <= row < batch:
        raise ValueError(f"row must be an int in [0, {batch}), got {row!r}")
    row = row % batch
    pieces = [p[:, row : row + 1] for p in pieces]
    return pieces, None if logits is None else logits[row : row + 1]


def save_state(state, path: str | os.PathLike, model_or_config, row: int | None = None) -> Path:
    """Write `state` (one batch row, or every row when `row` is None) to an .npz file.

    A `GenerationState`'s logits are saved too, so the file continues generation exactly."""
    config = _config(model_or_config)
    check_state(config, state)
    pieces, logits = _select_row(state, row)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "config_hash": config_hash(config),
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "head_size": config.head_size,
        "batch": int(pieces[1].shape[1]),
        "dtype": "float32",
        "has_logits": logits is not None,
    }
    arrays = dict(zip(PIECES, pieces, strict=True))
    if logits is not None:
        arrays["logits"] = logits
    path = Path(path)
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, __metadata__=np.array(json.dumps(meta)), **arrays)
    return path


def _read_npz(path, names: list[str], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The named arrays of a state file (`optional` ones where present), read at once; a
    file that is not a whole .npz (a cut-off copy, another format) is a ValueError."""
    with open(path, "rb") as f:
        magic = f.read(len(ZIP_MAGIC[0]))
    if magic not in ZIP_MAGIC:
        # np.load would take it for a pickle, and its refusal suggests allow_pickle=True.
        raise ValueError(
            f"{path} is not a state file (an .npz written by save_state; an RWKV-PEFT "
            "state is a .pth, read by import_peft_state)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in names if name not in data.files]
            if missing:
                raise ValueError(f"{path} is not an rwkv_ray state file (no {', '.join(missing)})")
            return {n: np.asarray(data[n]) for n in [*names, *optional] if n in data.files}
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable state file ({e})") from e


def read_state_metadata(path: str | os.PathLike) -> dict:
    meta = json.loads(str(_read_npz(path, ["__metadata__"])["__metadata__"]))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: unknown state format {meta.get('format')!r} v{meta.get('version')}"
        )
    return meta


def _refuse_other_config(path, meta: dict, config: RWKV6Config) -> None:
    if meta["config_hash"] == config_hash(config):
        return
    ours = config.to_dict()
    diffs = [
        f"{key}: file {value!r} vs model {ours.get(key)!r}"
        for key, value in sorted(meta["config"].items())
        if key != "checkpoint_dtype" and ours.get(key) != value
    ]
    raise StateMismatchError(
        f"state file {path} was saved for another model config ({'; '.join(diffs)})"
    )


def load_state(path: str | os.PathLike, model_or_config=None) -> GenerationState:
    """Read a state file; with a model or config, refuse it unless it fits that model."""
    meta = read_state_metadata(path)
    arrays = _read_npz(path, list(PIECES), optional=("logits",))
    pieces = [arrays[name].astype(np.float32) for name in PIECES]
    logits = arrays["logits"].astype(np.float32) if "logits" in arrays else None
    state = GenerationState(*pieces, logits=logits)
    if model_or_config is not None:
        config = _config(model_or_config)
        check_state(config, state)
        _refuse_other_config(path, meta, config)
    return state


# ---- RWKV-PEFT time_state .pth ---------------------------------------------------------


def export_peft_state(
    state_or_model,
    path: str | os.PathLike,
    row: int = 0,
    dtype: str = "float32",
    drop_shift: bool = False,
) -> Path:
    """Write the wkv part of a state (or a model's tuned initial state) as an RWKV-PEFT
    `.pth`: {'blocks.i.att.time_state': [H, value, key]} (merge it into a base .pth to use it
    in the `rwkv` package, RWKV-Runner or Ai00)."""
    if dtype not in PEFT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(PEFT_DTYPES)}, got {dtype!r}")
    state = state_or_model
    if not isinstance(state, RWKV6State):
        state = state_or_model.initial_state(1)
    pieces, _ = _select_row(state, row)
    att_shift, wkv, ffn_shift = pieces
    if not drop_shift and (att_shift.any() or ffn_shift.any()):
        raise ValueError(
            "the RWKV-PEFT time_state layout holds only the wkv state, but this state has "
            "non-zero token-shift states; pass drop_shift=True to export the wkv part anyway"
        )
    out = {
        f"blocks.{i}.att.time_state": np.swapaxes(wkv[i, 0], -1, -2).astype(PEFT_DTYPES[dtype])
        for i in range(wkv.shape[0])
    }
    path = Path(path)
    save_pth(out, path)
    return path


def import_peft_state(path: str | os.PathLike, model_or_config) -> RWKV6State:
    """Read an RWKV-PEFT time_state `.pth` (or a full checkpoint holding time_state keys) as
    a batch-1 `RWKV6State` with zero shift states. Refuses files that do not fit the model."""
    config = _config(model_or_config)
    tensors = {
        int(m.group(1)): value
        for key, value in load_pth(path).items()
        if (m := PEFT_KEY.match(key))
    }
    if not tensors:
        raise StateMismatchError(f"{path} holds no blocks.i.att.time_state tensors")
    want = (config.num_heads, config.head_size, config.head_size)
    layers = sorted(tensors)
    if layers != list(range(config.num_layers)):
        raise StateMismatchError(
            f"{path} has time_state for layers {layers}, the model has layers "
            f"0..{config.num_layers - 1}"
        )
    for i in layers:
        if tuple(tensors[i].shape) != want:
            raise StateMismatchError(
                f"{path}: blocks.{i}.att.time_state has shape {tuple(tensors[i].shape)}, "
                f"the model needs [H, N, N] = {want}"
            )
    wkv = np.stack([np.swapaxes(np.asarray(tensors[i], np.float32), -1, -2) for i in layers])
    zeros = np.zeros((config.num_layers, 1, config.hidden_size), np.float32)
    return RWKV6State(att_shift=zeros, wkv=wkv[:, None], ffn_shift=zeros.copy())
