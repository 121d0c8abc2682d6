"""Sampling and logit processing (`rwkv_ray.generation.sampling`) on fixed logits.

Sampling checks draw 400 keys per case (vmapped, one compilation each); penalty checks are
against hand-computed values (exact up to float32 round-off, rtol 1e-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_ray.generation.sampling import (
    PenaltyState,
    SamplerFeatures,
    apply_alpha_penalty,
    apply_repetition_penalty,
    init_penalties,
    make_sampling_params,
    process_logits,
    sample_tokens,
    update_penalties,
)

VOCAB = 40
DRAWS = 400
NO_PENALTIES = PenaltyState(None, None, None, None, None)


def fixed_logits(batch: int = 6, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, VOCAB)) * 2).astype(np.float32)


def draw(logits: np.ndarray, **settings) -> np.ndarray:
    """DRAWS samples per row -> [DRAWS, B]."""
    params, features = make_sampling_params(logits.shape[0], VOCAB, **settings)
    keys = jax.random.split(jax.random.key(0), DRAWS)
    processed = process_logits(jnp.asarray(logits), params, NO_PENALTIES, features)
    fn = jax.jit(jax.vmap(lambda key: sample_tokens(key, processed, params, features)))
    return np.asarray(fn(keys))


def nucleus(logits_row: np.ndarray, p: float, temperature: float = 1.0) -> set[int]:
    z = logits_row.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < p].tolist())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_leaves_the_top_k(k):
    logits = fixed_logits()
    samples = draw(logits, search_mode="topk", k=k, temperature=1.5)
    for b in range(logits.shape[0]):
        allowed = set(np.argsort(-logits[b])[:k].tolist())
        assert set(samples[:, b].tolist()) <= allowed
        if k > 1:  # and it does sample (not just argmax)
            assert len(set(samples[:, b].tolist())) > 1


@pytest.mark.parametrize("p, temperature", [(0.3, 1.0), (0.8, 1.0), (0.9, 0.7)])
def test_top_p_never_leaves_the_nucleus(p, temperature):
    logits = fixed_logits(seed=1)
    samples = draw(logits, search_mode="topp", k=p, temperature=temperature)
    for b in range(logits.shape[0]):
        allowed = nucleus(logits[b], p, temperature)
        seen = set(samples[:, b].tolist())
        assert seen <= allowed
        assert int(np.argmax(logits[b])) in seen


def test_top_k_then_top_p_is_the_intersection():
    logits = fixed_logits(seed=2)
    samples = draw(logits, search_mode="topp", k=[0.95, 4], temperature=1.0)
    for b in range(logits.shape[0]):
        allowed = nucleus(logits[b], 0.95) & set(np.argsort(-logits[b])[:4].tolist())
        assert set(samples[:, b].tolist()) <= allowed


@pytest.mark.parametrize("temperature", [0.0, 1e-4])
def test_temperature_to_zero_is_greedy(temperature):
    logits = fixed_logits(seed=3)
    samples = draw(logits, search_mode="topp", k=1.0, temperature=temperature)
    np.testing.assert_array_equal(samples, np.broadcast_to(logits.argmax(-1), samples.shape))


@pytest.mark.parametrize(
    "settings", [dict(search_mode="topk", k=4), dict(search_mode="topp", k=0.9)]
)
def test_a_subnormal_temperature_is_greedy(settings):
    """1e-38 is subnormal in float32: logits / T overflowed to +inf for several ids and the
    draw took the first of them; now every row takes its argmax."""
    logits = fixed_logits(seed=5)
    samples = draw(logits, temperature=1e-38, **settings)
    np.testing.assert_array_equal(samples, np.broadcast_to(logits.argmax(-1), samples.shape))


def test_integers_past_the_vocabulary_or_int32_are_clamped_and_seeds_checked():
    """top-k past the vocabulary keeps everything (as top-k = V), a count cap past int32
    never binds; a seed must fit 63 bits."""
    params, _ = make_sampling_params(2, VOCAB, search_mode="topk", k=2**31)
    np.testing.assert_array_equal(params.top_k, [VOCAB, VOCAB])
    params, _ = make_sampling_params(1, VOCAB, search_mode="topp", k=[0.9, 2**40])
    assert int(params.top_k[0]) == VOCAB and float(params.top_p[0]) == pytest.approx(0.9)
    params, _ = make_sampling_params(1, VOCAB, penalty=1.2, max_penalty_range=[1, 2**40])
    assert int(params.penalty_max_count[0]) == 2**31 - 1


def test_plain_sampling_follows_softmax():
    """Frequencies within 0.05 of softmax probabilities (5 sigma at 400 draws is ~0.12)."""
    logits = np.array([[0.0, 1.0, 2.0] + [-30.0] * (VOCAB - 3)], np.float32)
    samples = draw(logits, search_mode="topp", k=1.0, temperature=1.0)[:, 0]
    probs = np.exp(logits[0, :3]) / np.exp(logits[0, :3]).sum()
    freq = np.bincount(samples, minlength=VOCAB)[:3] / DRAWS
    np.testing.assert_allclose(freq, probs, atol=0.05)


def test_token_ban_is_never_sampled():
    logits = fixed_logits(seed=4)
    banned = [int(i) for i in logits.argmax(-1)]
    samples = draw(logits, search_mode="topk", k=3, token_ban=banned)
    assert not set(samples.ravel().tolist()) & set(banned)


@pytest.mark.parametrize("penalty", [1e-30, 1e-46, 1e30])
def test_token_ban_holds_whatever_the_penalty(penalty):
    """The ban came first and a penalty ** count of 0 or inf then turned its -inf into NaN
    (argmax picks NaN): a banned id was generated."""
    logits = jnp.asarray(LOGITS)
    banned = [3, 5]  # the largest logit and one at 0.0, both with counts
    params, features = make_sampling_params(
        1, LOGITS.shape[1], penalty=penalty, max_penalty_range=[1, 3], token_ban=banned
    )
    penalties = PenaltyState(jnp.asarray(COUNTS), None, None, None, None)
    processed = np.asarray(process_logits(logits, params, penalties, features))
    assert np.all(processed[0, banned] == -np.inf)
    assert np.all(np.isfinite(np.delete(processed[0], banned)))
    assert int(np.argmax(processed[0])) not in banned


def test_a_temperature_past_float32_is_a_uniform_draw_not_nan():
    """1e39 became inf in float32 and -inf / inf = NaN: every draw was id 0 (banned)."""
    logits = fixed_logits(batch=2, seed=7)
    samples = draw(logits, search_mode="topk", k=VOCAB, temperature=1e39, token_ban=[0, 1])
    assert not set(samples.ravel().tolist()) & {0, 1}
    assert len(set(samples[:, 0].tolist())) > VOCAB // 2  # spread over the vocabulary


# ---- the seed's repetition penalty ----------------------------------------------------

LOGITS = np.array([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]], np.float32)
COUNTS = np.array([[0, 2, 1, 3, 0, 4]], np.int32)


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        # no max_penalty_range: every id in the window, once
        (1, 1, [2.0, -2.0, 0.25, 1.5, -2.0, 0.0]),
        # [2, 3]: counts below 2 untouched, the exponent capped at 3
        (2, 3, [2.0, -4.0, 0.5, 3.0 / 8, -2.0, 0.0]),
        # [1, 2]
        (1, 2, [2.0, -4.0, 0.25, 0.75, -2.0, 0.0]),
    ],
)
def test_repetition_penalty_hand_computed(lo, hi, expected):
    out = apply_repetition_penalty(
        jnp.asarray(LOGITS), jnp.asarray(COUNTS), jnp.array([2.0]), jnp.array([lo]), jnp.array([hi])
    )
    np.testing.assert_allclose(np.asarray(out)[0], expected, rtol=1e-6)


def brute_window_counts(sequence: list[int], position: int, window: int | None) -> np.ndarray:
    start = 0 if window is None else max(position // window - 1, 0) * window
    counts = np.zeros(VOCAB, np.int32)
    for token in sequence[start:position]:
        if token:
            counts[token] += 1
    return counts


@pytest.mark.parametrize("window", [None, 1, 3, 4])
def test_penalty_window_counts_match_brute_force(window):
    """Window = current block of W positions + the previous block, prompt included."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 6, n).tolist() for n in (0, 2, 5, 7)]
    generated = rng.integers(1, 6, (11, len(prompts)))
    params, features = make_sampling_params(len(prompts), VOCAB, penalty=1.5, penalty_window=window)
    history = np.zeros((len(prompts), 7 + (11 if window else 0)), np.int32)
    for b, prompt in enumerate(prompts):
        history[b, : len(prompt)] = prompt
    length = jnp.array([len(p) for p in prompts], jnp.int32)
    state = init_penalties(jnp.asarray(history), length, VOCAB, features)
    update = jax.jit(lambda s, t: update_penalties(s, t, jnp.ones(4, bool), params, features))
    sequences = [list(p) for p in prompts]
    for step in range(generated.shape[0] + 1):
        for b, seq in enumerate(sequences):
            expected = brute_window_counts(seq, len(seq), window)
            np.testing.assert_array_equal(np.asarray(state.counts)[b], expected)
        if step < generated.shape[0]:
            state = update(state, jnp.asarray(generated[step], jnp.int32))
            for b, seq in enumerate(sequences):
                seq.append(int(generated[step, b]))


