"""`RWKV6ChannelMix`: the x060 feed-forward ("channel mixing") sub-layer, without its
LayerNorm.

  b = ln2(x); xx = shift(b) - b; xk = b + xx * maa_k; xr = b + xx * maa_r
  out = sigmoid(xr Wr) * (relu(xk Wk)^2 Wv)
"""

from __future__ import annotations

import keras
from keras import ops

from rwkv_ray.models import rwkv6_init as init
from rwkv_ray.models.rwkv6_config import RWKV6Config
from rwkv_ray.models.rwkv6_packed import packed_matmul, packs
from rwkv_ray.models.rwkv6_time_mix import token_shift


class RWKV6ChannelMix(keras.layers.Layer):
    """ChannelMix of one block. Arguments as in `RWKV6Block` (no wkv_impl)."""

    def __init__(self, config: RWKV6Config, layer_index: int, init_weights=True, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.layer_index = layer_index
        self.init_weights = init_weights
        self._convert_input_args = False  # the shift state stays float32
        c, f = config.hidden_size, config.intermediate_size
        self.key = keras.layers.Dense(
            f, use_bias=False, kernel_initializer=init.projection(1.0, init_weights),
            dtype=self.dtype_policy, name="key",
        )  # fmt: skip
        self.receptance = keras.layers.Dense(
            c, use_bias=False, kernel_initializer=init.projection(0.0, init_weights),
            dtype=self.dtype_policy, name="receptance",
        )  # fmt: skip
        self.value = keras.layers.Dense(
            c, use_bias=False, kernel_initializer=init.projection(0.0, init_weights),
            dtype=self.dtype_policy, name="value",
        )  # fmt: skip

    def build(self, input_shape=None):
        cfg, i, L = self.config, self.layer_index, self.config.num_layers
        c = cfg.hidden_size
        self.maa_k = self.add_weight(
            (c,), init.token_shift_mix("ffn_k", i, L, c), name="time_maa_k"
        )
        self.maa_r = self.add_weight(
            (c,), init.token_shift_mix("ffn_r", i, L, c), name="time_maa_r"
        )
        self.initial_shift = self.add_weight(
            (c,), "zeros", name="initial_shift", trainable=False, dtype="float32", autocast=False
        )
        self.key.build((None, None, c))
        self.receptance.build((None, None, c))
        self.value.build((None, None, cfg.intermediate_size))
        self.built = True

    def call(self, b, mask, shift_state, packed_kernel=None):
        """b: ln2 output [B,T,C]; mask [B,T] bool; shift_state [B,C]; packed_kernel: None,
        or the key|receptance kernels as one [C, F + C] matrix (see rwkv6_packed.py).

        Returns (out, new shift)."""
        previous, new_shift = token_shift(b, mask, shift_state)
        xx = previous - b
        xk = b + xx * ops.cast(self.maa_k, b.dtype)
        xr = b + xx * ops.cast(self.maa_r, b.dtype)
        if packed_kernel is None or not packs([xk, xr]):
            key, receptance = self.key(xk), self.receptance(xr)
        else:
            widths = [self.config.intermediate_size, self.config.hidden_size]
            key, receptance = packed_matmul([xk, xr], packed_kernel, widths)
        hidden = ops.square(ops.relu(key))
        return ops.sigmoid(receptance) * self.value(hidden), new_shift

    def get_config(self):
        base = super().get_config()
        base.update(
            config=self.config.to_dict(),
            layer_index=self.layer_index,
            init_weights=self.init_weights,
        )
        return base

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["config"] = RWKV6Config.from_dict(config["config"])
        return cls(**config)
