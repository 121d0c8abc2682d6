"""Conversion .pth <-> converted directory <-> .pth, strict key/shape checks, unsafe files,
and the seed-compatible `build_transformer_model`."""

from __future__ import annotations

import json
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from official import OfficialModel, random_state_dict, torch_save

import rwkv_ray
from rwkv_ray.cli import main as cli_main
from rwkv_ray.compat import build_transformer_model
from rwkv_ray.convert import CheckpointMismatchError, assign_state_dict, model_state_dict
from rwkv_ray.models import RWKV6CausalLM, RWKV6Config

SHAPE = dict(vocab_size=61, num_layers=2, hidden_size=128, mix_lora=8, decay_lora=16)
TOKENS = np.array([[0, 0, 5, 9, 33, 2, 60, 7]])


def torch_tensors(path):
    return torch.load(str(path), weights_only=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("time_state", [False, True])
def test_round_trip_is_exact(tmp_path, dtype, time_state, capsys):
    sd = random_state_dict(1, time_state=time_state, **SHAPE)
    source = torch_save(sd, tmp_path / "source.pth", dtype=dtype)
    assert cli_main(["convert", str(source), str(tmp_path / "converted")]) == 0
    assert cli_main(["export", str(tmp_path / "converted"), str(tmp_path / "back.pth")]) == 0
    stages = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert stages == [  # one line per stage of the long work, with the seconds so far
        f"reading {source} ({source.stat().st_size / 2**30:.2f} GiB)",
        f"writing {tmp_path / 'converted'}",
        "done",
        f"reading {tmp_path / 'converted'} (a directory)",
        f"writing {tmp_path / 'back.pth'}",
        "done",
    ]
    original, back = torch_tensors(source), torch_tensors(tmp_path / "back.pth")
    assert sorted(original) == sorted(back)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key


def test_a_float64_pth_loads_like_the_official_package(tmp_path):
    """The official package runs a float64 file; ours refused it (checkpoint_dtype). It is
    computed, and exported, in float32. Tolerance: 1e-4 of the largest |logit|."""
    source = torch_save(random_state_dict(4, **SHAPE), tmp_path / "f64.pth", dtype="float64")
    model = rwkv_ray.load_model(source)
    assert model.config.checkpoint_dtype == "float32"
    tokens = TOKENS[0, 2:].tolist()
    expected, _ = OfficialModel(source).forward(tokens)
    logits = np.asarray(model.forward(np.array([tokens]))[0])[0]
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_converted_directory_and_pth_give_identical_logits(tmp_path):
    source = torch_save(random_state_dict(2, time_state=True, **SHAPE), tmp_path / "m.pth")
    rwkv_ray.convert.convert_checkpoint(source, tmp_path / "dir")
    from_dir = np.asarray(rwkv_ray.load_model(tmp_path / "dir").forward(TOKENS)[0])
    from_pth = np.asarray(rwkv_ray.load_model(source).forward(TOKENS)[0])
    np.testing.assert_array_equal(from_dir, from_pth)


def test_mismatch_lists_every_offending_key(tmp_path):
    sd = random_state_dict(3, **SHAPE)
    sd["blocks.1.att.key.weight"] = sd["blocks.1.att.key.weight"][:, :64]
    del sd["blocks.0.ffn.time_maa_r"]
    sd["blocks.0.att.extra"] = np.zeros((3,), np.float32)
    model = RWKV6CausalLM.from_model_config(
        RWKV6Config.from_state_dict(random_state_dict(3, **SHAPE))
    )
    with pytest.raises(CheckpointMismatchError) as error:
        assign_state_dict(model, sd)
    message = str(error.value)
    assert (
        "shape mismatch: blocks.1.att.key.weight has (128, 64), the model needs (128, 128)"
        in message
    )
    assert "missing: blocks.0.ffn.time_maa_r" in message
    assert "unexpected: blocks.0.att.extra (3,)" in message


def test_a_blocks_key_without_a_number_is_reported_as_unexpected(tmp_path):
    """The config reads the layer count off numbered blocks only; the extra key is then
    listed by the loader (it was an int() error about 'extra')."""
    sd = random_state_dict(3, **SHAPE)
    sd["blocks.extra.note"] = np.zeros((1,), np.float32)
    config = RWKV6Config.from_state_dict(sd)
    assert config.num_layers == 2
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: blocks.extra.note \(1,\)"):
        assign_state_dict(RWKV6CausalLM.from_model_config(config), sd)


def test_wrong_number_of_layers_is_refused(tmp_path):
    sd = random_state_dict(4, **SHAPE)
    model = RWKV6CausalLM.from_model_config(
        RWKV6Config(
            vocab_size=61, num_layers=1, hidden_size=128, mix_lora_size=8, decay_lora_size=16
        )
    )
    with pytest.raises(CheckpointMismatchError, match="unexpected: blocks.1.ln1.weight"):
        assign_state_dict(model, sd)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr(
            "evil/data.pkl", pickle.dumps({"emb.weight": _Payload(marker)}, protocol=2)
        )
        archive.writestr("evil/version", "3\n")
    with pytest.raises(pickle.UnpicklingError, match="system"):
        rwkv_ray.load_model(evil)
    assert not marker.exists()


def test_export_dtype_and_time_state_rules():
    sd = random_state_dict(5, **SHAPE)
    model = RWKV6CausalLM.from_model_config(RWKV6Config.from_state_dict(sd))
    assign_state_dict(model, sd)
    exported = model_state_dict(model, dtype="bfloat16")
    assert not any(k.endswith("time_state") for k in exported)
    assert exported["emb.weight"].dtype == ml_dtypes.bfloat16
    model.backbone.blocks[1].time_mix.initial_wkv.assign(np.ones((2, 64, 64), np.float32))
    assert "blocks.1.att.time_state" in model_state_dict(model)
    with pytest.raises(ValueError, match="int8"):
        model_state_dict(model, dtype="int8")


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model"):
        rwkv_ray.load_model(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    RWKV6Config(num_layers=1, hidden_size=64).to_json(tmp_path / "half" / "config.json")
    with pytest.raises(FileNotFoundError, match="model.weights.h5"):
        rwkv_ray.load_model(tmp_path / "half")


def test_build_transformer_model_seed_compat(tmp_path):
    source = torch_save(random_state_dict(6, time_state=True, **SHAPE), tmp_path / "m.pth")
    rwkv_ray.convert.convert_checkpoint(source, tmp_path / "dir")
    seed_config = {
        "vocab_size": 61, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128,
        "intermediate_size": 448, "attention_head_size": 64, "decomposer_size": 8,
        "time_decay_size": 16,
    }  # fmt: skip
    (tmp_path / "seed.json").write_text(__import__("json").dumps(seed_config))
    built = build_transformer_model(
        config_path=tmp_path / "seed.json",
        model="rwkv6",
        keras_weights_path=tmp_path / "dir" / "model.weights.h5",
        return_keras_model=False,
        with_lm="softmax",
        penalty=1.2,
    )
    probs = np.asarray(built.model(TOKENS))
    logits = np.asarray(rwkv_ray.load_model(source).forward(TOKENS)[0])
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    assert built.generation_settings == {"penalty": 1.2}
    built.enable_state_tunig(time_shitf_tuning=True)
    trainable = {v.path.split("/")[-1] for v in built.causal_lm.trainable_weights}
    assert trainable == {"initial_wkv", "initial_shift"}
    assert len(built.causal_lm.trainable_weights) == 2 * 3
    with pytest.raises(ValueError, match="rwkv7"):
        build_transformer_model(tmp_path / "seed.json", model="rwkv7")


def test_seed_readme_workflow_runs(tmp_path):
    """The seed README's code, through rwkv_ray.compat: `rwkv.inputs` / `rwkv.outputs`
    (AttributeError before), state tuning with Keras fit, `rwkv.save_weights` read back by
    `keras_weights_path` and by `load_weights` (a different layout: "28 objects could not
    be loaded"), `RWKV.generate` with the seed's settings, `build_cache_model` named, the
    seed's batch tokenizer, and head size from num_attention_heads alone (it took 64)."""
    import keras

    from rwkv_ray.compat import RWKV_TOKENIZER

    source = torch_save(random_state_dict(6, **SHAPE), tmp_path / "m.pth")
    rwkv_ray.convert.convert_checkpoint(source, tmp_path / "dir")
    seed_config = {
        "vocab_size": 61,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_size": 128,
        "intermediate_size": 448,
        "decomposer_size": 8,
        "time_decay_size": 16,
    }  # no attention_head_size: the seed takes hidden_size // num_attention_heads
    (tmp_path / "seed.json").write_text(json.dumps(seed_config))
    four_heads = RWKV6Config.from_dict({**seed_config, "num_attention_heads": 4})
    assert four_heads.head_size == 32  # was 64 (our default), whatever the heads
    settings = dict(config_path=tmp_path / "seed.json", model="rwkv6", return_keras_model=False)
    RWKV = build_transformer_model(  # noqa: N806 - the seed README's names
        keras_weights_path=tmp_path / "dir" / "model.weights.h5", sequence_length=8,
        with_lm="softmax", penalty=1.5, **settings,
    )  # fmt: skip
    rwkv = RWKV.model
    assert [tuple(t.shape) for t in rwkv.inputs] == [(None, 8)]
    assert rwkv.inputs[0].name == "Input-Token" and tuple(rwkv.outputs[0].shape) == (None, 8, 61)
    RWKV.enable_state_tunig()
    rwkv.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="sparse_categorical_crossentropy")
    x = np.array([[0, 5, 9, 33, 2, 60, 7, 8]], "int32")
    rwkv.fit({"Input-Token": x}, x, epochs=1, verbose=0)
    rwkv.save_weights(tmp_path / "tuned.weights.h5")
    tuned = np.asarray(rwkv(x))
    again = build_transformer_model(keras_weights_path=tmp_path / "tuned.weights.h5", **settings)
    np.testing.assert_array_equal(np.asarray(again.model(x)), tuned)
    fresh = build_transformer_model(**settings)
    fresh.model.load_weights(tmp_path / "tuned.weights.h5")
    np.testing.assert_array_equal(np.asarray(fresh.model(x)), tuned)

    result = RWKV.generate([[5, 9, 33]], 4, token_ban=[0])
    expected = rwkv_ray.generate(RWKV.causal_lm, [[5, 9, 33]], 4, token_ban=[0], penalty=1.5)
    assert result.tokens == expected.tokens
    assert rwkv_ray.generate(rwkv, [[5, 9, 33]], 4, token_ban=[0]).tokens == (
        rwkv_ray.generate(RWKV.causal_lm, [[5, 9, 33]], 4, token_ban=[0]).tokens
    )
    with pytest.raises(NotImplementedError, match=r"replaced by RWKV.generate"):
        RWKV.build_cache_model([8], 0, "greedy", None, False, 0)
    tokenizer = RWKV_TOKENIZER()
    ids = tokenizer.encode(["hello world", "我是中国人"])
    assert ids[0] == tokenizer.encode("hello world")[0] == [34550, 40213]
    assert tokenizer.decode([np.array([0, 0, *ids[1]])]) == ["我是中国人"]


def test_the_seed_model_follows_the_global_dtype_policy(tmp_path):
    """keras.config.set_dtype_policy("mixed_bfloat16"), as the seed's layers follow it (the
    model ran in float32: only floatx was read)."""
    import keras

    source = torch_save(random_state_dict(6, **SHAPE), tmp_path / "m.pth")
    rwkv_ray.convert.convert_checkpoint(source, tmp_path / "dir")
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        built = build_transformer_model(tmp_path / "dir" / "config.json", return_keras_model=False)
    finally:
        keras.config.set_dtype_policy(before)
    assert built.causal_lm.backbone.dtype_policy.name == "mixed_bfloat16"


def test_a_weights_file_of_other_sizes_names_them(tmp_path):
    """Keras said "Layer 'att' expected 16 variables, but received 0 variables"."""
    source = torch_save(random_state_dict(6, **SHAPE), tmp_path / "m.pth")
    rwkv_ray.convert.convert_checkpoint(source, tmp_path / "dir")
    config = json.loads((tmp_path / "dir" / "config.json").read_text())
    (tmp_path / "dir" / "config.json").write_text(json.dumps({**config, "mix_lora_size": 16}))
    with pytest.raises(
        ValueError, match=r"does not fit the config: .*\(5, 8, 128\).*\(5, 16, 128\)"
    ):
        rwkv_ray.load_model(tmp_path / "dir")


def test_info_counts_the_checkpoints_parameters(tmp_path, capsys):
    """`rwkv-ray info`: the sizes, and as parameters the elements the .pth holds (it
    counted the zero initial states too: L * (H * N * N + 2 C) more)."""
    import json

    sd = random_state_dict(5, **SHAPE)
    source = torch_save(sd, tmp_path / "m.pth")
    assert cli_main(["info", str(source)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(np.asarray(v).size for v in sd.values())
    assert (info["num_layers"], info["hidden_size"], info["num_heads"]) == (2, 128, 2)


def test_a_torch_bf16_state_dict_assigns_like_its_file(tmp_path):
    """A state dict of torch tensors (torch.load's result) in bfloat16: numpy cannot read
    torch's bf16, so assign_state_dict failed deep inside with a TypeError."""
    source = torch_save(random_state_dict(6, **SHAPE), tmp_path / "m.pth", dtype="bfloat16")
    tensors = torch_tensors(source)
    config = RWKV6Config.from_state_dict(tensors)
    assert config.checkpoint_dtype == "bfloat16"
    model = RWKV6CausalLM.from_model_config(config)
    assign_state_dict(model, tensors)
    expected = np.asarray(rwkv_ray.load_model(source).forward(TOKENS)[0])
    np.testing.assert_array_equal(np.asarray(model.forward(TOKENS)[0]), expected)