# ---- the official pipeline's alpha penalties ------------------------------------------


def test_alpha_penalties_hand_computed():
    """Generated 3, 1, 3 with alpha_decay 0.5: f[3] = (1 * 0.5) * 0.5 + 1 = 1.25,
    f[1] = 1 * 0.5 = 0.5; penalty = alpha_presence + alpha_frequency * f."""
    params, features = make_sampling_params(
        1, VOCAB, alpha_frequency=0.2, alpha_presence=0.1, alpha_decay=0.5
    )
    zero = jnp.zeros((1, 1), jnp.int32)
    state = init_penalties(zero, jnp.zeros(1, jnp.int32), VOCAB, features)
    for token in (3, 1, 3):
        state = update_penalties(state, jnp.array([token]), jnp.array([True]), params, features)
    frequency = np.asarray(state.frequency)[0]
    assert frequency[3] == pytest.approx(1.25) and frequency[1] == pytest.approx(0.5)
    logits = jnp.ones((1, VOCAB), jnp.float32)
    out = np.asarray(process_logits(logits, params, state, features))[0]
    expected = np.ones(VOCAB, np.float32)
    expected[3] -= 0.1 + 0.2 * 1.25
    expected[1] -= 0.1 + 0.2 * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_alpha_penalty_only_on_present_tokens():
    out = apply_alpha_penalty(
        jnp.array([[1.0, 1.0]]),
        jnp.array([[0.0, 0.0]]),
        jnp.array([[True, False]]),
        jnp.array([0.5]),
        jnp.array([0.25]),
    )
    np.testing.assert_allclose(np.asarray(out), [[0.75, 1.0]])


