"""The kernels of one decode step on an H100, counted without a GPU.

    python benchmarks/gpu_hlo.py --batch 1 --out benchmarks/results/decode_kernels_aot.json

At batch 1 a decode step is bound by kernel count as much as by weight reads (BENCHMARKS.md:
~1 ms of a ~2 ms token is ~25 small kernels per layer). XLA's GPU compiler can compile for
a GPU it does not see (a compile-only "topology" from a target description), so the fusion
decisions, hence the kernels launched per layer, can be read on any machine: this compiles
the engine's decode loop (`Engine.loop_fn`, packed kernels, the decode-step Pallas kernel)
for the 1.6B width at two depths and reports the kernels of the loop body per layer, by
kind, and lists one layer's. Not autotuned (no GPU to time candidates on): XLA's default
GEMM configs, so split-K reduction kernels can differ from a real run's. A diagnostic for
the next GPU session, not a measurement.

Needs a separate environment with JAX's CUDA plugin (about 5 GB; no GPU or driver needed),
the same JAX version as the project's, and keras:
    python -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install "jax==$V" "jaxlib==$V" \\
        "jax-cuda12-plugin[with-cuda]==$V" keras
    PYTHONPATH=. /tmp/gpuaot/bin/python benchmarks/gpu_hlo.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

# Compile-only: no CUDA device is opened, so the plugin's driver-version check is skipped.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("KERAS_BACKEND", "jax")

# H100 SXM5 80GB (XLA GpuTargetConfigProto text format; the figures NVIDIA publishes).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# An A100 80GB SXM (sm80): H100_TARGET with the A100's compute capability, SM count,
# shared memory, cache, clock and bandwidth (NVIDIA's A100 data sheet).
A100_TARGET = (
    H100_TARGET.replace("shared_memory_per_core: 233472", "shared_memory_per_core: 167936")
    .replace("core_count: 132", "core_count: 108")
    .replace("fpus_per_core: 128", "fpus_per_core: 64")
    .replace("memory_bandwidth: 3352320000000", "memory_bandwidth: 2039000000000")
    .replace("l2_cache_size: 52428800", "l2_cache_size: 41943040")
    .replace("clock_rate_ghz: 1.98", "clock_rate_ghz: 1.41")
    .replace("shared_memory_per_block_optin: 232448", "shared_memory_per_block_optin: 166912")
    .replace("cuda_compute_capability { major: 9 }", "cuda_compute_capability { major: 8 }")
    .replace("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
)

# HLO instructions that launch nothing.
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=1, help="decode rows (bucketed as the engine does)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16", help="Keras dtype policy")
    p.add_argument("--pack", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--hlo-dir", help="also write each compiled HLO module here")
    p.add_argument("--out", help="write the counts as JSON here")
    return p.parse_args(argv)


def compile_only_device(target: str = H100_TARGET):
    """A device of a compile-only CUDA topology described by `target` (no GPU needed)."""
    return compile_only_devices(1, target)[0]


def compile_only_devices(count: int, target: str = H100_TARGET) -> list:
    """`count` GPUs of one host, compile-only, each described by `target`."""
    import jax
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            "gpu", "cuda", target_config=target, topology=f"1x1x{count}"
        )
    except (NotImplementedError, RuntimeError) as err:
        sys.exit(
            f"cannot compile for CUDA here ({err}); this needs jax-cuda12-plugin matching jax "
            f"{jax.__version__} (see the docstring)"
        )
    return list(topology.devices)


def pretend_gpu() -> None:
    """The engine and the WKV dispatcher choose by the backend they run on; they must choose
    as on a GPU (2-row bucket, packed kernels, the Pallas step kernel)."""
    import jax

    from rwkv_ray.ops import wkv_kernel

    jax.default_backend = lambda: "gpu"
    wkv_kernel.is_available = lambda: (True, "compile-only H100 target")


def compiled_decode_loop(device, layers: int, args) -> str:
    """HLO text of `Engine.loop_fn` compiled for `device` (greedy sampling)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rwkv_ray.generation import engine as eng
    from rwkv_ray.generation.generate import _end_mask
    from rwkv_ray.generation.sampling import PenaltyState, make_sampling_params
    from rwkv_ray.models import RWKV6CausalLM, RWKV6Config

    config = RWKV6Config(
        vocab_size=args.vocab, num_layers=layers, hidden_size=args.hidden, head_size=64
    )
    model = RWKV6CausalLM.from_model_config(config, wkv_impl="kernel", dtype=args.dtype)
    engine = eng.Engine(model, pack={"auto": None, "on": True, "off": False}[args.pack])
    rows = eng.bucket_batch(args.batch)
    params, features = make_sampling_params(rows, args.vocab)
    penalties = PenaltyState(None, None, jnp.zeros((rows,), jnp.int32), None, None)
    logits = jnp.zeros((rows, args.vocab), jnp.float32)
    carry = eng.new_carry(model.initial_state(rows), logits, 64, penalties, 0, np.zeros(rows, bool))
    end_mask, _ = _end_mask(None, args.vocab)
    concrete = (*engine.decode_variables(), carry, params, jnp.asarray(end_mask), jnp.int32(64))
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), concrete
    )
    return engine.loop_fn.lower(*abstract, features=features).compile().as_text()


