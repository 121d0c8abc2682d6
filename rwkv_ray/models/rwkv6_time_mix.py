"""`RWKV6TimeMix`: the x060 attention ("time mixing") sub-layer, without its LayerNorm.

Math (a = ln1(x), one sequence; see ../shared/docs/rwkv6-reference.md §2):
  xx = shift(a) - a;  xxx = a + xx * maa_x
  m = tanh(xxx @ maa_w1) -> 5 slots -> @ maa_w2[s]     (slots in the order w, k, v, r, g)
  x_s = a + xx * (maa_s + m_s)
  r, k, v = x_r Wr, x_k Wk, x_v Wv;  g = silu(x_g Wg)
  log_w = -exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2)      (float32)
  y = GroupNorm_H(wkv6(r, k, v, log_w, u=time_faaaa, state));  out = (y * g) Wo
Left padding (token id 0) must not touch any state: padded steps get k = 0 and log_w = 0
(decay 1), and the token shift of the first real token reads the carried shift state.
"""

from __future__ import annotations

import keras
from keras import ops

from rwkv_ray.models import rwkv6_init as init
from rwkv_ray.models.rwkv6_config import RWKV6Config
from rwkv_ray.models.rwkv6_packed import packed_matmul, packs, row_product
from rwkv_ray.ops import wkv6
from rwkv_ray.ops.wkv import resolve_wkv_impl

MIX_SLOTS = ("w", "k", "v", "r", "g")


def token_shift(a, mask, shift_state):
    """Previous real token's value for every step: [B,T,C], plus the new shift state.

    `mask` [B,T] is True on real tokens. Padding is on the left, so the previous value is
    a[t-1] when t-1 is real and the carried state otherwise.
    """
    carried = ops.cast(shift_state, a.dtype)[:, None, :]
    # a shifted one step later (a zero row first), then the carried state wherever the
    # previous step is not real, step 0 included. A pad, not a concatenate with `carried`:
    # XLA's GPU concatenate kernel ran at under a third of the memory bandwidth here.
    previous = ops.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0)))
    previous_is_real = ops.pad(mask[:, :-1], ((0, 0), (1, 0)))
    previous = ops.where(previous_is_real[..., None], previous, carried)
    new_state = ops.where(mask[:, -1:], ops.cast(a[:, -1], "float32"), shift_state)
    return previous, new_state


