"""`build_transformer_model`: the seed's (bert4keras3) entry point, for people moving over.

    RWKV = build_transformer_model(config_path="RWKV6-1.6B/config.json", model="rwkv6",
                                   keras_weights_path="RWKV6-1.6B/model.weights.h5",
                                   return_keras_model=False, with_lm="softmax")
    rwkv = RWKV.model          # a keras.Model: token ids [B, T] -> probabilities [B, T, V]
    rwkv.inputs, rwkv.outputs  # as the seed's: one input, "Input-Token"
    RWKV.enable_state_tunig()  # then rwkv.compile(...) / rwkv.fit(...)
    rwkv.save_weights("tuned.weights.h5")  # keras_weights_path reads it back
    RWKV.generate(["The Eiffel tower is in"], 32, search_mode="topp", k=0.8)
    tokenizer = RWKV_TOKENIZER()  # the seed's batch encode / decode

The seed's config.json field names are read as they are (see `RWKV6Config.from_json`).
Unlike the seed, a weights file that does not fit the config is an error naming the shapes,
never skipped. The seed's generation settings (penalty, penalty_window, max_penalty_range,
temperature) are the defaults of `RWKV.generate` (`rwkv_ray.generate`); the seed's
`build_cache_model` is replaced by it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from rwkv_ray.convert import check_weights_file
from rwkv_ray.models import RWKV6Backbone, RWKV6CausalLM, RWKV6Config
from rwkv_ray.tokenizer import WorldTokenizer

WITH_LM_CHOICES = ("softmax", "linear", True, False)
SEED_GENERATION_SETTINGS = ("penalty", "penalty_window", "max_penalty_range", "temperature")


class _TokensToOutputs(keras.layers.Layer):
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

    def compute_output_spec(self, token_ids):
        # Given, not traced: a symbolic length (sequence_length None) cannot run the model.
        config = self.causal_lm.config
        if not self.with_lm:
            shape, dtype = config.hidden_size, self.causal_lm.backbone.compute_dtype
        else:
            shape, dtype = config.vocab_size, "float32"  # the head's logits are float32
        return keras.KerasTensor((*token_ids.shape, shape), dtype=dtype)


class SeedModel(keras.Model):
    """The seed's keras model (`RWKV.model`): one input "Input-Token" (int32 [B, T]), one
    output. Its weights files have the converted model's layout (`save_weights` and
    `load_weights` act on the causal LM), which `keras_weights_path` reads, as in the seed."""

    def __init__(self, causal_lm: RWKV6CausalLM, with_lm, sequence_length: int | None = None):
        tokens = keras.Input((sequence_length,), dtype="int32", name="Input-Token")
        super().__init__(tokens, _TokensToOutputs(causal_lm, with_lm)(tokens), name="rwkv6")
        self.causal_lm = causal_lm

    def save_weights(self, filepath, overwrite=True, **kwargs):
        return self.causal_lm.save_weights(filepath, overwrite=overwrite, **kwargs)

    def load_weights(self, filepath, **kwargs):
        check_weights_file(self.causal_lm, filepath)
        return self.causal_lm.load_weights(filepath, **kwargs)


class SeedCompatRWKV6:
    """What the seed's `build_transformer_model(..., return_keras_model=False)` returned.

    Attributes: `model` (the keras.Model of the seed), `causal_lm` (our `RWKV6CausalLM`),
    `config`, `generation_settings`.
    """

    def __init__(
        self, causal_lm: RWKV6CausalLM, with_lm, generation_settings: dict, sequence_length=None
    ):
        self.causal_lm = causal_lm
        self.config = causal_lm.config
        self.model = SeedModel(causal_lm, with_lm, sequence_length)
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

    def generate(self, prompts, max_new_tokens: int, **kwargs):
        """`rwkv_ray.generate` on this model, the seed's generation settings given to
        `build_transformer_model` as defaults (kwargs override them)."""
        from rwkv_ray.generation import generate

        settings = {k: v for k, v in self.generation_settings.items() if v is not None}
        return generate(self.causal_lm, prompts, max_new_tokens, **{**settings, **kwargs})

    def build_cache_model(self, *args, **kwargs):
        raise NotImplementedError(
            "build_cache_model (the seed's generation model) is replaced by "
            "RWKV.generate(prompts, max_new_tokens, search_mode=..., k=..., end_token=..., "
            "state=...) (rwkv_ray.generate on RWKV.causal_lm): it prefills and decodes, "
            "returns the tokens, text and (for state=) the final state, continues exactly "
            "from a state, and takes batches of unequal prompts"
        )


class RWKV_TOKENIZER:  # noqa: N801 - the seed's name
    """The seed's tokenizer interface on the World tokenizer: `encode` takes a text or a
    list of texts and returns a list of id lists; `decode` takes a list of id sequences
    and returns a list of texts (padding id 0 decodes to nothing)."""

    def __init__(self, dict_path: str | os.PathLike | None = None):
        self.tokenizer = WorldTokenizer(dict_path)

    def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch([texts] if isinstance(texts, str) else texts)

    def decode(self, batch) -> list[str]:
        return [self.tokenizer.decode(np.asarray(ids).astype(np.int64)) for ids in batch]


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
    `sequence_length`: the length of the model's symbolic input (None: any length; under
    JAX every new length compiles anew either way).
    """
    if model != "rwkv6":
        raise ValueError(f"only model='rwkv6' is supported, got {model!r}")
    if with_lm not in WITH_LM_CHOICES:
        raise ValueError(f"with_lm must be one of {WITH_LM_CHOICES}, got {with_lm!r}")
    unknown = sorted(set(settings) - set(SEED_GENERATION_SETTINGS))
    if unknown:
        raise TypeError(f"unknown argument(s) {unknown}")
    config = RWKV6Config.from_json(config_path)
    # The global policy (keras.config.set_floatx or set_dtype_policy), as the seed's layers.
    policy = keras.config.dtype_policy().name
    causal_lm = RWKV6CausalLM(
        RWKV6Backbone(config, init_weights=keras_weights_path is None, dtype=policy)
    )
    built = SeedCompatRWKV6(causal_lm, with_lm, dict(settings), sequence_length)
    if keras_weights_path is not None:
        built.model.load_weights(keras_weights_path)
    return built if not return_keras_model else built.model
