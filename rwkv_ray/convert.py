"""Official RWKV6 `.pth` checkpoints <-> our Keras model.

- `load_model(path)`: a converted directory (config.json + model.weights.h5) or a `.pth`.
- `convert_checkpoint(pth, out_dir)`: `.pth` -> config.json + model.weights.h5.
- `export_checkpoint(model, pth)`: model -> official-layout `.pth` (exact round trip).
The official key table is `official_weight_table`: one place that says which of our
variables holds which official tensor and how it is laid out (torch Linear weights are
[out, in], Keras Dense kernels [in, out]; the official att.time_state is [H, value, key]).
A `.pth` is read by `rwkv_ray.pth.load_pth`, which never executes code from the file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from rwkv_ray.models import RWKV6Backbone, RWKV6CausalLM, RWKV6Config
from rwkv_ray.pth import load_pth, save_pth

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class OfficialWeight:
    key: str
    variable: object  # a keras.Variable
    to_official: Callable[[np.ndarray], np.ndarray]
    from_official: Callable[[np.ndarray], np.ndarray]
    optional: bool = False

    @property
    def official_shape(self) -> tuple[int, ...]:
        return tuple(self.to_official(np.zeros(self.variable.shape, np.float32)).shape)


def _same(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _to_111c(x):
    return x.reshape(1, 1, -1)


def _from_111c(x):
    return x.reshape(-1)


def _swap_key_value(x):
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def official_weight_table(model: RWKV6CausalLM) -> list[OfficialWeight]:
    """Every official key with the variable that holds it and the layout conversions."""
    backbone = model.backbone
    table = [OfficialWeight("emb.weight", backbone.embedding.embeddings, _same, _same)]
    ln0 = backbone.blocks[0].ln0
    table += [
        OfficialWeight("blocks.0.ln0.weight", ln0.gamma, _same, _same),
        OfficialWeight("blocks.0.ln0.bias", ln0.beta, _same, _same),
    ]
    for i, block in enumerate(backbone.blocks):
        att, ffn, p = block.time_mix, block.channel_mix, f"blocks.{i}."
        table += [
            OfficialWeight(p + "ln1.weight", block.ln1.gamma, _same, _same),
            OfficialWeight(p + "ln1.bias", block.ln1.beta, _same, _same),
            OfficialWeight(p + "ln2.weight", block.ln2.gamma, _same, _same),
            OfficialWeight(p + "ln2.bias", block.ln2.beta, _same, _same),
        ]
        for slot, variable in att.maa.items():
            table.append(OfficialWeight(p + f"att.time_maa_{slot}", variable, _to_111c, _from_111c))
        table += [
            OfficialWeight(p + "att.time_maa_w1", att.maa_w1, _same, _same),
            OfficialWeight(p + "att.time_maa_w2", att.maa_w2, _same, _same),
            OfficialWeight(p + "att.time_decay", att.time_decay, _to_111c, _from_111c),
            OfficialWeight(p + "att.time_decay_w1", att.decay_w1, _same, _same),
            OfficialWeight(p + "att.time_decay_w2", att.decay_w2, _same, _same),
            OfficialWeight(p + "att.time_faaaa", att.time_faaaa, _same, _same),
        ]
        for name, dense in (
            ("receptance", att.receptance),
            ("key", att.key),
            ("value", att.value),
            ("gate", att.gate),
            ("output", att.output_projection),
        ):
            table.append(
                OfficialWeight(p + f"att.{name}.weight", dense.kernel, _transpose, _transpose)
            )
        table += [
            OfficialWeight(p + "att.ln_x.weight", att.ln_x_gamma, _same, _same),
            OfficialWeight(p + "att.ln_x.bias", att.ln_x_beta, _same, _same),
            OfficialWeight(
                p + "att.time_state", att.initial_wkv, _swap_key_value, _swap_key_value, True
            ),
            OfficialWeight(p + "ffn.time_maa_k", ffn.maa_k, _to_111c, _from_111c),
            OfficialWeight(p + "ffn.time_maa_r", ffn.maa_r, _to_111c, _from_111c),
            OfficialWeight(p + "ffn.key.weight", ffn.key.kernel, _transpose, _transpose),
            OfficialWeight(
                p + "ffn.receptance.weight", ffn.receptance.kernel, _transpose, _transpose
            ),
            OfficialWeight(p + "ffn.value.weight", ffn.value.kernel, _transpose, _transpose),
        ]
    table += [
        OfficialWeight("ln_out.weight", backbone.ln_out.gamma, _same, _same),
        OfficialWeight("ln_out.bias", backbone.ln_out.beta, _same, _same),
        OfficialWeight("head.weight", model.head.kernel, _transpose, _transpose),
    ]
    return table


def assign_state_dict(model: RWKV6CausalLM, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy an official state dict into the model. Every key must fit: missing keys,
    unexpected keys and shape mismatches are all listed in one `CheckpointMismatchError`."""
    table = official_weight_table(model)
    problems = []
    known = {w.key for w in table}
    for w in table:
        if w.key not in state_dict:
            if not w.optional:
                problems.append(f"  missing: {w.key} (expected shape {w.official_shape})")
            continue
        got = tuple(state_dict[w.key].shape)
        if got != w.official_shape:
            problems.append(
                f"  shape mismatch: {w.key} has {got}, the model needs {w.official_shape}"
            )
    problems += [
        f"  unexpected: {key} {tuple(state_dict[key].shape)}"
        for key in sorted(set(state_dict) - known)
    ]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not fit the model config {model.config}:\n" + "\n".join(problems)
        )
    for w in table:
        if w.key in state_dict:
            value = w.from_official(as_float32(state_dict[w.key]))
        else:  # an absent optional tensor (time_state) means zeros
            value = np.zeros(w.variable.shape, np.float32)
        w.variable.assign(value.astype(w.variable.dtype))


