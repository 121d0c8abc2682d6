"""`RWKV6CausalLM`: the backbone plus the vocabulary head; `forward` is the main entry."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from rwkv_ray.models import rwkv6_init as init
from rwkv_ray.models.rwkv6_backbone import RWKV6Backbone
from rwkv_ray.models.rwkv6_config import RWKV6Config
from rwkv_ray.models.rwkv6_state import RWKV6State


class RWKV6CausalLM(keras.Model):
    """RWKV6 language model.

    Args:
        backbone: an `RWKV6Backbone` (its dtype policy is used for the head too).

    Example:
        model = RWKV6CausalLM.from_model_config(RWKV6Config(vocab_size=1000, num_layers=2,
                                                            hidden_size=128))
        logits, state = model.forward([[0, 0, 17, 42]])        # left-padded batch of 1
        more, state = model.forward([[7]], state)               # continue from the state
    """

    def __init__(self, backbone: RWKV6Backbone, **kwargs):
        kwargs.setdefault("dtype", backbone.dtype_policy)
        super().__init__(**kwargs)
        self.backbone = backbone
        self._convert_input_args = False
        cfg = backbone.config
        self.head = keras.layers.Dense(
            cfg.vocab_size,
            use_bias=False,
            kernel_initializer=init.head(cfg.vocab_size, cfg.hidden_size, backbone.init_weights),
            dtype=backbone.dtype_policy,
            name="head",
        )
        self.head.build((None, None, cfg.hidden_size))
        self._compiled_forward = None
        self.built = True

    @classmethod
    def from_model_config(
        cls, config: RWKV6Config | dict, wkv_impl: str | None = None, dtype=None
    ) -> RWKV6CausalLM:
        """A freshly initialised model (official init rules) of the given shape."""
        return cls(RWKV6Backbone(config, wkv_impl=wkv_impl, dtype=dtype))

    @property
    def config(self) -> RWKV6Config:
        return self.backbone.config

    def call(self, token_ids, state: RWKV6State | None = None, return_hidden: bool = False):
        """(logits [B,T,V] float32, state); with return_hidden, (the final hidden states
        [B,T,C] the head would read, state): the training loss applies the head itself, piece
        by piece (`rwkv_ray.train.loss.summed_head_loss`)."""
        hidden, state = self.backbone(token_ids, state=state)
        if return_hidden:
            return hidden, state
        return ops.cast(self.head(hidden), "float32"), state

    def forward(self, token_ids, state: RWKV6State | None = None):
        """token_ids [B,T] (0 = left padding) -> (logits [B,T,V] float32, `RWKV6State`).

        `state=None` starts from the model's initial state (zeros, or a tuned state).
        On JAX this runs compiled: T is left-padded with id 0 up to a bucket (exact, since
        padding never changes a state) so that new lengths rarely recompile."""
        token_ids = np.asarray(ops.convert_to_numpy(token_ids))
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [batch, time], got shape {token_ids.shape}")
        if token_ids.size and token_ids.dtype.kind not in "iu":
            raise TypeError(f"token_ids must be integers, got {token_ids.dtype}")
        vocab = self.backbone.config.vocab_size
        low, high = (int(token_ids.min()), int(token_ids.max())) if token_ids.size else (0, 0)
        if low < 0 or high >= vocab:
            # The embedding's gather would fill NaN rows instead (NaN logits and state).
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{vocab - 1}")
        token_ids = token_ids.astype(np.int32)
        if keras.backend.backend() != "jax":
            # `call`, not `self(...)`: on the torch backend Keras routes `__call__` through
            # torch's Module.forward, which this method overrides.
            return self.call(ops.convert_to_tensor(token_ids), state=state)
        steps = token_ids.shape[1]
        padded = np.pad(token_ids, [(0, 0), (bucket_length(steps) - steps, 0)])
        if self._compiled_forward is None:
            self._compiled_forward = _compile_forward(self)
        logits, state = self._compiled_forward(
            [v.value for v in self.trainable_variables],
            [v.value for v in self.non_trainable_variables],
            padded,
            state,
        )
        return logits[:, padded.shape[1] - steps :], state

    def initial_state(self, batch_size: int) -> RWKV6State:
        return self.backbone.initial_state(batch_size)

    def get_config(self):
        return {
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def bucket_length(steps: int) -> int:
    """Sequence-length buckets for compiled calls: powers of two from 16, then multiples
    of 1024."""
    if steps <= 16:
        return 16
    if steps <= 1024:
        return 1 << (steps - 1).bit_length()
    return -(-steps // 1024) * 1024


def _compile_forward(model: RWKV6CausalLM):
    import jax

    def run(trainable, non_trainable, token_ids, state):
        outputs, _ = model.stateless_call(trainable, non_trainable, token_ids, state=state)
        return outputs

    return jax.jit(run)
