"""`RWKV6Backbone`: token ids -> final hidden states (after ln_out), with state in/out."""

from __future__ import annotations

import keras
from keras import ops

from rwkv_ray.models import rwkv6_init as init
from rwkv_ray.models.rwkv6_block import RWKV6Block, layer_norm
from rwkv_ray.models.rwkv6_config import RWKV6Config
from rwkv_ray.models.rwkv6_state import RWKV6State

PAD_ID = 0


def _set_layer(stacked, i: int, value):
    """stacked[i] = value, functionally: [L, ...] (or a list of L per-layer arrays) with
    layer i replaced."""
    if isinstance(stacked, list):
        return [*stacked[:i], ops.cast(value, stacked[i].dtype), *stacked[i + 1 :]]
    start = (i,) + (0,) * (len(stacked.shape) - 1)
    return ops.slice_update(stacked, start, ops.cast(value, stacked.dtype)[None])


class RWKV6Backbone(keras.Model):
    """The RWKV6 stack: embedding, blocks (ln0 inside block 0), ln_out.

    Args:
        config: an `RWKV6Config` (or its dict).
        wkv_impl: WKV implementation for every layer (None = env RWKV_WKV_IMPL / auto; see
            `rwkv_ray.ops.wkv6`).
        init_weights: True draws the official random init (training from scratch); False
            leaves matrices at zero because a checkpoint is about to be loaded.
        dtype: Keras dtype policy, e.g. "float32", "bfloat16", "mixed_bfloat16". Decay, the
            GroupNorm, the LayerNorm statistics and the state stay float32 in every case.

    Token id 0 is left padding: it changes no state, and the first real token of a row sees
    the state passed in.

    Example:
        backbone = RWKV6Backbone(RWKV6Config(vocab_size=1000, num_layers=2, hidden_size=128))
        hidden, state = backbone(np.array([[0, 5, 6]]))
    """

    def __init__(
        self,
        config: RWKV6Config | dict,
        wkv_impl: str | None = None,
        init_weights: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(config, RWKV6Config):
            config = RWKV6Config.from_dict(config)
        self.config = config
        self.wkv_impl = wkv_impl
        self.init_weights = init_weights
        self._convert_input_args = False
        policy = self.dtype_policy
        self.embedding = keras.layers.Embedding(
            config.vocab_size,
            config.hidden_size,
            embeddings_initializer=init.embedding(init_weights),
            dtype=policy,
            name="emb",
        )
        self.blocks = [
            RWKV6Block(config, i, wkv_impl, init_weights, dtype=policy, name=f"block_{i}")
            for i in range(config.num_layers)
        ]
        self.ln_out = layer_norm(config, "ln_out", policy)
        self.build()

    def build(self, input_shape=None):
        self.embedding.build((None, None))
        for block in self.blocks:
            block.build()
        self.ln_out.build((None, None, self.config.hidden_size))
        self.built = True

    def initial_state(self, batch_size: int) -> RWKV6State:
        """The state a fresh sequence starts from: each layer's (possibly tuned) initial
        state, broadcast over the batch."""

        def stacked(variables, shape):
            value = ops.stack([v.value for v in variables])
            return ops.broadcast_to(value[:, None], (len(variables), batch_size, *shape))

        cfg = self.config
        c, h, n = cfg.hidden_size, cfg.num_heads, cfg.head_size
        return RWKV6State(
            att_shift=stacked([b.time_mix.initial_shift for b in self.blocks], (c,)),
            wkv=stacked([b.time_mix.initial_wkv for b in self.blocks], (h, n, n)),
            ffn_shift=stacked([b.channel_mix.initial_shift for b in self.blocks], (c,)),
        )

    def call(self, token_ids, state: RWKV6State | None = None, packed_kernels=None):
        """token_ids [B,T] int -> (hidden [B,T,C], new `RWKV6State`). `packed_kernels`
        (`rwkv6_packed.pack_kernels(backbone)`, for decoding) reads each sub-layer's
        projections in one matmul; the numbers are the same."""
        token_ids = ops.convert_to_tensor(token_ids)
        if len(token_ids.shape) != 2:
            raise ValueError(f"token_ids must be [batch, time], got shape {token_ids.shape}")
        if state is None:
            state = self.initial_state(token_ids.shape[0])
        else:  # pieces may be lists of per-layer arrays (the decode loop's, engine.py)
            state = RWKV6State(
                *(p if isinstance(p, list) else ops.convert_to_tensor(p, "float32") for p in state)
            )
        mask = ops.not_equal(token_ids, PAD_ID)
        x = self.embedding(token_ids)
        # Layer i reads its slice of the running state and writes it back in place: a chain
        # of slice updates lets XLA reuse one (donated) buffer per piece, where stacking the
        # new slices would copy the whole state every step (400 MB at batch 32 for 1.6B).
        att_shift, wkv, ffn_shift = state
        for i, block in enumerate(self.blocks):
            packed = None if packed_kernels is None else packed_kernels[i]
            x, a, w, f = block(x, mask, att_shift[i], wkv[i], ffn_shift[i], packed)
            att_shift = _set_layer(att_shift, i, a)
            wkv = _set_layer(wkv, i, w)
            ffn_shift = _set_layer(ffn_shift, i, f)
        return self.ln_out(x), RWKV6State(att_shift, wkv, ffn_shift)

    def get_config(self):
        return {
            "config": self.config.to_dict(),
            "wkv_impl": self.wkv_impl,
            "init_weights": self.init_weights,
            "name": self.name,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
        }
