"""rwkv_ray: fine-tune and serve RWKV6 (x060, Finch) models on Ray, in Keras 3 on JAX."""

import importlib
import os

# The product runs Keras on JAX; respect an explicit choice (the pure path also runs on the
# torch and tensorflow backends).
os.environ.setdefault("KERAS_BACKEND", "jax")

__version__ = "0.1.0"

# Imported on first use, so that `rwkv_ray.pth` or `rwkv_ray.tokenizer` (used by data
# workers) do not pull in Keras and JAX.
_LAZY = {
    "load_model": "rwkv_ray.convert",
    "RWKV6CausalLM": "rwkv_ray.models",
    "RWKV6Config": "rwkv_ray.models",
    "RWKV6State": "rwkv_ray.models",
    "WorldTokenizer": "rwkv_ray.tokenizer",
    "generate": "rwkv_ray.generation",
    "stream_generate": "rwkv_ray.generation",
    "GenerationResult": "rwkv_ray.generation",
    "load_state": "rwkv_ray.generation",
    "save_state": "rwkv_ray.generation",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkv_ray' has no attribute {name!r}")