class RWKV6TimeMix(keras.layers.Layer):
    """TimeMix of one block. Arguments as in `RWKV6Block`."""

    def __init__(
        self, config: RWKV6Config, layer_index: int, wkv_impl=None, init_weights=True, **kwargs
    ):
        super().__init__(**kwargs)
        self.config = config
        self.layer_index = layer_index
        self.wkv_impl = wkv_impl
        self.init_weights = init_weights
        # States are float32 whatever the compute dtype: never let Keras autocast them.
        self._convert_input_args = False
        self.receptance = self._projection("receptance", 1.0)
        self.key = self._projection("key", 0.1)
        self.value = self._projection("value", 1.0)
        self.gate = self._projection("gate", 0.1)
        self.output_projection = self._projection("output", 0.0)

    def _projection(self, name: str, gain: float) -> keras.layers.Dense:
        return keras.layers.Dense(
            self.config.hidden_size,
            use_bias=False,
            kernel_initializer=init.projection(gain, self.init_weights),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape=None):
        cfg, i, L = self.config, self.layer_index, self.config.num_layers
        c, h, n = cfg.hidden_size, cfg.num_heads, cfg.head_size
        self.maa = {
            slot: self.add_weight(
                (c,), init.token_shift_mix(slot, i, L, c), name=f"time_maa_{slot}"
            )
            for slot in ("x",) + MIX_SLOTS
        }
        self.maa_w1 = self.add_weight((c, 5 * cfg.mix_lora_size), "zeros", name="time_maa_w1")
        self.maa_w2 = self.add_weight(
            (5, cfg.mix_lora_size, c), init.small_uniform(self.init_weights), name="time_maa_w2"
        )
        # Decay, bonus and GroupNorm parameters stay float32 under any dtype policy; not
        # autocast either (under "mixed_bfloat16" Keras would read them as bf16 in call).
        self.time_decay = self.add_weight(
            (c,), init.time_decay(i, L, c), name="time_decay", dtype="float32", autocast=False
        )
        self.decay_w1 = self.add_weight((c, cfg.decay_lora_size), "zeros", name="time_decay_w1")
        self.decay_w2 = self.add_weight(
            (cfg.decay_lora_size, c), init.small_uniform(self.init_weights), name="time_decay_w2"
        )
        self.time_faaaa = self.add_weight(
            (h, n), init.time_faaaa(i, L, h, n), name="time_faaaa", dtype="float32", autocast=False
        )
        self.ln_x_gamma = self.add_weight(
            (c,), init.group_norm_scale(i, L), name="ln_x_gamma", dtype="float32", autocast=False
        )
        self.ln_x_beta = self.add_weight(
            (c,), "zeros", name="ln_x_beta", dtype="float32", autocast=False
        )
        # The initial state of this layer: zeros unless a tuned state is loaded. State
        # tuning makes these trainable (shared over the batch).
        self.initial_wkv = self.add_weight(
            (h, n, n), "zeros", name="initial_wkv", trainable=False, dtype="float32", autocast=False
        )
        self.initial_shift = self.add_weight(
            (c,), "zeros", name="initial_shift", trainable=False, dtype="float32", autocast=False
        )
        for dense in (self.receptance, self.key, self.value, self.gate):
            dense.build((None, None, c))
        self.output_projection.build((None, None, c))
        self.built = True

    def call(self, a, mask, shift_state, wkv_state, packed_kernel=None):
        """a: ln1 output [B,T,C]; mask [B,T] bool; shift_state [B,C]; wkv_state [B,H,N,N];
        packed_kernel: None, or this layer's r|k|v|g kernels as one [C, 4C] matrix (see
        rwkv6_packed.py; the same numbers, read in one matmul).

        Returns (out [B,T,C], new shift_state, new wkv_state)."""
        cfg = self.config
        batch, steps = ops.shape(a)[0], ops.shape(a)[1]
        heads_shape = (batch, steps, cfg.num_heads, cfg.head_size)
        previous, new_shift = token_shift(a, mask, shift_state)
        xx = previous - a
        maa = {slot: ops.cast(w, a.dtype) for slot, w in self.maa.items()}
        xxx = a + xx * maa["x"]
        # Decoding with packed kernels (few rows): the LoRA products as multiply + sum
        # (rwkv6_packed.row_product), not GEMMs.
        few_rows = packed_kernel is not None and packs([a])
        maa_w1, maa_w2 = ops.cast(self.maa_w1, a.dtype), ops.cast(self.maa_w2, a.dtype)
        if few_rows:
            lora = ops.cast(row_product(xxx, maa_w1), a.dtype)
        else:
            lora = ops.matmul(xxx, maa_w1)
        lora = ops.reshape(ops.tanh(lora), (batch, steps, 5, cfg.mix_lora_size))
        if few_rows or steps == 1:  # decoding: one product for the five slots
            if few_rows:
                lora = ops.cast(row_product(lora, maa_w2), a.dtype)
            else:
                lora = ops.einsum("btsd,sdc->btsc", lora, maa_w2)
            slots = [ops.squeeze(x, 2) for x in ops.split(lora, 5, axis=2)]
        else:
            # One matmul per slot: the gradient of one batched [B, T, 5, C] product needs the
            # five slots' gradients concatenated first (6-7 ms of the 1.6B step on an H100,
            # 2026-11-28); of five products, each slot's own. (The gradient of indexing the
            # [B, T, 5, C] product instead was five pads summed: 11.4 ms.)
            hidden = [ops.squeeze(x, 2) for x in ops.split(lora, 5, axis=2)]
            slots = [ops.matmul(x, maa_w2[s]) for s, x in enumerate(hidden)]
        if steps > 1 and self._mix_kernel():
            # The five mixes as one Pallas kernel each way (ops/token_mix.py).
            from rwkv_ray.ops.token_mix import mix_slots

            table = ops.stack([ops.cast(maa[slot], "float32") for slot in MIX_SLOTS])
            mixed = dict(zip(MIX_SLOTS, mix_slots(a, xx, table, slots), strict=True))
        else:
            mixed = {slot: a + xx * (maa[slot] + slots[s]) for s, slot in enumerate(MIX_SLOTS)}
        inputs = [mixed[slot] for slot in "rkvg"]
        decay_hidden = None
        if packed_kernel is None or not packs(inputs):
            dense = (self.receptance, self.key, self.value, self.gate)
            r, k, v, g = (layer(x) for layer, x in zip(dense, inputs, strict=True))
        # The packed kernel's width says whether pack_kernels packed decay_w1: inside this
        # call a mixed-precision policy autocasts decay_w1, so packs_decay(self) would not.
        elif ops.shape(packed_kernel)[1] == 4 * cfg.hidden_size:
            r, k, v, g = packed_matmul(inputs, packed_kernel, [cfg.hidden_size] * 4)
        else:  # decay_w1 packed too (rwkv6_packed.packs_decay): x_w @ decay_w1 in float32
            widths = [cfg.hidden_size] * 4 + [cfg.decay_lora_size]
            packed = packed_matmul([*inputs, mixed["w"]], packed_kernel, widths, (4,))
            r, k, v, g, decay_hidden = packed
        r, k, v = (ops.reshape(x, heads_shape) for x in (r, k, v))
        log_w = self._log_decay(mixed["w"], decay_hidden, few_rows)
        real = mask[:, :, None, None]
        # Padding: no write (k = 0) and no decay (log_w = 0) -> the state passes untouched.
        # Selected, not multiplied by the mask: a log-decay of -inf (w past 88.7) times 0
        # would be NaN and reach the state.
        k = ops.where(real, k, ops.zeros((), k.dtype))
        log_w = ops.where(real, ops.reshape(log_w, heads_shape), 0.0)
        heads = (cfg.num_heads, cfg.head_size)
        # ln_x (one group per head) and the gate in the WKV op: the decode kernel fuses them.
        group_norm = (
            ops.reshape(self.ln_x_gamma, heads),
            ops.reshape(self.ln_x_beta, heads),
            cfg.group_norm_epsilon,
        )
        y, new_wkv = wkv6(
            r, k, v, log_w, ops.cast(self.time_faaaa, "float32"), wkv_state,
            impl=self.wkv_impl, group_norm=group_norm, output_gate=ops.reshape(g, heads_shape),
            output_gate_silu=True,
        )  # fmt: skip
        out = self.output_projection(ops.reshape(y, (batch, steps, cfg.hidden_size)))
        return out, new_shift, new_wkv

    def _mix_kernel(self) -> bool:
        """Whether the five token-shift mixes run as the Pallas kernels: with the WKV
        kernel (the one switch for GPU kernels: `wkv_impl`, RWKV_WKV_IMPL) and a width the
        kernels tile (`token_mix.column_block`)."""
        if resolve_wkv_impl(self.wkv_impl)[0] != "kernel":
            return False
        from rwkv_ray.ops.token_mix import column_block

        return column_block(self.config.hidden_size) is not None

    def _log_decay(self, x_w, hidden=None, few_rows=False):
        """log_w = -exp(w) in float32 (the decay must not pass through bf16). `hidden`: x_w @
        decay_w1 (float32) when the packed matmul has computed it already; `few_rows`: the
        second LoRA product as multiply + sum (`row_product`)."""
        if hidden is None:
            hidden = ops.matmul(ops.cast(x_w, "float32"), self.decay_w1)
        if few_rows:
            lora = row_product(ops.tanh(hidden), self.decay_w2)
        else:
            lora = ops.matmul(ops.tanh(hidden), self.decay_w2)
        return -ops.exp(ops.cast(self.time_decay, "float32") + lora)

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
