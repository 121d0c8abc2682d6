"""Our Keras RWKV6 against the official `rwkv` package (CPU, fp32) on random checkpoints in
the official layout. Tolerance: 1e-4 of the largest |logit| (fp32 round-off of two
implementations that order their sums differently is ~1e-6 here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from official import OfficialModel, official_state_to_numpy, random_state_dict, torch_save

import rwkv_ray
from rwkv_ray.models import RWKV6State

RTOL_OF_MAX = 1e-4

SHAPES = {
    # name: random_state_dict kwargs
    "L2-C128-N64-ts": dict(vocab_size=97, num_layers=2, hidden_size=128, time_state=True),
    "L3-C64-N32": dict(
        vocab_size=300, num_layers=3, hidden_size=64, head_size=32, mix_lora=4, decay_lora=8
    ),
    "L1-C192-N64-F256-ts": dict(
        vocab_size=50,
        num_layers=1,
        hidden_size=192,
        intermediate_size=256,
        mix_lora=16,
        decay_lora=24,
        time_state=True,
    ),
    "L2-C128-N16": dict(vocab_size=1000, num_layers=2, hidden_size=128, head_size=16),
}


def assert_close_to_max(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values"
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err <= RTOL_OF_MAX, f"{what}: max error {err:.2e} of max |ref| > {RTOL_OF_MAX}"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    seed = sorted(SHAPES).index(request.param)
    sd = random_state_dict(seed, **SHAPES[request.param])
    path = torch_save(sd, tmp_path_factory.mktemp("ckpt") / "model.pth")
    return path, sd, OfficialModel(path), rwkv_ray.load_model(path)


def tokens_for(vocab_size: int, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab_size, length).tolist()


def test_logits_and_state_match_official(checkpoint):
    _, sd, official, ours = checkpoint
    tokens = tokens_for(sd["emb.weight"].shape[0], 37, seed=1)
    ref_logits, ref_state = official.forward(tokens)
    logits, state = ours.forward(np.array([tokens]))
    assert_close_to_max(np.asarray(logits)[0], ref_logits, "logits")
    for i, (a, b) in enumerate(
        zip(state.to_official(0), official_state_to_numpy(ref_state), strict=True)
    ):
        assert_close_to_max(a, b, f"state[{i}]")


def test_split_sequence_continues_from_state(checkpoint):
    _, sd, official, ours = checkpoint
    tokens = tokens_for(sd["emb.weight"].shape[0], 30, seed=2)
    ref_logits, _ = official.forward(tokens)
    first, state = ours.forward(np.array([tokens[:13]]))
    second, _ = ours.forward(np.array([tokens[13:]]), state)
    both = np.concatenate([np.asarray(first)[0], np.asarray(second)[0]])
    assert_close_to_max(both, ref_logits, "split logits")


def test_official_state_continues_in_ours(checkpoint):
    _, sd, official, ours = checkpoint
    tokens = tokens_for(sd["emb.weight"].shape[0], 20, seed=3)
    _, ref_state = official.forward(tokens[:11])
    ref_logits, _ = official.forward(tokens[11:], ref_state)
    state = RWKV6State.from_official(official_state_to_numpy(ref_state))
    logits, _ = ours.forward(np.array([tokens[11:]]), state)
    assert_close_to_max(np.asarray(logits)[0], ref_logits, "logits after official state")


def test_left_padded_rows_in_mixed_batch(checkpoint):
    _, sd, official, ours = checkpoint
    vocab = sd["emb.weight"].shape[0]
    rows = [tokens_for(vocab, n, seed=10 + n) for n in (17, 5, 1, 12)]
    length = max(map(len, rows))
    batch = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        batch[b, length - len(row) :] = row
    logits, state = ours.forward(batch)
    logits = np.asarray(logits)
    for b, row in enumerate(rows):
        ref_logits, ref_state = official.forward(row)
        assert_close_to_max(logits[b, length - len(row) :], ref_logits, f"row {b} logits")
        for i, (a, r) in enumerate(
            zip(state.to_official(b), official_state_to_numpy(ref_state), strict=True)
        ):
            assert_close_to_max(a, r, f"row {b} state[{i}]")


def test_padding_leaves_state_untouched(checkpoint):
    _, sd, _, ours = checkpoint
    tokens = tokens_for(sd["emb.weight"].shape[0], 9, seed=4)
    _, state = ours.forward(np.array([tokens]))
    _, after = ours.forward(np.zeros((1, 6), np.int32), state)
    for before_piece, after_piece in zip(state.numpy(), after.numpy(), strict=True):
        np.testing.assert_array_equal(before_piece, after_piece)


@pytest.mark.parametrize("impl", ["scan", "chunked"])
def test_padding_with_an_infinite_log_decay_leaves_state_untouched(checkpoint, impl):
    """time_decay 100 in one channel: log_w = -exp(100) = -inf in float32 (that channel
    forgets at once). The pad mask multiplied log_w by 0 (NaN into the state); now it
    selects. Left padding and pad steps must still change nothing."""
    path, sd, _, _ = checkpoint
    model = rwkv_ray.load_model(path, wkv_impl=impl)
    decay = model.backbone.blocks[0].time_mix.time_decay
    decay.assign(np.concatenate([[100.0], np.asarray(decay.value)[1:]]).astype(np.float32))
    tokens = tokens_for(sd["emb.weight"].shape[0], 9, seed=4)
    logits, state = model.forward(np.array([tokens]))
    assert np.isfinite(np.asarray(logits)).all()
    padded_logits, padded = model.forward(np.array([[0, 0, 0] + tokens]))
    np.testing.assert_allclose(np.asarray(padded_logits)[0, 3:], np.asarray(logits)[0], atol=1e-5)
    for a, b in zip(padded.numpy(), state.numpy(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    _, after = model.forward(np.zeros((1, 2), np.int32), state)
    for a, b in zip(after.numpy(), state.numpy(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_forward_refuses_ids_outside_the_vocabulary(checkpoint):
    """The official package raises IndexError; ours returned NaN logits and a NaN state
    (the embedding's gather fills rows it cannot index)."""
    _, sd, _, ours = checkpoint
    vocab = sd["emb.weight"].shape[0]
    for bad in (vocab, vocab + 1000, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary"):
            ours.forward(np.array([[5, bad]]))
    with pytest.raises(TypeError, match="token_ids must be integers, got float"):
        ours.forward(np.array([[5.0, 1.5]]))
    logits, _ = ours.forward(np.array([[5, vocab - 1]], np.int64))  # the last id is fine
    assert np.isfinite(np.asarray(logits)).all()


def test_initial_state_is_time_state(checkpoint):
    _, sd, _, ours = checkpoint
    state = ours.initial_state(2).numpy()
    for i in range(ours.config.num_layers):
        key = f"blocks.{i}.att.time_state"
        expected = np.swapaxes(sd[key], -1, -2) if key in sd else 0.0
        np.testing.assert_array_equal(
            state.wkv[i, 1], np.broadcast_to(expected, state.wkv[i, 1].shape)
        )
    assert not state.att_shift.any() and not state.ffn_shift.any()


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_bfloat16_policies_stay_close_with_float32_decay_and_state(checkpoint, policy, monkeypatch):
    """bf16 matmuls, but decay, bonus, GroupNorm and the state in float32. Under
    "mixed_bfloat16" (full tuning's float32 masters) Keras autocast every float variable
    read in call: decay, bonus and ln_x were rounded to bf16, and the state came back bf16
    (0.03 off the same run started from an explicit float32 zero state)."""
    from rwkv_ray.models.rwkv6_time_mix import RWKV6TimeMix

    path, sd, official, _ = checkpoint
    tokens = tokens_for(sd["emb.weight"].shape[0], 16, seed=5)
    ref_logits, _ = official.forward(tokens)
    model = rwkv_ray.load_model(path, dtype=policy)
    seen = set()
    log_decay = RWKV6TimeMix._log_decay

    def spy(self, *args, **kwargs):
        for weight in (self.time_decay, self.time_faaaa, self.ln_x_gamma, self.ln_x_beta):
            seen.add(str(weight.value.dtype))  # what call reads (autocast applies here)
        return log_decay(self, *args, **kwargs)

    monkeypatch.setattr(RWKV6TimeMix, "_log_decay", spy)
    logits, state = model.forward(np.array([tokens]))
    assert seen == {"float32"}
    assert {str(np.asarray(piece).dtype) for piece in state} == {"float32"}
    _, same = model.forward(np.array([tokens]), model.initial_state(1))
    for a, b in zip(state, same, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    err = np.abs(np.asarray(logits, np.float32)[0] - ref_logits).max() / np.abs(ref_logits).max()
    assert err < 0.1, f"{policy} logits differ by {err:.3f} of max |logit|"


BACKEND_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import rwkv_ray
model = rwkv_ray.load_model({path!r})
logits, state = model.forward(np.array([{tokens!r}]))
import keras
np.save({out!r}, keras.ops.convert_to_numpy(logits)[0])
"""


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_forward_under_other_keras_backends(backend, tmp_path):
    sd = random_state_dict(7, **SHAPES["L2-C128-N64-ts"])
    path = torch_save(sd, tmp_path / "model.pth")
    tokens = tokens_for(97, 12, seed=6)
    out = tmp_path / "logits.npy"
    script = BACKEND_SCRIPT.format(
        tests=str(Path(__file__).parent), path=str(path), tokens=tokens, out=str(out)
    )
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ref_logits, _ = OfficialModel(path).forward(tokens)
    assert_close_to_max(np.load(out), ref_logits, f"{backend} logits")