def instructions(hlo: str, computation: str) -> list[tuple[str, str, str]]:
    """(name, op, the whole line) of each instruction of a computation in HLO text."""
    lines = hlo.splitlines()
    header = re.compile(rf"^(ENTRY )?%?{re.escape(computation)} ")
    start = next(i for i, line in enumerate(lines) if header.match(line))
    found = []
    for line in lines[start + 1 :]:
        if line.strip() == "}":
            break
        match = re.match(r"\s*(?:ROOT )?(%?[\w.\-]+) = (.*)$", line)
        if not match:
            continue
        rest = _after_shape(match.group(2))
        found.append((match.group(1), rest.split("(")[0], line))
    return found


def _after_shape(text: str) -> str:
    """What follows an instruction's result shape (a tuple shape holds spaces)."""
    if not text.startswith("("):
        return text.partition(" ")[2]
    depth = 0
    for index, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            return text[index + 2 :]
    return ""


def loop_kernels(hlo: str) -> list[tuple[str, str, str]]:
    """The kernel-launching instructions of the decode while loop's body."""
    body = re.search(r"while\(.*?body=%?([\w.\-]+)", hlo).group(1)
    return [i for i in instructions(hlo, body) if i[1] not in NOT_KERNELS]


def describe(name: str, op: str, line: str) -> str:
    kind = re.search(r"kind=(\w+)", line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    return " ".join(filter(None, [name, op, kind and kind.group(1), target and target.group(1)]))


def main(argv=None):
    args = parse_args(argv)
    device = compile_only_device()
    pretend_gpu()
    import jax

    counts, kernels = {}, {}
    for layers in (2, 3):
        start = time.perf_counter()
        hlo = compiled_decode_loop(device, layers, args)
        kernels[layers] = loop_kernels(hlo)
        counts[layers] = collections.Counter(op for _, op, _ in kernels[layers])
        print(f"{layers} layers: {len(kernels[layers])} kernels per step "
              f"({time.perf_counter() - start:.0f} s to compile)")  # fmt: skip
        if args.hlo_dir:
            Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
            Path(args.hlo_dir, f"decode_b{args.batch}_L{layers}.hlo").write_text(hlo)
    per_layer = {op: counts[3][op] - counts[2][op] for op in counts[3]}
    fixed = len(kernels[2]) - 2 * sum(per_layer.values())
    report = {
        "what": "kernels launched per decode step, compiled for an H100 without a GPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/gpu_hlo.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "jax": jax.__version__,
        "batch": args.batch,
        "dtype": args.dtype,
        "pack": args.pack,
        "per_layer": sum(per_layer.values()),
        "per_layer_by_op": per_layer,
        "outside_layers": fixed,
        "kernels_at_24_layers": fixed + 24 * sum(per_layer.values()),
        "step_kernels_3_layers": [describe(*k) for k in kernels[3]],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "step_kernels_3_layers"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
