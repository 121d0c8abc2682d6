"""Logit processing and sampling for generation: pure JAX on [B, V] logits, per-row settings.

Order of operations for one decoding step (each row b has its own settings):

1. The seed's repetition penalty (bert4keras3 `Search`, `penalty != 1`). For every token
   id v that occurs in row b's *window*, with n = its count there:
       logit > 0  ->  logit / penalty ** m        logit <= 0  ->  logit * penalty ** m
   where m = 1 without `max_penalty_range`; with `max_penalty_range=[lo, hi]`, m = n if
   n >= lo (capped at hi), else 0 (no penalty). Ids that do not occur are untouched.
   The window: prompt and generated tokens of this call, by position p in the row's real
   sequence (padding excluded). Without `penalty_window` it is every token so far; with
   `penalty_window=W` the sequence is cut into blocks of W positions and the token at
   position p sees the current block plus the previous one, i.e. positions
   [max(0, (p // W - 1) * W), p). Id 0 (padding / end of text) never counts.
2. The official `rwkv.utils.PIPELINE` penalties (GPT-3 style): for each id v generated so
   far in this call, logit -= alpha_presence + alpha_frequency * f[v], where f[v] adds 1 per
   occurrence and every f is multiplied by alpha_decay after each step (the official order:
   penalise, sample, decay all counts, then count the new token). Prompt tokens do not count
   (as in the official pipeline). Difference: the official pipeline counts whitespace and
   digit tokens with weight 0 (a tokenizer-dependent rule); here every token counts 1.
3. token_ban: banned ids get logit -inf (after the penalties: none can undo it).
4. temperature: rows with temperature 0 are greedy (argmax of the step-3 logits);
   otherwise logits / temperature.
5. top-k: keep the ids whose logit is >= the k-th largest (k = 0: off).
6. top-p (nucleus) on the tempered distribution of all ids (as the seed does, not
   renormalised after top-k): keep the highest-probability ids in order while the
   probability mass *before* them is < p, i.e. the smallest prefix whose mass reaches p
   (p = 1: off). With both, the kept set is the intersection ("top-k then top-p").
7. Sample from softmax of what is kept (`jax.random.categorical`).

The seed's `search_mode`/`k` map onto these: 'greedy' -> temperature 0; 'topk' with k int
-> top_k = k; 'topp' with k float -> top_p = k; 'topp' with [p, k] -> top_p = p, top_k = k.
`make_sampling_params` validates every value (ValueError naming the argument) and returns
the per-row arrays; `SamplerFeatures` says which steps are traced at all (static), so a
greedy run compiles no sort and no penalty bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SEARCH_MODES = ("greedy", "topk", "topp")


class SamplingParams(NamedTuple):
    """Per-row sampling settings (a pytree of arrays with leading dim B)."""

    temperature: object  # [B] float32, 0 = greedy
    top_k: object  # [B] int32, 0 = off
    top_p: object  # [B] float32, 1 = off
    penalty: object  # [B] float32, 1 = off (the seed's repetition penalty)
    penalty_min_count: object  # [B] int32: counts below this give no penalty
    penalty_max_count: object  # [B] int32: the exponent is capped at this
    alpha_frequency: object  # [B] float32
    alpha_presence: object  # [B] float32
    alpha_decay: object  # [B] float32
    ban: object  # [B, V] bool, True = banned


@dataclasses.dataclass(frozen=True)
class SamplerFeatures:
    """Which processing steps are compiled in (static; part of the jit cache key)."""

    sample: bool = False  # some row samples (else every row is greedy)
    top_k: bool = False
    top_p: bool = False
    penalty: bool = False  # the seed's repetition penalty
    penalty_window: int | None = None
    alpha: bool = False  # the official frequency / presence penalties
    ban: bool = False

    @classmethod
    def of(cls, params: SamplingParams, penalty_window: int | None = None) -> SamplerFeatures:
        p = SamplingParams(*(np.asarray(x) for x in params))
        penalty = bool(np.any(p.penalty != 1))
        return cls(
            sample=bool(np.any(p.temperature > 0)),
            top_k=bool(np.any((p.top_k > 0) & (p.temperature > 0))),
            top_p=bool(np.any((p.top_p < 1) & (p.temperature > 0))),
            penalty=penalty,
            penalty_window=penalty_window if penalty else None,
            alpha=bool(np.any(p.alpha_frequency != 0) or np.any(p.alpha_presence != 0)),
            ban=bool(np.any(p.ban)),
        )


class PenaltyState(NamedTuple):
    """Per-row bookkeeping for the penalties; a piece is None when its feature is off."""

    counts: object  # [B, V] int32: occurrences in the seed-penalty window
    history: object  # [B, P] int32: tokens by real position (only with a penalty window)
    length: object  # [B] int32: tokens so far (prompt + generated) per row
    frequency: object  # [B, V] float32: decayed counts of generated tokens (official)
    present: object  # [B, V] bool: generated at least once (official)


# ---- validation and parameter arrays -----------------------------------------------------


INT32_MAX = 2**31 - 1
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
FLOAT32_MAX = float(np.finfo(np.float32).max)
TEMPERATURE_MAX = 1e30


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or below or value > hi:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")
    return value


def _integer(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def parse_search(search_mode: str, k) -> tuple[int, float]:
    """The seed's (search_mode, k) -> (top_k, top_p); temperature 0 means greedy."""
    if search_mode not in SEARCH_MODES:
        raise ValueError(f"search_mode must be one of {SEARCH_MODES}, got {search_mode!r}")
    if search_mode == "greedy":
        return 0, 1.0
    if search_mode == "topk":
        return _integer("k (top-k)", k, 1), 1.0
    if isinstance(k, Sequence) and not isinstance(k, str):
        if len(k) != 2:
            raise ValueError(f"k for 'topp' must be p or [p, k], got {k!r}")
        return _integer("k[1] (top-k)", k[1], 1), _number("k[0] (top-p)", k[0], 0, 1, True)
    return 0, _number("k (top-p)", k, 0, 1, True)


