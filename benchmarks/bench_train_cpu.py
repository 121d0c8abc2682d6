"""Training step speed without Ray: tokens/s of the jitted step for full and state tuning.

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/bench_train_cpu.py [--shape demo]

Shapes: `tiny` (V=97, L=2, C=64), `demo` (the `make demo` model: V=65536, L=2, C=128),
`1b6` (V=65536, L=24, C=2048; for a GPU). Random tokens, batch --batch x --seq-len; the first
step (compilation) is timed apart; the rate is the median of --steps steps. The load average
is recorded (a shared machine explains a lot). Writes JSON to --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_ray.train.config import JobConfig  # noqa: E402
from rwkv_ray.train.step import TrainStep, build_model, build_optimizer, move_to_host  # noqa: E402

SHAPES = {
    "tiny": {"vocab_size": 97, "num_layers": 2, "hidden_size": 64, "mix_lora_size": 8,
             "decay_lora_size": 8},
    "demo": {"vocab_size": 65536, "num_layers": 2, "hidden_size": 128},
    "1b6": {"vocab_size": 65536, "num_layers": 24, "hidden_size": 2048},
}  # fmt: skip


def remat_setting(name) -> bool | str:
    """--remat off|block|dots (or a model.remat value) -> the model.remat setting."""
    return False if name == "off" else name


def build_timed_model(config: JobConfig):
    """build_model, and when only states train, its frozen projection kernels drawn at
    random: the official init zeroes the output projections, which would leave the states
    without a gradient and every timed matmul multiplying zeros (a GPU runs those faster:
    the 1.6B state step took 228 ms with them against 249 with random kernels, H200)."""
    model = build_model(config)
    if config.mode != "full":
        rng = np.random.default_rng(0)
        for v in model.weights:
            if not v.trainable and v.path.endswith("kernel"):
                v.assign(rng.normal(0, 0.02, v.shape).astype(v.dtype))
    return model


def bench(shape: str, mode: str, args) -> dict:
    config = JobConfig.from_dict(
        {
            "mode": mode,
            "model": {
                "config": SHAPES[shape],
                "dtype": args.dtype,
                "remat": remat_setting(args.remat),
                "remat_blocks": getattr(args, "remat_blocks", None),
                "master_weights": getattr(args, "master_weights", "float32"),
            },
            "data": {"train": "unused"},
        }
    )
    clock = time.perf_counter()
    model = build_timed_model(config)
    optimizer = build_optimizer(config, model, 1000)
    move_to_host(model, optimizer)  # as the training workers do: the state is the GPU copy
    trainer = TrainStep(
        model,
        optimizer,
        clip_norm=1.0,
        remat=config.model.remat,
        shard_optimizer=getattr(args, "shard_optimizer", False),
    )
    state = trainer.initial_state()
    # On stderr, so that a run stopped by a time limit shows where it was.
    print(f"built and placed in {time.perf_counter() - clock:.1f} s", file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    vocab = SHAPES[shape]["vocab_size"]
    micro = getattr(args, "micro_batches", 1)  # gradient accumulation: A x (batch / A) rows
    if args.batch % micro:
        raise ValueError(f"--batch {args.batch} is not a multiple of --micro-batches {micro}")
    tokens = rng.integers(1, vocab, (micro, args.batch // micro, args.seq_len)).astype(np.int32)
    mask = np.ones(tokens.shape, np.float32)
    if getattr(args, "memory", False):
        return {"shape": shape, "mode": mode, **planned_memory(trainer, state, tokens, mask)}
    started = time.perf_counter()
    state, _ = trainer(state, tokens, mask)
    compile_s = time.perf_counter() - started
    print(f"first step (compiles) in {compile_s:.1f} s", file=sys.stderr, flush=True)
    _, times = pipelined_step_times(trainer, state, tokens, mask, args.steps)
    step = statistics.median(times)
    return {
        "shape": shape,
        "mode": mode,
        "micro_batches": micro,
        "first_step_s": round(compile_s, 2),
        "step_s": round(step, 4),
        "timing": "pipelined",  # as the workers run: a step queued before the last ends
        "tokens_per_s": round(tokens.size / step, 1),
    }


def pipelined_step_times(trainer, state, tokens, mask, steps: int) -> tuple[object, list]:
    """(last state, `step_time` of `steps` steps) run as the training workers run them:
    each step is dispatched before the one before it is waited for
    (rwkv_ray.train.worker.run_epoch)."""
    state, pending = trainer.dispatch(state, tokens, mask)
    times = []
    for _ in range(steps):
        state, following = trainer.dispatch(state, tokens, mask)
        times.append(trainer.finish(pending)["step_time"])
        pending = following
    trainer.finish(pending)
    return state, times


def planned_memory(trainer, state, tokens, mask) -> dict:
    """What XLA plans for the compiled step (no step is run), in GiB: temp is the scratch
    (activations kept for the backward pass, logits, gradients in flight)."""
    compiled = trainer._step.lower(
        state, trainer.shard_batch(tokens), trainer.shard_batch(mask)
    ).compile()
    mem = compiled.memory_analysis()
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    return {
        "xla_temp_gib": gib(mem.temp_size_in_bytes),
        "xla_argument_gib": gib(mem.argument_size_in_bytes),
        "xla_output_gib": gib(mem.output_size_in_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--modes", default="full,state+shift")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--remat",
        choices=("off", "block", "dots"),
        default="off",
        help="model.remat: keep all activations, recompute each block, or keep matmul outputs",
    )
    parser.add_argument(
        "--memory", action="store_true", help="only compile and report XLA's planned memory"
    )
    parser.add_argument("--micro-batches", type=int, default=1, help="split --batch into A")
    parser.add_argument(
        "--master-weights",
        choices=("float32", "bfloat16"),
        default="float32",
        help="model.master_weights: full tuning's weights and moments (with --dtype bfloat16)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [bench(args.shape, mode, args) for mode in args.modes.split(",")]
    report = {"args": vars(args), "load_average": os.getloadavg(), "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
