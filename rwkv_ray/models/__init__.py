"""Keras RWKV6 ("x060", Finch): config, layers, backbone, causal LM, state."""

from rwkv_ray.models.rwkv6_backbone import RWKV6Backbone
from rwkv_ray.models.rwkv6_block import RWKV6Block
from rwkv_ray.models.rwkv6_causal_lm import RWKV6CausalLM
from rwkv_ray.models.rwkv6_channel_mix import RWKV6ChannelMix
from rwkv_ray.models.rwkv6_config import ConfigError, RWKV6Config
from rwkv_ray.models.rwkv6_state import RWKV6State
from rwkv_ray.models.rwkv6_time_mix import RWKV6TimeMix

__all__ = [
    "ConfigError",
    "RWKV6Backbone",
    "RWKV6Block",
    "RWKV6CausalLM",
    "RWKV6ChannelMix",
    "RWKV6Config",
    "RWKV6State",
    "RWKV6TimeMix",
]
