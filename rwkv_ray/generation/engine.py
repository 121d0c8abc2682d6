"""The compiled pieces of generation: prefill, one decode step, the on-device decode loop.

Everything runs under `jax.jit` with static shapes. Host code (`generate.py`) buckets:
  batch   -> next power of two (extra rows are pure padding, finished from the start);
  prompt  -> next power of two >= 16 up to PREFILL_CHUNK, then whole chunks of PREFILL_CHUNK
             fed one after another through the same compiled function (left padding with
             id 0 is exact: padding never changes a state);
  new tokens -> next power of two >= 16 (the token buffer; the loop's trip count is a traced
             value, so any max_new_tokens inside a bucket reuses the compilation).
`compile_counts()` counts traces per function (a trace is a compilation), for tests.

Decoding invariant: a carry's `state` covers every token fed so far, and `logits` are the
next-token logits that state predicts. A step samples from `logits`, feeds the sampled token
(id 0 for finished rows, which changes nothing) and keeps the old logits where id 0 was fed.
"""

from __future__ import annotations

import collections
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras

from rwkv_ray.generation.sampling import (
    PenaltyState,
    SamplerFeatures,
    SamplingParams,
    init_penalties,
    process_logits,
    sample_tokens,
    update_penalties,
)
from rwkv_ray.models import RWKV6State, rwkv6_packed

PREFILL_CHUNK = 1024
MIN_BUCKET = 16
_COMPILES: collections.Counter[str] = collections.Counter()
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_counts() -> dict[str, int]:
    """How many times each compiled generation function was traced (= compiled)."""
    return dict(_COMPILES)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_batch(batch: int) -> int:
    """Rows the compiled functions run: the next power of two, and >= 2 on a GPU, where XLA
    turns a one-row matmul into a multiply + reduce that reads the weights at a fraction of
    the bandwidth a two-row GEMM gets (H100, 1.6B: 255 tokens/s at one row, 434 per row at
    two; BENCHMARKS.md). The extra row is padding, finished from the start."""
    rows = _next_power_of_two(batch)
    return max(rows, 2) if jax.default_backend() == "gpu" else rows


