"""`RWKV6Block`: x -> x + TimeMix(ln1(x)) -> x + ChannelMix(ln2(x)); block 0 also holds ln0,
applied to the embedding before anything else."""

from __future__ import annotations

import keras

from rwkv_ray.models.rwkv6_channel_mix import RWKV6ChannelMix
from rwkv_ray.models.rwkv6_config import RWKV6Config
from rwkv_ray.models.rwkv6_time_mix import RWKV6TimeMix


def layer_norm(config: RWKV6Config, name: str, dtype) -> keras.layers.LayerNormalization:
    # Keras computes LayerNormalization in float32 for bf16/fp16 inputs. (A one-pass variant,
    # both moments in one reduction kernel, made decoding at batch 32 23% slower on an H100:
    # BENCHMARKS.md, "Decode kernels per layer".)
    return keras.layers.LayerNormalization(
        epsilon=config.layer_norm_epsilon, dtype=dtype, name=name
    )


class RWKV6Block(keras.layers.Layer):
    """One residual block.

    Args:
        config: the model's `RWKV6Config`.
        layer_index: position of the block (the official init depends on it).
        wkv_impl: WKV implementation (see `rwkv_ray.ops.wkv6`).
        init_weights: False skips the random matrix init (a checkpoint will overwrite it).
    """

    def __init__(
        self, config: RWKV6Config, layer_index: int, wkv_impl=None, init_weights=True, **kwargs
    ):
        super().__init__(**kwargs)
        self.config = config
        self.layer_index = layer_index
        self.wkv_impl = wkv_impl
        self.init_weights = init_weights
        self._convert_input_args = False
        policy = self.dtype_policy
        self.ln0 = layer_norm(config, "ln0", policy) if layer_index == 0 else None
        self.ln1 = layer_norm(config, "ln1", policy)
        self.ln2 = layer_norm(config, "ln2", policy)
        self.time_mix = RWKV6TimeMix(
            config, layer_index, wkv_impl, init_weights, dtype=policy, name="att"
        )
        self.channel_mix = RWKV6ChannelMix(
            config, layer_index, init_weights, dtype=policy, name="ffn"
        )

    def build(self, input_shape=None):
        shape = (None, None, self.config.hidden_size)
        for sublayer in (self.ln0, self.ln1, self.ln2, self.time_mix, self.channel_mix):
            if sublayer is not None:
                sublayer.build(shape)
        self.built = True

    def call(self, x, mask, att_shift, wkv_state, ffn_shift, packed_kernels=None):
        """x [B,T,C]; mask [B,T] bool; the layer's three state pieces (float32);
        packed_kernels: None or this layer's pair from `rwkv6_packed.pack_kernels`.

        Returns (x, att_shift, wkv_state, ffn_shift)."""
        att_packed, ffn_packed = packed_kernels or (None, None)
        if self.ln0 is not None:
            x = self.ln0(x)
        out, att_shift, wkv_state = self.time_mix(
            self.ln1(x), mask, att_shift, wkv_state, packed_kernel=att_packed
        )
        x = x + out
        out, ffn_shift = self.channel_mix(self.ln2(x), mask, ffn_shift, packed_kernel=ffn_packed)
        return x + out, att_shift, wkv_state, ffn_shift

    def get_config(self):
        base = super().get_config()
        base.update(
            config=self.config.to_dict(),
            layer_index=self.layer_index,
            wkv_impl=self.wkv_impl,
            init_weights=self.init_weights,
        )
        return base

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["config"] = RWKV6Config.from_dict(config["config"])
        return cls(**config)
