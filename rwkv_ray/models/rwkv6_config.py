"""`RWKV6Config`: the shape of an RWKV6 ("x060", Finch) model.

Sizes follow the official RWKV-LM x060 code: C = hidden_size, N = head_size (64 in every
released model), H = C / N heads, F = intermediate_size (int(C * 3.5) // 32 * 32 by
default), and two LoRA widths that released checkpoints do not agree on (32/64 for C <= 2048,
64/128 for the 7B/14B models): `RWKV6Config.from_state_dict` reads them off the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

# The seed's (bert4keras3) config.json names -> ours.
SEED_FIELD_NAMES = {
    "vocab_size": "vocab_size",
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "attention_head_size": "head_size",
    "decomposer_size": "mix_lora_size",
    "time_decay_size": "decay_lora_size",
}
# Seed keys that carry no information beyond the fields above (checked, then dropped).
SEED_DERIVED_FIELDS = ("num_attention_heads",)
# Keys a seed config.json may hold that are run settings, not model shape: ignored.
SEED_IGNORED_FIELDS = ("hidden_act", "dropout_rate", "max_position", "model_type", "layer_norm_eps")

CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A model configuration value is invalid; the message names the field."""


def default_intermediate_size(hidden_size: int) -> int:
    """The official FFN width: int((C * 3.5) // 32 * 32)."""
    return int((hidden_size * 3.5) // 32 * 32)


@dataclasses.dataclass(frozen=True)
class RWKV6Config:
    """Shape of an RWKV6 model.

    Args:
        vocab_size: rows of the embedding and of the head (65536 for the World vocabulary).
        num_layers: number of blocks L.
        hidden_size: embedding width C; also the attention width.
        head_size: per-head width N (64 in released models); C must be a multiple of it.
        intermediate_size: channel-mix width F; None means the official int(C*3.5)//32*32.
        mix_lora_size: width of the token-shift mixing LoRA (time_maa_w1 is [C, 5*this]).
        decay_lora_size: width of the decay LoRA (time_decay_w1 is [C, this]).
        layer_norm_epsilon: epsilon of ln0/ln1/ln2/ln_out (1e-5 officially).
        group_norm_epsilon: epsilon of the per-head GroupNorm ln_x (64e-5 officially;
            fla's layer uses 1e-5, which is NOT the official model).
        checkpoint_dtype: storage dtype of the official checkpoint this came from; the
            default dtype when exporting back to .pth (so a round trip is exact).
    """

    vocab_size: int = 65536
    num_layers: int = 24
    hidden_size: int = 2048
    head_size: int = 64
    intermediate_size: int | None = None
    mix_lora_size: int = 32
    decay_lora_size: int = 64
    layer_norm_epsilon: float = 1e-5
    group_norm_epsilon: float = 64e-5
    checkpoint_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            object.__setattr__(
                self, "intermediate_size", default_intermediate_size(self.hidden_size)
            )
        for name in (
            "vocab_size",
            "num_layers",
            "hidden_size",
            "head_size",
            "intermediate_size",
            "mix_lora_size",
            "decay_lora_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.head_size:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of head_size "
                f"({self.head_size})"
            )
        for name in ("layer_norm_epsilon", "group_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise ConfigError(
                f"checkpoint_dtype must be one of {CHECKPOINT_DTYPES}, "
                f"got {self.checkpoint_dtype!r}"
            )

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    # ---- dict / JSON -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RWKV6Config:
        """Build from our field names or the seed's config.json names (not both mixed up).

        Unknown keys are rejected by name.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(values).__name__}")
        values = dict(values)
        if "num_hidden_layers" in values or "attention_head_size" in values:
            values = _from_seed_names(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> RWKV6Config:
        """Read a config from a JSON file path, or from a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text, encoding="utf-8") as f:
                text = f.read()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({path_or_text}): {e}") from e
        return cls.from_dict(values)

    # ---- from a checkpoint --------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], checkpoint_dtype: str | None = None
    ) -> RWKV6Config:
        """Infer every size from an official-layout state dict's shapes."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise ConfigError(
                    f"not an RWKV6 (x060) checkpoint: key {key!r} is missing "
                    f"(found e.g. {sorted(state_dict)[:5]})"
                )
            return tuple(state_dict[key].shape)

        vocab_size, hidden_size = shape("emb.weight")
        num_heads, head_size = shape("blocks.0.att.time_faaaa")
        # Numbered blocks only: another "blocks.x" key is left to the loader to report.
        numbered = (re.match(r"blocks\.(\d+)\.", key) for key in state_dict)
        layer_ids = {int(m.group(1)) for m in numbered if m}
        num_layers = max(layer_ids) + 1
        missing_layers = sorted(set(range(num_layers)) - layer_ids)
        if missing_layers:
            raise ConfigError(f"checkpoint has no weights for block(s) {missing_layers}")
        mix_width = shape("blocks.0.att.time_maa_w1")[1]
        if mix_width % 5:
            raise ConfigError(
                f"blocks.0.att.time_maa_w1 has width {mix_width}, not a multiple of 5"
            )
        if checkpoint_dtype is None:
            # numpy's "float32" or torch's "torch.float32". A float64 file (the official
            # package runs one) loads and exports as float32; other dtypes (int8, complex)
            # are refused by the check of checkpoint_dtype.
            found = str(getattr(state_dict["emb.weight"], "dtype", "float32"))
            found = found.removeprefix("torch.")
            checkpoint_dtype = "float32" if found == "float64" else found
        return cls(
            vocab_size=vocab_size,
            num_layers=num_layers,
            hidden_size=hidden_size,
            head_size=head_size,
            intermediate_size=shape("blocks.0.ffn.key.weight")[0],
            mix_lora_size=mix_width // 5,
            decay_lora_size=shape("blocks.0.att.time_decay_w1")[1],
            checkpoint_dtype=checkpoint_dtype,
        )


def _from_seed_names(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    both = sorted(f"{seed} / {ours}" for seed, ours in SEED_FIELD_NAMES.items()
                  if seed != ours and seed in values and ours in values)  # fmt: skip
    if both:
        # Which one won depended on the keys' order.
        raise ConfigError(f"config gives both the seed's and our name for {both}: keep one")
    for key, value in values.items():
        if key in SEED_FIELD_NAMES:
            out[SEED_FIELD_NAMES[key]] = value
        elif key in SEED_DERIVED_FIELDS or key in SEED_IGNORED_FIELDS:
            continue
        else:
            out[key] = value  # rejected later by name if unknown
    heads = values.get("num_attention_heads")
    if heads and "hidden_size" in out and "head_size" not in out:
        # The seed's default (bert4keras3): attention_head_size = hidden_size // heads.
        out["head_size"] = out["hidden_size"] // heads
    if heads is not None and "hidden_size" in out and "head_size" in out:
        if heads * out["head_size"] != out["hidden_size"]:
            raise ConfigError(
                f"num_attention_heads ({heads}) * attention_head_size ({out['head_size']}) "
                f"!= hidden_size ({out['hidden_size']})"
            )
    return out
