"""CPU benchmark of the pure WKV6 implementations: chunked vs scan, forward and forward+backward.

Each case is jitted, run once to compile and warm up, then timed `--repeats` times with
block_until_ready; the table gives the median wall time and the median process CPU time (the
CPU time is the steadier number on a shared machine). Both implementations are checked
against each other before any time is reported.

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/bench_wkv_cpu.py
    ... --chunk-sizes 4 8 16 32   # also time the chunked form at other chunk sizes
Writes benchmarks/results/wkv_cpu.json (keys: machine, date, command, rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rwkv_ray.ops.wkv_chunked import DEFAULT_CHUNK_SIZE, wkv6_chunked  # noqa: E402
from rwkv_ray.ops.wkv_scan import wkv6_scan  # noqa: E402

SHAPES = {  # name: (B, T, H, N)
    "B8-T256-H4-N64": (8, 256, 4, 64),
    "B1-T1024-H8-N64": (1, 1024, 8, 64),
    "B4-T512-H2-N64": (4, 512, 2, 64),
}
RESULT = Path(__file__).parent / "results" / "wkv_cpu.json"


def make_inputs(b: int, t: int, h: int, n: int, seed: int = 0):
    """Random inputs with RWKV6-like decays: log_w = -exp(U(-8, 2)), from ~-3e-4 to ~-7."""
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((b, t, h, n), dtype=np.float32) for _ in range(3))
    log_w = -np.exp(rng.uniform(-8, 2, (b, t, h, n))).astype(np.float32)
    u = rng.standard_normal((h, n), dtype=np.float32)
    state = rng.standard_normal((b, h, n, n), dtype=np.float32)
    return r, k, v, log_w, u, state


def forward_backward(fn):
    """Gradient of a scalar loss of y and the final state in all six inputs."""

    def loss(*args):
        y, state = fn(*args)
        return jnp.sum(y * y) + jnp.sum(state)

    return jax.grad(loss, argnums=tuple(range(6)))


def median_ms(fn, args, repeats: int) -> tuple[float, float]:
    """(median wall ms, median process-CPU ms) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def implementations(chunk_sizes: list[int]) -> dict:
    impls = {"scan": wkv6_scan}
    for size in chunk_sizes:
        impls[f"chunked-L{size}"] = lambda *a, size=size: wkv6_chunked(*a, chunk_size=size)
    return impls


def check_close(impls: dict, args) -> None:
    """Refuse to time an implementation that disagrees with the scan reference."""
    y_ref, s_ref = jax.jit(impls["scan"])(*args)
    for name, fn in impls.items():
        y, s = jax.jit(fn)(*args)
        for got, want in ((y, y_ref), (s, s_ref)):
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            if not err < 1e-4:
                raise AssertionError(f"{name} differs from scan: max rel error {err:.2e}")


def run(shapes: list[str], chunk_sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    impls = implementations(chunk_sizes)
    for shape_name in shapes:
        args = make_inputs(*SHAPES[shape_name])
        check_close(impls, args)
        for name, fn in impls.items():
            row = {"shape": shape_name, "impl": name}
            for mode, compiled in (
                ("fwd", jax.jit(fn)),
                ("fwd_bwd", jax.jit(forward_backward(fn))),
            ):
                row[f"{mode}_ms"], row[f"{mode}_cpu_ms"] = median_ms(compiled, args, repeats)
            rows.append(row)
            print(
                f"{shape_name:18s} {name:12s} fwd {row['fwd_ms']:8.1f} ms "
                f"(cpu {row['fwd_cpu_ms']:7.1f})  fwd+bwd {row['fwd_bwd_ms']:8.1f} ms "
                f"(cpu {row['fwd_bwd_cpu_ms']:7.1f})",
                flush=True,
            )
    return rows


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[DEFAULT_CHUNK_SIZE])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    rows = run(args.shapes, args.chunk_sizes, args.repeats)
    result = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
