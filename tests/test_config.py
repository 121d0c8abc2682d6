import json

import pytest
from official import random_state_dict

from rwkv_ray.models import ConfigError, RWKV6Config


def test_json_round_trip(tmp_path):
    config = RWKV6Config(vocab_size=1000, num_layers=3, hidden_size=256, mix_lora_size=16)
    path = tmp_path / "config.json"
    config.to_json(path)
    assert RWKV6Config.from_json(path) == config
    assert RWKV6Config.from_json(config.to_json()) == config


def test_defaults_follow_official_sizes():
    config = RWKV6Config()
    assert (config.hidden_size, config.num_heads, config.intermediate_size) == (2048, 32, 7168)


def test_reads_seed_config_names():
    seed = {
        "vocab_size": 65536,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "hidden_size": 2048,
        "intermediate_size": 7168,
        "attention_head_size": 64,
        "decomposer_size": 32,
        "time_decay_size": 64,
    }
    config = RWKV6Config.from_dict(seed)
    assert config == RWKV6Config(
        vocab_size=65536, num_layers=24, hidden_size=2048, intermediate_size=7168
    )
    with pytest.raises(ConfigError, match="num_attention_heads"):
        RWKV6Config.from_dict({**seed, "num_attention_heads": 16})
    # Both names for one field: which won depended on the keys' order (5 or 24 layers).
    for mixed in ({**seed, "num_layers": 5}, {"num_layers": 5, **seed}):
        with pytest.raises(ConfigError, match=r"num_hidden_layers / num_layers"):
            RWKV6Config.from_dict(mixed)


def test_checkpoint_dtype_from_the_state_dict():
    import numpy as np

    from rwkv_ray.models.rwkv6_config import CHECKPOINT_DTYPES

    class TorchLike:  # a torch tensor's dtype prints as "torch.float16"
        def __init__(self, shape, dtype):
            self.shape, self.dtype = shape, dtype

    def state_dict(emb):
        return {
            "emb.weight": emb,
            "blocks.0.att.time_faaaa": np.zeros((2, 64)),
            "blocks.0.att.time_maa_w1": np.zeros((128, 160)),
            "blocks.0.att.time_decay_w1": np.zeros((128, 64)),
            "blocks.0.ffn.key.weight": np.zeros((448, 128)),
        }

    torch_half = TorchLike((300, 128), "torch.float16")
    assert RWKV6Config.from_state_dict(state_dict(torch_half)).checkpoint_dtype == "float16"
    for dtype, expected in (("float64", "float32"), ("float16", "float16")):
        emb = np.zeros((300, 128), dtype)
        assert RWKV6Config.from_state_dict(state_dict(emb)).checkpoint_dtype == expected
    assert "float64" not in CHECKPOINT_DTYPES  # a float64 file is computed in float32
    for dtype in ("int8", "complex64"):  # not weights: refused, not cast
        with pytest.raises(ConfigError, match=rf"checkpoint_dtype must be one of .*{dtype}"):
            RWKV6Config.from_state_dict(state_dict(np.zeros((300, 128), dtype)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", 0),
        ("hidden_size", -8),
        ("head_size", 48),  # 2048 is not a multiple of 48
        ("mix_lora_size", 2.5),
        ("layer_norm_epsilon", 0),
        ("checkpoint_dtype", "int8"),
        ("vocab_size", True),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RWKV6Config(**{field: value})


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="hiden_size"):
        RWKV6Config.from_dict({"hiden_size": 128})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RWKV6Config.from_json(bad)


def test_inferred_from_checkpoint_shapes_including_lora_widths():
    sd = random_state_dict(
        0, vocab_size=77, num_layers=3, hidden_size=192, head_size=32,
        intermediate_size=320, mix_lora=12, decay_lora=40,
    )  # fmt: skip
    config = RWKV6Config.from_state_dict(sd)
    expected = dict(
        vocab_size=77, num_layers=3, hidden_size=192, head_size=32,
        intermediate_size=320, mix_lora_size=12, decay_lora_size=40,
        checkpoint_dtype="float32",
    )  # fmt: skip
    assert {k: getattr(config, k) for k in expected} == expected
    del sd["blocks.0.att.time_faaaa"]
    with pytest.raises(ConfigError, match="time_faaaa"):
        RWKV6Config.from_state_dict(sd)


def test_config_json_is_plain_json():
    assert json.loads(RWKV6Config(num_layers=2).to_json())["num_layers"] == 2
