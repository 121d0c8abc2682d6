"""The official RWKV-LM x060 initialisation rules, as Keras initializers.

Used only when training from scratch (checkpoints overwrite every value). References:
RWKV-LM `RWKV-v5/src/model.py` (RWKV_Tmix_x060 / RWKV_CMix_x060 constructors and
`generate_init_weight`).
"""

from __future__ import annotations

import numpy as np
from keras import initializers, ops


def _ratios(layer_index: int, num_layers: int) -> tuple[float, float]:
    ratio_0_to_1 = layer_index / max(num_layers - 1, 1)
    ratio_1_to_almost0 = 1.0 - layer_index / num_layers
    return ratio_0_to_1, ratio_1_to_almost0


def _channel_ramp(width: int) -> np.ndarray:
    return np.arange(width, dtype=np.float64) / width


def token_shift_mix(
    kind: str, layer_index: int, num_layers: int, width: int
) -> initializers.Initializer:
    """time_maa_{x,w,k,v,r,g} (TimeMix) and time_maa_{k,r} ('ffn_k', 'ffn_r', ChannelMix)."""
    ratio_0_to_1, ratio_1_to_almost0 = _ratios(layer_index, num_layers)
    ddd = _channel_ramp(width)
    if kind in ("x", "w", "k", "ffn_k", "ffn_r"):
        values = 1.0 - ddd**ratio_1_to_almost0
    elif kind == "v":
        values = 1.0 - (ddd**ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
    elif kind in ("r", "g"):
        values = 1.0 - ddd ** (0.5 * ratio_1_to_almost0)
    else:
        raise ValueError(f"unknown token-shift mix {kind!r}")
    return initializers.Constant(values.astype(np.float32))


def time_decay(layer_index: int, num_layers: int, width: int) -> initializers.Initializer:
    ratio_0_to_1, _ = _ratios(layer_index, num_layers)
    n = np.arange(width, dtype=np.float64)
    values = -6 + 5 * (n / max(width - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1)
    return initializers.Constant(values.astype(np.float32))


def time_faaaa(
    layer_index: int, num_layers: int, num_heads: int, head_size: int
) -> initializers.Initializer:
    ratio_0_to_1, _ = _ratios(layer_index, num_layers)
    width = num_heads * head_size
    n = np.arange(width, dtype=np.float64)
    values = ratio_0_to_1 * (1 - n / max(width - 1, 1)) + ((n + 1) % 3 - 1) * 0.1
    return initializers.Constant(values.reshape(num_heads, head_size).astype(np.float32))


def group_norm_scale(layer_index: int, num_layers: int) -> initializers.Initializer:
    """ln_x.weight = ((1 + layer) / L) ** 0.7."""
    return initializers.Constant(((1 + layer_index) / num_layers) ** 0.7)


class Float32Orthogonal(initializers.Initializer):
    """Orthogonal init computed in float32 (JAX has no bf16 QR), then cast."""

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def __call__(self, shape, dtype=None):
        return ops.cast(initializers.Orthogonal(gain=self.gain)(shape, "float32"), dtype)

    def get_config(self):
        return {"gain": self.gain}


# Random matrices are costly for big models and pointless when a checkpoint overwrites
# them: layers built with init_weights=False use zeros instead.
def projection(gain: float, init_weights: bool = True) -> initializers.Initializer:
    """Linear layers: orthogonal with a gain, or zeros where the official gain is 0."""
    if gain == 0 or not init_weights:
        return initializers.Zeros()
    return Float32Orthogonal(gain)


def embedding(init_weights: bool = True, scale: float = 1e-4) -> initializers.Initializer:
    return initializers.RandomUniform(-scale, scale) if init_weights else initializers.Zeros()


def head(vocab_size: int, hidden_size: int, init_weights: bool = True):
    if not init_weights:
        return initializers.Zeros()
    gain = 0.5 * (vocab_size / hidden_size) ** 0.5 if vocab_size > hidden_size else 0.5
    return Float32Orthogonal(gain)


def small_uniform(init_weights: bool = True, scale: float = 0.01) -> initializers.Initializer:
    """time_maa_w2 and time_decay_w2."""
    return initializers.RandomUniform(-scale, scale) if init_weights else initializers.Zeros()
