"""`build_transformer_model`: the seed's (bert4keras3) entry point, for people moving over.

    RWKV = build_transformer_model(config_path="RWKV6-1.6B/config.json", model="rwkv6",
                                   keras_weights_path="RWKV6-1.6B/model.weights.h5",
                                   return_keras_model=False, with_lm="softmax")
    rwkv = RWKV.model          # a keras.Model: token ids [B, T] -> probabilities [B, T, V]

The seed's config.json field names are read as they are (see `RWKV6Config.from_dict`).
Unlike the seed, a weights file that does not fit the config is an error, never skipped.
Generation settings of the seed (penalty, penalty_window, max_penalty_range, temperature)
are kept on the returned object for `rwkv_ray.generate`.
"""

from __future__ import annotations

import os

import keras
from keras import ops

from rwkv_ray.models import RWKV6Backbone, RWKV6CausalLM, RWKV6Config

WITH_LM_CHOICES = ("softmax", "linear", True, False)
SEED_GENERATION_SETTINGS = ("penalty", "penalty_window", "max_penalty_range", "temperature")


class _TokensToOutputs(keras.Model):
    """token ids [B, T] -> probabilities, logits or hidden states, as the seed's model."""

    def __init__(self, causal_lm: RWKV6CausalLM, with_lm, **kwargs):
        super().__init__(**kwargs)
        self.causal_lm = causal_lm
        self.with_lm = with_lm

    def call(self, token_ids):
        if not self.with_lm:
            hidden, _ = self.causal_lm.backbone(token_ids)
            return hidden
        logits, _ = self.causal_lm(token_ids)
        return ops.softmax(logits, axis=-1) if self.with_lm in ("softmax", True) else logits


class SeedCompatRWKV6:
    """What the seed's `build_transformer_model(..., return_keras_model=False)` returned.

    Attributes: `model` (the keras.Model of the seed), `causal_lm` (our `RWKV6CausalLM`),
    `config`, `generation_settings`.
    """

    def __init__(self, causal_lm: RWKV6CausalLM, with_lm, generation_settings: dict):
        self.causal_lm = causal_lm
        self.config = causal_lm.config
        self.model = _TokensToOutputs(causal_lm, with_lm)
        self.generation_settings = generation_settings

    def enable_state_tuning(self, time_shift_tuning: bool = False) -> None:
        """Freeze everything but each layer's initial wkv state (and, with
        `time_shift_tuning`, the two initial token-shift vectors)."""
        self.causal_lm.trainable = True
        for variable in self.causal_lm.weights:
            variable.trainable = False
        for block in self.causal_lm.backbone.blocks:
            block.time_mix.initial_wkv.trainable = True
            block.time_mix.initial_shift.trainable = time_shift_tuning
            block.channel_mix.initial_shift.trainable = time_shift_tuning

    def enable_state_tunig(self, time_shitf_tuning: bool = False) -> None:
        """The seed's spelling of `enable_state_tuning`."""
        self.enable_state_tuning(time_shift_tuning=time_shitf_tuning)


def build_transformer_model(
    config_path: str | os.PathLike,
    model: str = "rwkv6",
    keras_weights_path: str | os.PathLike | None = None,
    return_keras_model: bool = True,
    sequence_length: int | None = None,
    with_lm="softmax",
    **settings,
):
    """Build an RWKV6 from a seed-style config.json (and optionally its weights).

    Returns `SeedCompatRWKV6` when `return_keras_model=False`, else its `.model`.
    `sequence_length` is accepted for compatibility and not needed: shapes are dynamic.
    """
    if model != "rwkv6":
        raise ValueError(f"only model='rwkv6' is supported, got {model!r}")
    if with_lm not in WITH_LM_CHOICES:
        raise ValueError(f"with_lm must be one of {WITH_LM_CHOICES}, got {with_lm!r}")
    unknown = sorted(set(settings) - set(SEED_GENERATION_SETTINGS))
    if unknown:
        raise TypeError(f"unknown argument(s) {unknown}")
    del sequence_length
    config = RWKV6Config.from_json(config_path)
    causal_lm = RWKV6CausalLM(
        RWKV6Backbone(config, init_weights=keras_weights_path is None, dtype=keras.config.floatx())
    )
    if keras_weights_path is not None:
        causal_lm.load_weights(keras_weights_path)
    built = SeedCompatRWKV6(causal_lm, with_lm, dict(settings))
    return built if not return_keras_model else built.model