def as_float32(tensor) -> np.ndarray:
    """A numpy array (ml_dtypes bf16 included) or a torch tensor as float32 numpy (numpy
    cannot read torch's bfloat16 directly)."""
    if hasattr(tensor, "detach"):  # torch, without importing it
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor).astype(np.float32)


def model_state_dict(
    model: RWKV6CausalLM, dtype: str | None = None, include_time_state: bool | None = None
) -> dict[str, np.ndarray]:
    """The official-layout state dict of the model, in `dtype` (default: the dtype of the
    checkpoint the model came from). `att.time_state` is written when any layer's initial
    wkv state is non-zero (or when `include_time_state` says so)."""
    dtype = dtype or model.config.checkpoint_dtype
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(NUMPY_DTYPES)}, got {dtype!r}")
    table = official_weight_table(model)
    if include_time_state is None:
        include_time_state = any(np.any(np.asarray(w.variable) != 0) for w in table if w.optional)
    out = {}
    for w in table:
        if w.optional and not include_time_state:
            continue
        value = w.to_official(np.asarray(w.variable).astype(np.float32))
        out[w.key] = value.astype(NUMPY_DTYPES[dtype])
    return out


def _build(config: RWKV6Config, dtype, wkv_impl) -> RWKV6CausalLM:
    backbone = RWKV6Backbone(config, wkv_impl=wkv_impl, init_weights=False, dtype=dtype)
    return RWKV6CausalLM(backbone)


def load_pth_model(path: str | os.PathLike, dtype=None, wkv_impl=None) -> RWKV6CausalLM:
    state_dict = load_pth(path)
    model = _build(RWKV6Config.from_state_dict(state_dict), dtype, wkv_impl)
    assign_state_dict(model, state_dict)
    return model


def load_model(path: str | os.PathLike, dtype=None, wkv_impl: str | None = None) -> RWKV6CausalLM:
    """Load a model from a converted directory or straight from an official `.pth`.

    Args:
        path: a directory holding config.json and model.weights.h5, or a `.pth` file.
        dtype: Keras dtype policy ("float32", "bfloat16", "mixed_bfloat16"; default float32).
        wkv_impl: WKV implementation (see `rwkv_ray.ops.wkv6`).
    """
    path = Path(path)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{path} is not a converted model: {needed.name} is missing"
                )
        model = _build(RWKV6Config.from_json(config_path), dtype, wkv_impl)
        check_weights_file(model, weights_path)
        model.load_weights(weights_path)
        return model
    if path.is_file():
        return load_pth_model(path, dtype, wkv_impl)
    raise FileNotFoundError(f"no model at {path}")


def check_weights_file(model: RWKV6CausalLM, path: str | os.PathLike) -> None:
    """ValueError naming the array shapes that differ where a Keras weights file does not fit
    `model`'s config (Keras' own error names none: "Layer 'att' expected 16 variables, but
    received 0 variables during loading"). A file h5py cannot read is left to Keras."""
    import h5py

    found: collections.Counter = collections.Counter()

    def count(_, item) -> None:
        if isinstance(item, h5py.Dataset):
            found[tuple(item.shape)] += 1

    try:
        with h5py.File(path, "r") as f:
            f.visititems(count)
    except OSError:
        return
    wanted = collections.Counter(tuple(v.shape) for v in model.weights)
    if found == wanted:
        return
    c = model.config
    raise ValueError(
        f"{path} does not fit the config: the file has arrays of shapes "
        f"{sorted((found - wanted).elements())[:6]} that the model has not, the model needs "
        f"{sorted((wanted - found).elements())[:6]} (the config: num_layers {c.num_layers}, "
        f"hidden_size {c.hidden_size}, head_size {c.head_size}, intermediate_size "
        f"{c.intermediate_size}, vocab_size {c.vocab_size}, mix_lora_size {c.mix_lora_size}, "
        f"decay_lora_size {c.decay_lora_size})"
    )


def convert_checkpoint(pth_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Official `.pth` -> `out_dir/config.json` + `out_dir/model.weights.h5` (float32)."""
    model = load_pth_model(pth_path)
    return save_model(model, out_dir)


def save_model(model: RWKV6CausalLM, out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json(out_dir / CONFIG_FILE)
    model.save_weights(out_dir / WEIGHTS_FILE, overwrite=True)
    return out_dir


def export_checkpoint(
    model: RWKV6CausalLM, pth_path: str | os.PathLike, dtype: str | None = None
) -> Path:
    """Model -> official-layout `.pth` that the `rwkv` package and RWKV-LM load."""
    pth_path = Path(pth_path)
    save_pth(model_state_dict(model, dtype), pth_path)
    return pth_path