def test_features_compile_only_what_is_used():
    _, features = make_sampling_params(2, VOCAB)
    assert features == SamplerFeatures()
    _, features = make_sampling_params(2, VOCAB, search_mode="topp", k=[0.5, 3], penalty=1.2)
    assert features.sample and features.top_k and features.top_p and features.penalty
    assert not features.alpha and features.penalty_window is None


# ---- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(search_mode="beam"), "search_mode"),
        (dict(search_mode="topk", k=0), "top-k"),
        (dict(search_mode="topk", k=2.5), "top-k"),
        (dict(search_mode="topk"), "top-k"),
        (dict(search_mode="topp", k=0.0), "top-p"),
        (dict(search_mode="topp", k=1.5), "top-p"),
        (dict(search_mode="topp", k=[0.5, 0]), "top-k"),
        (dict(search_mode="topp", k=[0.5]), "[p, k]"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(penalty=0.0), "penalty"),
        (dict(penalty_window=0), "penalty_window"),
        (dict(max_penalty_range=[3]), "max_penalty_range"),
        (dict(max_penalty_range=[3, 2]), "max_penalty_range[1]"),
        (dict(max_penalty_range=[-1, 2]), "max_penalty_range[0]"),
        (dict(alpha_frequency=float("inf")), "alpha_frequency"),
        (dict(alpha_presence="x"), "alpha_presence"),
        (dict(alpha_decay=1.5), "alpha_decay"),
        (dict(token_ban=[VOCAB]), "token_ban"),
        (dict(token_ban=5), "token_ban"),
        (dict(token_ban=list(range(VOCAB))), "token_ban"),
    ],
)
def test_bad_values_raise_naming_the_argument(settings, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        make_sampling_params(2, VOCAB, **settings)
