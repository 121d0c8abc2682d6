"""State files (`save_state` / `load_state`) and the RWKV-PEFT time_state .pth layout
(`export_peft_state` / `import_peft_state`), the latter against the official `rwkv` package
with the file merged into the base checkpoint. Logit tolerance: 1e-4 of the largest |logit|
(as in test_model_vs_official.py)."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
import torch
from official import OfficialModel, random_state_dict, torch_save

import rwkv_ray
from rwkv_ray.generation import (
    GenerationState,
    StateMismatchError,
    export_peft_state,
    import_peft_state,
    load_state,
    save_state,
)
from rwkv_ray.generation.state_io import config_hash, read_state_metadata
from rwkv_ray.models import RWKV6Config, RWKV6State

VOCAB = 97
RTOL_OF_MAX = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    sd = random_state_dict(21, vocab_size=VOCAB, num_layers=2, hidden_size=128)
    path = torch_save(sd, tmp_path_factory.mktemp("state") / "model.pth")
    return sd, path, rwkv_ray.load_model(path)


@pytest.fixture(scope="module")
def forward(ckpt):
    """Jitted model.forward (the eager one compiles op by op: slow on a busy CPU)."""
    model = ckpt[2]
    call = jax.jit(lambda tv, ntv, ids, state: model.stateless_call(tv, ntv, ids, state=state)[0])
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def run(tokens, state):
        logits, _ = call(tv, ntv, np.array([tokens], np.int32), RWKV6State(*state))
        return np.asarray(logits)[0]

    return run


def random_state(config: RWKV6Config, batch: int, seed: int, shifts: bool = True):
    rng = np.random.default_rng(seed)
    layers, c, h, n = config.num_layers, config.hidden_size, config.num_heads, config.head_size
    shift_scale = 1.0 if shifts else 0.0
    return RWKV6State(
        att_shift=(rng.standard_normal((layers, batch, c)) * shift_scale).astype(np.float32),
        wkv=(rng.standard_normal((layers, batch, h, n, n)) * 0.5).astype(np.float32),
        ffn_shift=(rng.standard_normal((layers, batch, c)) * shift_scale).astype(np.float32),
    )


def assert_close_to_max(ours, ref, what):
    err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert err <= RTOL_OF_MAX, f"{what}: error {err:.2e} of max |ref|"


def test_state_file_round_trip_one_row_with_logits(ckpt, tmp_path):
    _, _, model = ckpt
    state = random_state(model.config, 3, seed=1)
    logits = np.random.default_rng(2).standard_normal((3, VOCAB)).astype(np.float32)
    path = save_state(GenerationState(*state, logits=logits), tmp_path / "s.state", model, row=2)
    loaded = load_state(path, model)
    for got, want in zip(loaded, state, strict=True):
        np.testing.assert_array_equal(got, want[:, 2:3])
    np.testing.assert_array_equal(loaded.logits, logits[2:3])
    meta = read_state_metadata(path)
    assert meta["config_hash"] == config_hash(model.config)
    assert (meta["num_layers"], meta["hidden_size"], meta["num_heads"], meta["head_size"]) == (
        2,
        128,
        2,
        64,
    )
    assert meta["dtype"] == "float32" and meta["batch"] == 1 and meta["has_logits"]
    assert meta["created"].endswith("+00:00")


def test_state_file_whole_batch_without_logits(ckpt, tmp_path):
    _, _, model = ckpt
    state = random_state(model.config, 2, seed=3)
    loaded = load_state(save_state(state, tmp_path / "all.npz", model.config), model)
    assert loaded.logits is None
    for got, want in zip(loaded, state, strict=True):
        np.testing.assert_array_equal(got, want)


def test_mismatched_state_file_is_refused(ckpt, tmp_path):
    _, _, model = ckpt
    other = RWKV6Config(vocab_size=VOCAB, num_layers=3, hidden_size=128, mix_lora_size=8)
    path = save_state(random_state(other, 1, seed=4), tmp_path / "other.npz", other)
    with pytest.raises(StateMismatchError, match=r"state.att_shift has shape \(3, 1, 128\)"):
        load_state(path, model)
    same_shape = RWKV6Config(vocab_size=VOCAB, num_layers=2, hidden_size=128, mix_lora_size=4)
    path = save_state(random_state(same_shape, 1, seed=5), tmp_path / "same.npz", same_shape)
    with pytest.raises(StateMismatchError, match="mix_lora_size: file 4 vs model 8"):
        load_state(path, model)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        load_state(tmp_path / "junk.npz", model)
    data = path.read_bytes()  # a copy cut short: a ValueError naming the file, not BadZipFile
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for read in (load_state, lambda p, _: read_state_metadata(p)):
        with pytest.raises(ValueError, match="cut.npz is not a readable state file"):
            read(tmp_path / "cut.npz", model)


def test_a_file_of_another_format_is_not_a_state_file(ckpt, tmp_path):
    """A weights file, junk, an empty file, a pickle or an .npy is refused with one message
    (numpy's suggested loading a pickle with allow_pickle, or an .npy failed in `with`)."""
    _, _, model = ckpt
    files = {
        "model.weights.h5": b"\x89HDF\r\n\x1a\n" + bytes(64),
        "broken.npz": b"not a zip",
        "empty.npz": b"",
        "pickled.npz": pickle.dumps({"wkv": [1.0]}),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "array.npy", np.zeros(3, np.float32))
    for name in [*files, "array.npy"]:
        path = tmp_path / name
        message = (
            f"{path} is not a state file (an .npz written by save_state; an RWKV-PEFT state "
            "is a .pth, read by import_peft_state)"
        )
        for read in (lambda p: load_state(p, model), read_state_metadata):
            with pytest.raises(ValueError) as error:
                read(path)
            assert str(error.value) == message


def test_save_refuses_a_state_of_another_shape(ckpt, tmp_path):
    _, _, model = ckpt
    bad = RWKV6State.zeros(2, 1, 4, 32)
    with pytest.raises(StateMismatchError, match=r"state.wkv has shape \(2, 1, 4, 32, 32\)"):
        save_state(bad, tmp_path / "bad.npz", model)
    with pytest.raises(ValueError, match="row"):
        save_state(random_state(model.config, 2, seed=6), tmp_path / "r.npz", model, row=5)


def test_exported_peft_state_runs_in_the_official_package(ckpt, forward, tmp_path):
    """Ours -> PEFT .pth -> merged into the base .pth -> official logits == ours."""
    sd, _, model = ckpt
    state = random_state(model.config, 2, seed=7, shifts=False)
    peft = export_peft_state(state, tmp_path / "peft.pth", row=1)
    theirs = torch.load(str(peft), weights_only=True)
    assert sorted(theirs) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    np.testing.assert_array_equal(
        theirs["blocks.1.att.time_state"].numpy(), np.swapaxes(state.wkv[1, 1], -1, -2)
    )
    merged = {**sd, **{k: v.numpy() for k, v in theirs.items()}}
    official = OfficialModel(torch_save(merged, tmp_path / "merged.pth"))
    tokens = np.random.default_rng(8).integers(1, VOCAB, 13).tolist()
    ref_logits, _ = official.forward(tokens)
    logits = forward(tokens, (p[:, 1:2] for p in state))
    assert_close_to_max(logits, ref_logits, "logits with exported state")


def test_imported_peft_state_matches_the_official_package(ckpt, forward, tmp_path):
    """Theirs (torch.save, [H, value, key], bf16 as RWKV-PEFT writes) -> ours."""
    sd, _, model = ckpt
    rng = np.random.default_rng(9)
    tensors = {
        f"blocks.{i}.att.time_state": torch.from_numpy(
            (rng.standard_normal((2, 64, 64)) * 0.5).astype(np.float32)
        ).to(torch.bfloat16)
        for i in range(2)
    }
    torch.save(tensors, str(tmp_path / "theirs.pth"))
    state = import_peft_state(tmp_path / "theirs.pth", model)
    merged = {**sd, **{k: v.float().numpy() for k, v in tensors.items()}}
    official = OfficialModel(torch_save(merged, tmp_path / "merged.pth"))
    tokens = np.random.default_rng(10).integers(1, VOCAB, 13).tolist()
    ref_logits, _ = official.forward(tokens)
    logits = forward(tokens, state)
    assert_close_to_max(logits, ref_logits, "logits with imported state")
    assert not np.asarray(state.att_shift).any() and not np.asarray(state.ffn_shift).any()


def test_peft_round_trip_and_refusals(ckpt, tmp_path):
    _, _, model = ckpt
    state = random_state(model.config, 1, seed=11, shifts=False)
    back = import_peft_state(export_peft_state(state, tmp_path / "a.pth"), model)
    np.testing.assert_array_equal(back.wkv, state.wkv)
    with pytest.raises(ValueError, match="drop_shift"):
        export_peft_state(random_state(model.config, 1, seed=12), tmp_path / "b.pth")
    export_peft_state(random_state(model.config, 1, seed=12), tmp_path / "b.pth", drop_shift=True)
    small = RWKV6Config(vocab_size=VOCAB, num_layers=2, hidden_size=64, head_size=32)
    export_peft_state(random_state(small, 1, seed=13, shifts=False), tmp_path / "c.pth")
    with pytest.raises(StateMismatchError, match=r"needs \[H, N, N\] = \(2, 64, 64\)"):
        import_peft_state(tmp_path / "c.pth", model)
    deeper = RWKV6Config(vocab_size=VOCAB, num_layers=3, hidden_size=128)
    export_peft_state(random_state(deeper, 1, seed=14, shifts=False), tmp_path / "d.pth")
    with pytest.raises(StateMismatchError, match="layers"):
        import_peft_state(tmp_path / "d.pth", model)
    torch.save({"emb.weight": torch.zeros(2, 2)}, str(tmp_path / "e.pth"))
    with pytest.raises(StateMismatchError, match="no blocks"):
        import_peft_state(tmp_path / "e.pth", model)


def test_model_tuned_state_exports(ckpt, tmp_path):
    """A model's initial wkv state (what state tuning trains) exports as PEFT too."""
    _, _, model = ckpt
    path = export_peft_state(model, tmp_path / "model_state.pth")
    back = import_peft_state(path, model)
    np.testing.assert_array_equal(back.wkv, np.asarray(model.initial_state(1).wkv))


def test_state_rows_by_index_and_refused_outside_the_batch():
    """row(-1) is the last row (with its logits); a row outside the batch is an IndexError
    naming it (row(5) of a batch of 2 was an empty state)."""
    from rwkv_ray.generation.state import GenerationState

    rng = np.random.default_rng(0)
    pieces = [
        rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 8), (2, 3, 2, 4, 4), (2, 3, 8))
    ]
    state = GenerationState(*pieces, logits=rng.standard_normal((3, 11)).astype(np.float32))
    last = state.row(-1)
    np.testing.assert_array_equal(last.wkv, pieces[1][:, 2:3])
    np.testing.assert_array_equal(last.logits, state.logits[2:3])
    for bad in (3, -4):
        with pytest.raises(IndexError, match=f"row {bad} is outside this state's batch of 3"):
            state.row(bad)
        with pytest.raises(IndexError, match=f"row {bad} is outside"):
            state.to_official(bad)
    pairs = zip(state.to_official(-1), state.to_official(2), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)


def test_official_state_lists_are_checked_piece_by_piece():
    """from_official names the state, layer and piece of a wrong shape (pieces out of order,
    a [H, N, 3] wkv, an empty list, rows with other layer counts were taken or failed in
    numpy)."""
    from rwkv_ray.models import RWKV6State

    rng = np.random.default_rng(1)
    state = RWKV6State(*(rng.standard_normal(s).astype(np.float32)
                         for s in ((2, 1, 8), (2, 1, 2, 4, 4), (2, 1, 8))))  # fmt: skip
    rows = state.to_official(0)
    back = RWKV6State.from_official(rows)
    np.testing.assert_array_equal(back.wkv, state.wkv)
    cases = [
        ([rows[1], rows[0], rows[2]] * 2, r"state 0, layer 0: piece 0 has shape \(2, 4, 4\)"),
        ([p[..., :3] if i % 3 == 1 else p for i, p in enumerate(rows)], r"layer 0: piece 1"),
        ([], "3 arrays per layer"),
        ([rows, rows[:3]], "state 1 has 1 layers, state 0 2"),
    ]
    for states, message in cases:
        with pytest.raises(ValueError, match=message):
            RWKV6State.from_official(states)
