"""benchmarks/profile_train.py's attribution of profiled kernels to their JAX source."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.profile_generate import _union_ms
from benchmarks.profile_train import kernel_origins, kind_of


def test_kernel_origins_name_each_instruction_by_shape_and_source():
    def f(x, w):
        return jnp.tanh(x @ w).sum(axis=0) * 2.0

    x, w = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 4), jnp.float32)
    text = jax.jit(f).lower(x, w).compile().as_text()
    origins = kernel_origins(text)
    # Profilers write "fusion.3" as "fusion_3": every key is in that form.
    assert origins and all("." not in name for name in origins), origins
    dots = [o for o in origins.values() if o.endswith("dot_general")]
    assert dots and all(o.startswith("f32[8,4]") for o in dots), origins
    assert any("tanh" in o for o in origins.values()), origins
    # The jit(...) prefix is cut: the path starts at the op.
    assert not any(o.split(" ", 1)[1].startswith("jit(") for o in origins.values()), origins


def test_kernel_origins_list_every_source_of_a_deduplicated_kernel():
    # Two layers' weight gradients of two projections share one kernel (XLA's
    # deduplicated_name); a third instruction has its own.
    text = "\n".join(
        f"  %gemm_fusion_dot.{n} = bf16[64,64]{{1,0}} fusion(%a, %b), kind=kCustom, "
        f'metadata={{op_name="jit(step)/while/body/closed_call/transpose(jvp(m))/block_{layer}'
        f'/{proj}/transpose" {dedup}scheduling_name="x"}}'
        for n, layer, proj, dedup in [
            (7, 0, "ffn/receptance", ""),
            (8, 1, "ffn/receptance", 'deduplicated_name="gemm_fusion_dot.7" '),
            (9, 0, "att/gate", 'deduplicated_name="gemm_fusion_dot.7" '),
            (10, 0, "att/key", ""),
        ]
    )
    origins = kernel_origins(text)
    assert origins["gemm_fusion_dot_7"] == (
        "bf16[64,64]{1,0} transpose(jvp(m))/block_*/ffn/receptance/transpose"
        " | transpose(jvp(m))/block_*/att/gate/transpose"
    )
    assert (
        origins["gemm_fusion_dot_10"]
        == "bf16[64,64]{1,0} transpose(jvp(m))/block_*/att/key/transpose"
    )
    assert "gemm_fusion_dot_8" not in origins  # no kernel of its own


def test_union_of_kernel_intervals_counts_overlaps_once():
    # ns intervals: [0, 10) and [5, 20) overlap (20 ns), [30, 35) apart, [31, 33) inside it.
    intervals = [(30, 35), (5, 20), (0, 10), (31, 33)]
    assert _union_ms(intervals) == 25 / 1e6
    assert _union_ms([]) == 0.0


def test_kinds_put_nccl_kernels_under_collective():
    assert kind_of("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL") == "collective"
    assert kind_of("ncclDevKernel_AllGather_RING_LL") == "collective"
    assert kind_of("input_reduce_fusion_12") == "reduce"
    assert kind_of("wkv6_states") == "wkv_kernel"


def test_timed_model_of_state_tuning_has_random_frozen_projections():
    """bench_train_gpu.py and profile_train.py time the same model: in state tuning its
    frozen projection kernels are drawn at random (the official init zeroes the output
    projections, and a GPU multiplies zeros faster: the 1.6B state step's profile took 228
    ms against the benchmark's 249 before both built it this way)."""
    import numpy as np

    from benchmarks.bench_train_cpu import SHAPES, build_timed_model
    from rwkv_ray.train.config import JobConfig

    def kernels(mode):
        config = JobConfig.from_dict(
            {"mode": mode, "model": {"config": SHAPES["tiny"]}, "data": {"train": "unused"}}
        )
        model = build_timed_model(config)
        return {v.path: np.asarray(v.value) for v in model.weights if v.path.endswith("kernel")}

    state, full = kernels("state"), kernels("full")
    outputs = [path for path in full if path.endswith("output/kernel")]
    assert outputs and all(np.all(full[p] == 0) for p in outputs), outputs  # the official init
    for path, value in state.items():
        assert 0.015 < float(np.std(value)) < 0.025, (path, float(np.std(value)))
