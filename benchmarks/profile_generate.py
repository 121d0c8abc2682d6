"""Where generation time goes on a GPU: kernel time per name for prefill and decode.

    python benchmarks/profile_generate.py --shape 1b6 --dtype bfloat16 --out /tmp/profile.json

For each phase (prefill of --prefill-tokens; decode of --decode-tokens at each batch size)
it records a JAX profiler trace, sums device time per kernel name, and reports the top
kernels, the device-busy time and the wall time (wall - busy = launch gaps / host time).
Also a floor: the time to read every weight once (what decoding at batch 1 must cost).
A diagnostic, not a benchmark of record: figures of record come from bench_generate.py.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import SHAPES, machine  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--wkv-impl", default=None)
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out")
    return p.parse_args(argv)


# Collective kernels (NCCL's): they run on their own streams beside the compute kernels.
COLLECTIVE = re.compile(r"nccl|all.?reduce|all.?gather|reduce.?scatter", re.IGNORECASE)


def _union_ms(intervals: list[tuple[int, int]]) -> float:
    """Total length (ms) of the union of [start, end) intervals in ns."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + (end - start), end
        elif end > reach:
            total, reach = total + (end - reach), end
    return total / 1e6


def device_kernel_times(
    trace_dir: str, lines_seen: set, extent: dict | None = None, plane: str = "/device:GPU"
) -> dict[str, float]:
    """Sum of device-event durations (ms) per name from the xplane files under trace_dir,
    on the device planes whose name starts with `plane` ("/device:GPU:0" for one GPU of
    several). `extent`, when given, gets "span_ms" (first kernel start to last kernel end)
    and "compute_ms" (the time covered by at least one kernel other than a collective: span
    less compute is the time the GPU waits, for a collective among other things)."""
    from jax.profiler import ProfileData

    totals: collections.Counter[str] = collections.Counter()
    starts, ends, compute = [], [], []
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        data = ProfileData.from_file(path)
        for device in data.planes:
            if not device.name.startswith(plane):
                continue
            for line in device.lines:
                lines_seen.add(line.name)
                # Stream lines hold the kernels; skip the aggregated 'XLA Ops'/'Modules' lines
                # so nothing is counted twice.
                if "Stream" not in line.name:
                    continue
                for event in line.events:
                    totals[event.name] += event.duration_ns / 1e6
                    starts.append(event.start_ns)
                    ends.append(event.end_ns)
                    if not COLLECTIVE.search(event.name):
                        compute.append((event.start_ns, event.end_ns))
    if extent is not None and starts:
        extent["span_ms"] = (max(ends) - min(starts)) / 1e6
        extent["compute_ms"] = _union_ms(compute)
    return dict(totals)


def traced_kernel_times(
    fn, lines_seen: set | None = None, extent: dict | None = None, plane: str = "/device:GPU"
) -> dict[str, float]:
    """Run fn() once under a JAX profiler trace: device time (ms) per kernel name (and the
    kernels' span in `extent`; `plane` picks the devices; see device_kernel_times)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        jax.block_until_ready(fn())
        jax.profiler.stop_trace()
        seen = set() if lines_seen is None else lines_seen
        return device_kernel_times(tmp, seen, extent, plane)


def profile(fn, top: int) -> dict:
    fn()  # compile + warm
    start = time.perf_counter()
    fn()
    wall_ms = (time.perf_counter() - start) * 1e3
    lines: set = set()
    totals = traced_kernel_times(fn, lines)
    busy = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_ms": round(wall_ms, 3),
        "device_busy_ms": round(busy, 3),
        "kernels": len(totals),
        "trace_lines": sorted(lines),
        "top": [{"name": name[:120], "ms": round(ms, 4)} for name, ms in ranked],
    }


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_generate import build_model
    from rwkv_ray.generation import engine as eng
    from rwkv_ray.generation import generate

    model = build_model(args)
    engine = eng.engine_for(model)
    trainable, non_trainable = engine.variables()
    report = {"machine": machine(), "args": vars(args)}

    weights = [w for w in trainable + non_trainable]
    nbytes = sum(int(np.prod(w.shape)) * w.dtype.itemsize for w in weights)
    read_all = jax.jit(lambda ws: sum(jnp.sum(w.astype(jnp.float32)) for w in ws))
    read_all(weights).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        read_all(weights).block_until_ready()
        times.append(time.perf_counter() - start)
    floor = float(np.median(times))
    report["weights"] = {
        "gbytes": nbytes / 1e9,
        "read_once_ms": floor * 1e3,
        "gb_per_s": nbytes / floor / 1e9,
        "batch1_tokens_per_s_bound": 1 / floor,
    }
    print(json.dumps(report["weights"], indent=1), flush=True)

    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(1, vocab, (1, args.prefill_tokens), np.int32)

    def prefill():
        state = model.initial_state(1)
        logits = jnp.zeros((1, vocab), jnp.float32)
        for start in range(0, args.prefill_tokens, eng.PREFILL_CHUNK):
            chunk = ids[:, start : start + eng.PREFILL_CHUNK]
            logits, state = engine.prefill_fn(trainable, non_trainable, chunk, state, logits)
        jax.block_until_ready(logits)

    report["prefill"] = profile(prefill, args.top)
    print("prefill", json.dumps(report["prefill"], indent=1), flush=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [[1 + b % (vocab - 1)] for b in range(batch)]

        def decode(prompts=prompts):
            generate(model, prompts, args.decode_tokens, token_ban=(0,))

        phase = profile(decode, args.top)
        phase["per_token_ms"] = round(phase["wall_ms"] / args.decode_tokens, 4)
        report[f"decode_batch{batch}"] = phase
        print(f"decode b{batch}", json.dumps(phase, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