def bucket_prompt(length: int) -> int:
    """Padded prompt length: 0, a power of two in [16, PREFILL_CHUNK], or whole chunks."""
    if length == 0:
        return 0
    if length > PREFILL_CHUNK:
        return -(-length // PREFILL_CHUNK) * PREFILL_CHUNK
    return max(MIN_BUCKET, _next_power_of_two(length))


def bucket_new_tokens(n: int) -> int:
    return max(MIN_BUCKET, _next_power_of_two(n))


class DecodeCarry(NamedTuple):
    """Loop state of decoding (all on device)."""

    step: object  # [] int32
    state: RWKV6State
    logits: object  # [B, V] float32: next-token logits of `state`
    tokens: object  # [B, N_bucket] int32: row b's tokens are tokens[b, :count[b]]
    count: object  # [B] int32
    done: object  # [B] bool
    ended: object  # [B] bool: finished by an end token
    penalties: PenaltyState
    key: object  # PRNG key


class Engine:
    """Compiled generation functions of one model (one Engine per model, see `engine_for`).

    Args:
        model: an `RWKV6CausalLM`.
        pack: decode with packed projection kernels (`rwkv_ray.models.rwkv6_packed`: the
            same numbers, fewer and larger weight reads; a copy of those kernels is kept).
            None: on a GPU only, where decoding is bound by the weight reads (on a CPU the
            packed matmul's wasted arithmetic costs more than it saves).
    """

    def __init__(self, model, pack: bool | None = None):
        self.model = model
        self.pack = jax.default_backend() == "gpu" if pack is None else bool(pack)
        self._packed = None  # (the kernel arrays it was made from, the packed kernels)
        self.prefill_fn = jax.jit(self._prefill, donate_argnums=(3, 4))
        self.init_fn = jax.jit(self._init, static_argnames=("vocab_size", "features"))
        self.step_fn = jax.jit(self._step, static_argnames=("features",), donate_argnums=(3,))
        self.loop_fn = jax.jit(self._loop, static_argnames=("features",), donate_argnums=(3,))

    def variables(self) -> tuple[list, list]:
        model = self.model
        return (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    def decode_variables(self) -> tuple[list, list, list | None]:
        """(trainable, non_trainable, packed kernels or None): the arguments of step_fn and
        loop_fn. The packed kernels are remade when a projection kernel has changed (the
        model was trained or loaded since)."""
        trainable, non_trainable = self.variables()
        if not self.pack:
            return trainable, non_trainable, None
        sources = [
            dense.kernel.value
            for block in self.model.backbone.blocks
            for dense in (*rwkv6_packed.time_mix_dense(block), *rwkv6_packed.ffn_dense(block))
        ]
        cached = self._packed
        if cached is None or any(a is not b for a, b in zip(cached[0], sources, strict=True)):
            self._packed = cached = (sources, rwkv6_packed.pack_kernels(self.model.backbone))
        return trainable, non_trainable, cached[1]

    # ---- model calls (traced) ----------------------------------------------------------
    def _weights(self, trainable, non_trainable) -> keras.StatelessScope:
        """A scope in which the model's variables read these (traced) values."""
        model = self.model
        mapping = list(zip(model.trainable_variables, trainable, strict=True))
        mapping += list(zip(model.non_trainable_variables, non_trainable, strict=True))
        return keras.StatelessScope(state_mapping=mapping)

    def _prefill(self, trainable, non_trainable, token_ids, state, logits):
        """Feed token_ids [B,T]; rows that are all padding keep their logits."""
        _COMPILES["prefill"] += 1
        model = self.model
        with self._weights(trainable, non_trainable):
            hidden, state = model.backbone(token_ids, state=state)
            # The head only for the last position: prefill never needs the other logits.
            new_logits = model.head(hidden[:, -1:])[:, 0].astype(jnp.float32)
        fed = jnp.any(token_ids != 0, axis=1)[:, None]
        return jnp.where(fed, new_logits, logits), state

    def _feed_one(self, trainable, non_trainable, packed, token, state):
        model = self.model
        with self._weights(trainable, non_trainable):
            hidden, state = model.backbone(token[:, None], state=state, packed_kernels=packed)
            logits = model.head(hidden[:, 0])
        return logits.astype(jnp.float32), state

    # ---- decoding (traced) -------------------------------------------------------------
    def _init(self, history, length, vocab_size: int, features: SamplerFeatures):
        _COMPILES["init_penalties"] += 1
        return init_penalties(history, length, vocab_size, features)

    def _decode_step(
        self, trainable, non_trainable, packed, carry, params, end_mask, limit, features
    ):
        processed = process_logits(carry.logits, params, carry.penalties, features)
        key = jax.random.fold_in(carry.key, carry.step)
        token = sample_tokens(key, processed, params, features)
        active = ~carry.done
        token = jnp.where(active, token, 0)
        tokens = carry.tokens.at[:, carry.step].set(token)
        logits, state = self._feed_one(trainable, non_trainable, packed, token, carry.state)
        logits = jnp.where((token == 0)[:, None], carry.logits, logits)
        penalties = update_penalties(carry.penalties, token, active, params, features)
        count = carry.count + active.astype(jnp.int32)
        ended = carry.ended | (active & end_mask[token])
        done = carry.done | ended | (count >= limit)
        return DecodeCarry(
            carry.step + 1, state, logits, tokens, count, done, ended, penalties, carry.key
        )

    def _step(self, trainable, non_trainable, packed, carry, params, end_mask, limit, features):
        _COMPILES["decode_step"] += 1
        return self._decode_step(
            trainable, non_trainable, packed, carry, params, end_mask, limit, features
        )

    def _loop(self, trainable, non_trainable, packed, carry, params, end_mask, limit, features):
        """Decode until every row is done or `limit` steps, without leaving the device."""
        _COMPILES["decode_loop"] += 1

        def cond(c):
            return (c.step < limit) & ~jnp.all(c.done)

        def body(c):
            return self._decode_step(
                trainable, non_trainable, packed, c, params, end_mask, limit, features
            )

        # Inside the loop each layer's state pieces are their own buffers, so the GPU step
        # kernel (rwkv_ray/ops/wkv_kernel_step.py) can update the WKV state in place and the
        # shift states come straight out of the fusions that compute them. As slices of one
        # stacked array the WKV update went through a copy of the whole state every step
        # (H100, 1.6B, batch 32: 0.27 ms of a 3.4 ms step), and each shift state took a
        # slice-update kernel per layer (batch 1: 479 -> 491-506 tokens/s without them).
        # Steps per iteration (2, 4) were timed too: no clear gain (BENCHMARKS.md).
        listed = RWKV6State(*(list(piece) for piece in carry.state))
        carry = jax.lax.while_loop(cond, body, carry._replace(state=listed))
        return carry._replace(state=RWKV6State(*(jnp.stack(p) for p in carry.state)))


def engine_for(model, pack: bool | None = None) -> Engine:
    """The (cached) Engine that `generate`, streams and the serving batcher use for a model.
    `pack` True / False (see `Engine`) replaces a cached engine that decodes the other way:
    `engine_for(model, pack=False)` turns packed decoding off for that model."""
    engine = _ENGINES.get(model)
    if engine is None or (pack is not None and engine.pack != pack):
        engine = _ENGINES[model] = Engine(model, pack)
    return engine


def new_carry(state, logits, new_bucket: int, penalties, seed: int, done) -> DecodeCarry:
    batch = logits.shape[0]
    return DecodeCarry(
        step=jnp.zeros((), jnp.int32),
        state=state,
        logits=logits,
        tokens=jnp.zeros((batch, new_bucket), jnp.int32),
        count=jnp.zeros((batch,), jnp.int32),
        done=jnp.asarray(done),
        ended=jnp.zeros((batch,), bool),
        penalties=penalties,
        key=seed_key(seed),
    )


def seed_key(seed: int):
    """The PRNG key of a seed in [0, 2**63). jax.random.key keeps only the low 32 bits
    (2**32 drew what 0 draws): the high half is folded in, so smaller seeds keep their
    streams."""
    key = jax.random.key(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)


__all__ = [
    "DecodeCarry",
    "Engine",
    "SamplingParams",
    "bucket_batch",
    "bucket_new_tokens",
    "bucket_prompt",
    "compile_counts",
    "engine_for",
    "new_carry",
]