def _ban_mask(token_ban, vocab_size: int) -> np.ndarray:
    mask = np.zeros(vocab_size, bool)
    for token in token_ban:
        if isinstance(token, bool) or not isinstance(token, int | np.integer):
            raise ValueError(f"token_ban must hold integer ids, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"token_ban id {token} is outside the vocabulary [0, {vocab_size})")
        mask[token] = True
    if mask.all():
        raise ValueError("token_ban bans the whole vocabulary")
    return mask


def make_sampling_params(
    batch_size: int,
    vocab_size: int,
    search_mode: str = "greedy",
    k=None,
    temperature: float = 1.0,
    penalty: float = 1.0,
    penalty_window: int | None = None,
    max_penalty_range: Sequence[int] | None = None,
    alpha_frequency: float = 0.0,
    alpha_presence: float = 0.0,
    alpha_decay: float = 1.0,
    token_ban: Sequence[int] = (),
) -> tuple[SamplingParams, SamplerFeatures]:
    """Validate the settings (one value for every row) and build the per-row arrays.

    Raises ValueError naming the first bad argument; nothing is computed before that."""
    top_k, top_p = parse_search(search_mode, k)
    temperature = _number("temperature", temperature, 0, math.inf)
    if search_mode == "greedy":
        temperature = 0.0
    elif 0 < temperature < FLOAT32_TINY:  # subnormal in float32 (flushed to 0 on CPUs)
        temperature = FLOAT32_TINY
    # Past ~1e38 it would be inf in float32, and past ~8e37 its reciprocal (XLA divides by
    # multiplying) is subnormal, flushed to 0: -inf * 0 = NaN for the banned ids. Every
    # temperature this large is a uniform draw.
    temperature = min(temperature, TEMPERATURE_MAX)
    penalty = _number("penalty", penalty, 0, math.inf, lo_open=True)
    if penalty_window is not None:
        # Capped: a window past any sequence is no window (generate drops it then).
        penalty_window = min(_integer("penalty_window", penalty_window, 1), INT32_MAX)
    lo, hi = 1, 1
    if max_penalty_range is not None:
        if isinstance(max_penalty_range, str) or len(max_penalty_range) != 2:
            raise ValueError(f"max_penalty_range must be [lo, hi], got {max_penalty_range!r}")
        lo = _integer("max_penalty_range[0]", max_penalty_range[0], 0)
        hi = _integer("max_penalty_range[1]", max_penalty_range[1], max(lo, 1))
    alpha_frequency = _number("alpha_frequency", alpha_frequency, -math.inf, math.inf)
    alpha_presence = _number("alpha_presence", alpha_presence, -math.inf, math.inf)
    alpha_decay = _number("alpha_decay", alpha_decay, 0, 1)
    if isinstance(token_ban, int | str):
        raise ValueError(f"token_ban must be a sequence of ids, got {token_ban!r}")
    ban = _ban_mask(token_ban, vocab_size)

    # Past the vocabulary a top-k keeps everything and a count cap never binds: clamped so
    # that any valid int fits the int32 arrays.
    top_k, lo, hi = min(top_k, vocab_size), min(lo, INT32_MAX), min(hi, INT32_MAX)

    def row(value, dtype):
        return np.full((batch_size,), value, dtype)

    params = SamplingParams(
        temperature=row(temperature, np.float32),
        top_k=row(top_k, np.int32),
        top_p=row(top_p, np.float32),
        penalty=row(penalty, np.float32),
        penalty_min_count=row(lo, np.int32),
        penalty_max_count=row(hi, np.int32),
        alpha_frequency=row(alpha_frequency, np.float32),
        alpha_presence=row(alpha_presence, np.float32),
        alpha_decay=row(alpha_decay, np.float32),
        ban=np.broadcast_to(ban, (batch_size, vocab_size)).copy(),
    )
    return params, SamplerFeatures.of(params, penalty_window)


# ---- logit processing (pure jax) ---------------------------------------------------------


def apply_token_ban(logits, ban):
    return jnp.where(ban, -jnp.inf, logits)


def apply_repetition_penalty(logits, counts, penalty, min_count, max_count):
    """The seed's penalty: divide positive / multiply other logits by penalty ** m."""
    counts = counts.astype(jnp.int32)
    exponent = jnp.where(counts >= min_count[:, None], jnp.minimum(counts, max_count[:, None]), 0)
    exponent = jnp.where(counts > 0, exponent, 0).astype(jnp.float32)
    # Kept finite: a tiny penalty ** m underflowed to 0 (logit / 0 = inf) and a huge one
    # overflowed (0 * inf = NaN, which argmax picks).
    factor = jnp.clip(jnp.power(penalty[:, None], exponent), FLOAT32_TINY, FLOAT32_MAX)
    return jnp.where(logits > 0, logits / factor, logits * factor)


def apply_alpha_penalty(logits, frequency, present, alpha_frequency, alpha_presence):
    """The official pipeline's presence / frequency penalties (subtractive)."""
    cut = alpha_presence[:, None] + alpha_frequency[:, None] * frequency
    return jnp.where(present, logits - cut, logits)


def top_k_mask(logits, top_k):
    """True where the logit is >= the row's k-th largest (all True where k == 0)."""
    ordered = -jnp.sort(-logits, axis=-1)
    index = jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None]
    kth = jnp.take_along_axis(ordered, index, axis=-1)
    return (logits >= kth) | (top_k[:, None] <= 0)


