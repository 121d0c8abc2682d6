"""Generation and state inference for RWKV6: batched, compiled (jax.jit), exact.

- `generate` / `stream_generate`: see `rwkv_ray.generation.generate`.
- Sampling controls (the seed's and the official pipeline's): `rwkv_ray.generation.sampling`.
- States as files and the RWKV-PEFT time_state layout: `rwkv_ray.generation.state_io`.
- Streamed tokens -> text pieces (stop strings, cut characters): `rwkv_ray.generation.text_stream`.
"""

from rwkv_ray.generation.engine import compile_counts
from rwkv_ray.generation.generate import (
    GenerationResult,
    GenerationStream,
    generate,
    stream_generate,
)
from rwkv_ray.generation.state import GenerationState, StateMismatchError
from rwkv_ray.generation.state_io import (
    export_peft_state,
    import_peft_state,
    load_state,
    save_state,
)

__all__ = [
    "GenerationResult",
    "GenerationState",
    "GenerationStream",
    "StateMismatchError",
    "compile_counts",
    "export_peft_state",
    "generate",
    "import_peft_state",
    "load_state",
    "save_state",
    "stream_generate",
]
