"""Training step speed of the 1.6B shape: ours (full / state tuning, remat on/off, gradient
accumulation) and fla's RWKV6 model, in the same run on the same card; ours also data parallel.

    python benchmarks/bench_train_gpu.py --out benchmarks/results/train_1p6b.json
    python benchmarks/bench_train_gpu.py --configs ours_state --gpus 1,2 --out scaling.json

Each configuration runs in its own process (so each has its own peak memory and a failure,
e.g. out of memory, is reported and does not stop the others): random weights and tokens,
bf16, AdamW, batch --batch x --seq-len; the first step (compilation) is timed apart, the rate
is the median of --steps steps. Ours: `rwkv_ray.train.step.TrainStep` (what the Ray workers
run), full tuning with float32 master weights (mixed_bfloat16; the *_bf16 configurations: bf16
weights and moments, model.master_weights), state tuning in bfloat16.
fla: `fla.models.RWKV6ForCausalLM` in bf16 with fused AdamW, as in ../shared/anchors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ours_full": dict(mode="full", remat=False),
    "ours_full_remat": dict(mode="full", remat="block"),
    # Keep the matmul outputs, recompute the elementwise work and the WKV forward.
    "ours_full_dots": dict(mode="full", remat="dots"),
    # Gradient accumulation: the same global batch in 2 micro-batches, half the activations.
    "ours_full_micro2": dict(mode="full", remat=False, micro_batches=2),
    # Weights and AdamW moments in bf16, as fla's model trains (model.master_weights): about
    # 13 GB less training state than float32 masters, room to keep activations.
    "ours_full_bf16": dict(mode="full", remat=False, master_weights="bfloat16"),
    "ours_full_bf16_dots": dict(mode="full", remat="dots", master_weights="bfloat16"),
    "ours_full_bf16_remat": dict(mode="full", remat="block", master_weights="bfloat16"),
    # Also any "ours_full_rematN", e.g. ours_full_remat6: recompute only the first N blocks
    # (model.remat_blocks; config_of).
    # Data parallel (--gpus 2,4): AdamW's moments split over the GPUs (scaling.shard_optimizer).
    "ours_full_zero1": dict(mode="full", remat=False, shard_optimizer=True),
    "ours_full_dots_zero1": dict(mode="full", remat="dots", shard_optimizer=True),
    "ours_state": dict(mode="state", remat=False),
    "ours_state+shift": dict(mode="state+shift", remat=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1b6", help="ours only: a shape of bench_train_cpu.py")
    p.add_argument("--batch", type=int, default=4, help="rows per GPU")
    p.add_argument(
        "--gpus",
        default="1",
        help="GPU counts to run ours on, e.g. 1,2,4 (data parallel; rows "
        "are named NAME@NGPU and get a scaling_efficiency against NAME@1gpu)",
    )
    p.add_argument(
        "--first-gpu",
        type=int,
        default=0,
        help="index of the first GPU to use (to run several benchmarks side by side on one "
        "host: a configuration on N GPUs gets FIRST..FIRST+N-1)",
    )
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--configs", default=",".join([*CONFIGS, "fla"]))
    p.add_argument("--timeout", type=int, default=400, help="seconds per configuration")
    p.add_argument(
        "--memory",
        action="store_true",
        help="ours only: compile each step and report XLA's planned memory (no step runs): "
        "which remat settings fit, in about a minute per configuration",
    )
    p.add_argument("--out")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    return p.parse_args(argv)


def config_of(name: str) -> dict:
    """The settings of a configuration name: CONFIGS, or ours_full_rematN (N blocks recomputed)."""
    if name in CONFIGS:
        return CONFIGS[name]
    blocks = name.removeprefix("ours_full_remat")
    if blocks.isdigit() and int(blocks) >= 1:
        return dict(mode="full", remat="block", remat_blocks=int(blocks))
    raise SystemExit(f"unknown configuration {name!r}: one of {sorted(CONFIGS)}, "
                     "fla or ours_full_rematN")  # fmt: skip


def run_ours(name: str, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax

    from benchmarks.bench_train_cpu import bench

    config = config_of(name)
    opts = argparse.Namespace(
        batch=args.batch, seq_len=args.seq_len, steps=args.steps, dtype="bfloat16",
        remat=config["remat"], micro_batches=config.get("micro_batches", 1),
        master_weights=config.get("master_weights", "float32"),
        remat_blocks=config.get("remat_blocks"), memory=args.memory,
        shard_optimizer=config.get("shard_optimizer", False),
    )  # fmt: skip
    result = bench(args.shape, config["mode"], opts)
    result.update(
        remat=opts.remat, remat_blocks=opts.remat_blocks, master_weights=opts.master_weights,
        shard_optimizer=opts.shard_optimizer,
    )  # fmt: skip
    if args.memory:
        return result
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_gib"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
    result["wkv_impl"] = os.environ.get("RWKV_WKV_IMPL", "auto")
    return result


def run_fla(args) -> dict:
    import statistics

    import torch
    from fla.models import RWKV6Config, RWKV6ForCausalLM

    config = RWKV6Config(
        hidden_size=2048, num_hidden_layers=24, vocab_size=65536, num_heads=32, expand_k=1,
        expand_v=1, hidden_ratio=3.5, intermediate_size=7168, fuse_cross_entropy=True,
    )  # fmt: skip
    model = RWKV6ForCausalLM(config).cuda().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x = torch.randint(1, 65536, (args.batch, args.seq_len), device="cuda")

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    # On stderr, so that a run stopped by a time limit shows where it was.
    print(f"two warm-up steps (Triton compiles) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    step_s = statistics.median(times)
    return {
        "mode": "full (fla RWKV6ForCausalLM, bf16 weights, fused AdamW)",
        "step_s": round(step_s, 4),
        "tokens_per_s": round(args.batch * args.seq_len / step_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "params": sum(p.numel() for p in model.parameters()),
    }


def gpu_memory_fraction() -> float:
    sys.path.insert(0, str(ROOT))
    from rwkv_ray.train.config import ScalingSettings

    return ScalingSettings().gpu_memory_fraction


def run_one(name: str, gpus: int, args) -> dict:
    """One configuration in its own process on `gpus` GPUs from --first-gpu (data parallel
    over them: the global batch is --batch rows per GPU)."""
    cmd = [sys.executable, __file__, "--one", name, "--shape", args.shape,
           "--batch", str(args.batch * gpus),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps)]  # fmt: skip
    cmd += ["--memory"] if args.memory else []
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES=",".join(str(args.first_gpu + i) for i in range(gpus))
    )
    # The share of GPU memory our training workers give JAX (JAX's default is 0.75).
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(gpu_memory_fraction()))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as stopped:
        said = stopped.stderr or b""  # what the process had written: where it was stopped
        said = said.decode(errors="replace") if isinstance(said, bytes) else said
        return {"error": f"timed out after {args.timeout} s", "stderr": said[-1500:], "gpus": gpus}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return {"error": (done.stderr or done.stdout)[-1500:], "gpus": gpus}
    return {**json.loads(lines[-1][len("RESULT ") :]), "gpus": gpus}


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        result = run_fla(args) if args.one == "fla" else run_ours(args.one, args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    report = {
        "benchmark": "train_1p6b",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_train_gpu.py", *(argv or sys.argv[1:])]),
        "shape": args.shape,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rows": {},
    }
    counts = [int(n) for n in args.gpus.split(",")]
    if args.memory and "fla" in args.configs.split(","):
        sys.exit("--memory plans ours only: leave fla out of --configs")
    for name in args.configs.split(","):
        if name != "fla":
            config_of(name)  # an unknown name stops the run before any configuration starts
    for name in args.configs.split(","):
        for gpus in counts if name != "fla" else counts[:1]:  # fla's model runs on one GPU
            row = run_one(name, gpus, args)
            report["rows"][name if len(counts) == 1 else f"{name}@{gpus}gpu"] = row
            print(name, f"{gpus} GPU(s)", json.dumps(row), flush=True)
            if args.out:  # after every row: an outer time limit must not lose finished rows
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in report["rows"].items():
        one = report["rows"].get(name.split("@")[0] + "@1gpu")
        if "@" in name and one and "tokens_per_s" in row and "tokens_per_s" in one:
            gpus = int(name.split("@")[1].removesuffix("gpu"))
            row["scaling_efficiency"] = round(row["tokens_per_s"] / (gpus * one["tokens_per_s"]), 3)
    try:  # nvidia-smi, not jax: jax would take memory on GPUs other benchmarks may be using
        report["card"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={args.first_gpu}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except Exception as err:  # the report is still worth writing
        report["card"] = f"unknown ({err})"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