def top_p_mask(logits, top_p):
    """True on the nucleus: the smallest set of most likely ids whose mass reaches p."""
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p[:, None], axis=-1, keepdims=True)  # >= 1
    cutoff = jnp.take_along_axis(ordered, jnp.maximum(kept - 1, 0), axis=-1)
    return (logits >= cutoff) | (top_p[:, None] >= 1)


def process_logits(logits, params: SamplingParams, penalties: PenaltyState, f: SamplerFeatures):
    """Steps 1-3 of the module docstring: ban and penalties. [B,V] float32 -> [B,V]."""
    logits = logits.astype(jnp.float32)
    if f.penalty:
        logits = apply_repetition_penalty(
            logits,
            penalties.counts,
            params.penalty,
            params.penalty_min_count,
            params.penalty_max_count,
        )
    if f.alpha:
        logits = apply_alpha_penalty(
            logits,
            penalties.frequency,
            penalties.present,
            params.alpha_frequency,
            params.alpha_presence,
        )
    if f.ban:  # last: no penalty can turn a banned id's -inf into NaN or a finite value
        logits = apply_token_ban(logits, params.ban)
    return logits


def sample_tokens(key, logits, params: SamplingParams, f: SamplerFeatures):
    """Steps 4-7: processed logits [B,V] -> token ids [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not f.sample:
        return greedy
    temperature = params.temperature[:, None]
    # Less the row's largest logit first: a tiny temperature then sends the others to -inf
    # and keeps the largest at 0 (logits / 1e-38 overflowed to +inf for several ids, and
    # the draw took the first of them, not the argmax).
    top = jnp.max(logits, axis=-1, keepdims=True)
    scaled = (logits - top) / jnp.where(temperature > 0, temperature, 1.0)
    scaled = jnp.where(logits == top, 0.0, scaled)  # also where top is +inf (inf - inf)
    keep = jnp.ones(logits.shape, bool)
    if f.top_k:
        keep &= top_k_mask(scaled, params.top_k)
    if f.top_p:
        keep &= top_p_mask(scaled, params.top_p)
    drawn = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
    return jnp.where(params.temperature > 0, drawn.astype(jnp.int32), greedy)


# ---- penalty bookkeeping (pure jax) ------------------------------------------------------


def window_start(position, window: int | None):
    """First position of the seed-penalty window for the token at `position`."""
    if window is None:
        return jnp.zeros_like(position)
    return jnp.maximum(position // window - 1, 0) * window


def init_penalties(history, length, vocab_size: int, f: SamplerFeatures) -> PenaltyState:
    """Penalty state after the prompt. history [B,P] int32 holds each row's prompt at
    positions 0..length-1 (the rest 0); length [B] int32."""
    batch, width = history.shape
    counts = frequency = present = None
    if f.penalty:
        positions = jnp.arange(width)[None, :]
        start = window_start(length, f.penalty_window)[:, None]
        inside = (positions >= start) & (positions < length[:, None]) & (history != 0)
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], history.shape)
        counts = jnp.zeros((batch, vocab_size), jnp.int32)
        counts = counts.at[rows, history].add(inside.astype(jnp.int32))
    if f.alpha:
        frequency = jnp.zeros((batch, vocab_size), jnp.float32)
        present = jnp.zeros((batch, vocab_size), bool)
    keep_history = f.penalty and f.penalty_window is not None
    return PenaltyState(counts, history if keep_history else None, length, frequency, present)


def update_penalties(
    state: PenaltyState, token, active, params: SamplingParams, f: SamplerFeatures
) -> PenaltyState:
    """Count `token` [B] for the rows where `active` [B] (the others stay untouched)."""
    batch = token.shape[0]
    rows = jnp.arange(batch)
    real = active & (token != 0)
    counts, history, frequency, present = state.counts, state.history, state.frequency, None
    if f.penalty:
        counts = counts.at[rows, token].add(real.astype(jnp.int32))
    if history is not None:
        counts, history = _slide_window(counts, history, state.length, token, active, f)
    if f.alpha:
        decay = jnp.where(active, params.alpha_decay, 1.0)[:, None]
        frequency = (state.frequency * decay).at[rows, token].add(real.astype(jnp.float32))
        present = state.present.at[rows, token].max(real)
    length = state.length + active.astype(jnp.int32)
    return PenaltyState(counts, history, length, frequency, present)


def _slide_window(counts, history, length, token, active, f: SamplerFeatures):
    """Append `token` at position `length`; when the next position opens a new block, drop
    the block that left the window ([p - 2W, p - W) for the next position p)."""
    window = f.penalty_window
    rows = jnp.arange(history.shape[0])
    position = jnp.minimum(length, history.shape[1] - 1)
    history = history.at[rows, position].set(jnp.where(active, token, history[rows, position]))
    following = length + 1
    drop = active & (following % window == 0) & (following >= 2 * window)
    offsets = jnp.clip(following[:, None] - 2 * window + jnp.arange(window)[None, :], 0, None)
    leaving = jnp.take_along_axis(history, offsets, axis=1)
    weight = (drop[:, None] & (leaving != 0)).astype(jnp.int32)
    rows2 = jnp.broadcast_to(rows[:, None], leaving.shape)
    return counts.at[rows2, leaving].add(-weight), history
