"""Generation speed: prefill tokens/s and decode tokens/s (batch 1 and batch 32), ours and
the official `rwkv` package in the same run (when importable).

    # tiny model on CPU (seconds):
    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/bench_generate.py --shape tiny \\
        --out benchmarks/results/generate_cpu.json
    # the 1.6B shape (C=2048, L=24, V=65536), random bf16 weights, on one GPU:
    python benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \\
        --out benchmarks/results/generate_h100.json

Method (random weights; speed does not depend on them):
- prefill: one prompt of --prefill-tokens through the compiled prefill that `generate`
  uses (the head only on the last position); median of --repeats after a warm-up call.
- decode: `generate` greedy with the on-device loop, id 0 banned so no row ends early,
  1-token prompts; rate = batch * (n2 - n1) / (t(n2) - t(n1)) for n1 = --decode-tokens / 4,
  n2 = --decode-tokens (medians; the per-call costs - prefill, host set-up - cancel); also
  the range of the rates of the repeats paired in order (`..._tokens_per_s_range`).
- official: `RWKV.forward(tokens, None)` for prefill; `forward([token], state)` per token
  for decode (batch 1 only: the package has no batched decode).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run from a checkout without installing: the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(vocab_size=1000, num_layers=2, hidden_size=128),
    "1b6": dict(vocab_size=65536, num_layers=24, hidden_size=2048),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", default="float32", help="Keras dtype policy (bfloat16 on GPU)")
    p.add_argument("--wkv-impl", default=None, help="WKV implementation (rwkv_ray.ops)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--official", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--official-strategy", default=None, help="default: cuda fp16 / cpu fp32")
    p.add_argument(
        "--pack",
        choices=("auto", "on", "off", "both"),
        default="auto",
        help="decode with packed projection kernels (rwkv_ray.models.rwkv6_packed; auto: on a "
        "GPU); both: time each, the unpacked rows named decode_batchN_unpacked_...",
    )
    p.add_argument("--out", help="write the figures as JSON here (also before the official)")
    return p.parse_args(argv)


def call_times(fn, repeats: int) -> list[float]:
    """Wall times of `repeats` calls after a warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after a warm-up (compilation) call."""
    return float(np.median(call_times(fn, repeats)))


def build_model(args):
    from rwkv_ray.models import RWKV6CausalLM, RWKV6Config

    config = RWKV6Config(**SHAPES[args.shape], checkpoint_dtype="float32")
    return RWKV6CausalLM.from_model_config(config, wkv_impl=args.wkv_impl, dtype=args.dtype)


def bench_prefill(model, tokens: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    from rwkv_ray.generation import engine as eng

    engine = eng.engine_for(model)
    trainable, non_trainable = engine.variables()
    ids = np.random.default_rng(0).integers(1, model.config.vocab_size, (1, tokens), np.int32)
    vocab = model.config.vocab_size

    def run():
        state = model.initial_state(1)
        logits = jnp.zeros((1, vocab), jnp.float32)
        for start in range(0, tokens, eng.PREFILL_CHUNK):
            chunk = ids[:, start : start + eng.PREFILL_CHUNK]
            logits, state = engine.prefill_fn(trainable, non_trainable, chunk, state, logits)
        jax.block_until_ready(logits)

    return tokens / best_time(run, repeats)


def bench_decode(model, batch: int, steps: int, repeats: int) -> tuple[float, list[float]]:
    """(tokens/s from the medians, [lowest, highest] of the rates of the i-th short and long
    calls paired): the range is this process's own spread, to tell apart from the spread
    between processes."""
    from rwkv_ray.generation import generate

    prompts = [[1 + b % (model.config.vocab_size - 1)] for b in range(batch)]

    def timed(n):
        def run():
            result = generate(model, prompts, n, token_ban=(0,))
            assert all(len(t) == n for t in result.tokens)

        return call_times(run, repeats)

    short, long = max(1, steps // 4), steps
    short_times, long_times = timed(short), timed(long)
    tokens = batch * (long - short)
    rate = tokens / (float(np.median(long_times)) - float(np.median(short_times)))
    paired = [
        tokens / (t_long - t_short) for t_short, t_long in zip(short_times, long_times, strict=True)
    ]
    return rate, [min(paired), max(paired)]


def official_figures(model, args) -> dict:
    import torch
    from rwkv.model import RWKV

    from rwkv_ray.convert import model_state_dict

    strategy = args.official_strategy or ("cuda fp16" if torch.cuda.is_available() else "cpu fp32")
    with tempfile.TemporaryDirectory() as tmp:
        sd = {
            k: torch.from_numpy(np.asarray(v, np.float32))
            for k, v in model_state_dict(model, "float32").items()
        }
        torch.save(sd, f"{tmp}/model.pth")
        del sd
        with contextlib.redirect_stdout(io.StringIO()):
            official = RWKV(model=f"{tmp}/model", strategy=strategy)
    tokens = np.random.default_rng(0).integers(1, model.config.vocab_size, args.prefill_tokens)

    def prefill():
        with torch.no_grad():
            official.forward(tokens.tolist(), None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def decode():
        with torch.no_grad():
            out, state = official.forward([1], None)
            for _ in range(args.decode_tokens):
                out, state = official.forward([int(torch.argmax(out))], state)

    return {
        "strategy": strategy,
        "prefill_tokens_per_s": args.prefill_tokens / best_time(prefill, args.repeats),
        "decode_batch1_tokens_per_s": args.decode_tokens / best_time(decode, args.repeats),
    }


def machine() -> dict:
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "jax": jax.__version__,
    }


def command_line(argv) -> str:
    env = [f"{k}={os.environ[k]}" for k in ("KERAS_BACKEND", "JAX_PLATFORMS") if k in os.environ]
    return " ".join([*env, "python", "benchmarks/bench_generate.py", *(argv or sys.argv[1:])])


def want_official(mode: str) -> bool:
    if mode == "off":
        return False
    try:
        import torch

        # Read by rwkv.model at import: TorchScript on, and on a GPU the package's own CUDA
        # WKV kernel (built with nvcc at load), as the anchor figures in ../shared/anchors.
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ.setdefault("RWKV_CUDA_ON", "1" if torch.cuda.is_available() else "0")
        import rwkv.model  # noqa: F401
    except ImportError:
        if mode == "on":
            raise
        return False
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = build_model(args)
    figures = {"prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens}
    figures["prefill_tokens_per_s"] = bench_prefill(model, args.prefill_tokens, args.repeats)
    print("prefill_tokens_per_s", round(figures["prefill_tokens_per_s"]), flush=True)
    packings = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}[args.pack]
    for pack in packings:
        use_engine(model, pack)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            rate, spread = bench_decode(model, batch, args.decode_tokens, args.repeats)
            name = f"decode_batch{batch}{'_unpacked' if args.pack == 'both' and not pack else ''}"
            figures[f"{name}_tokens_per_s"] = rate
            figures[f"{name}_tokens_per_s_range"] = spread
            print(f"{name}_tokens_per_s", round(rate, 1), [round(r, 1) for r in spread], flush=True)
    figures["packed"] = eng_pack(model) if args.pack != "both" else "both"
    report = {
        "benchmark": "generate",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "machine": machine(),
        "model": {
            "shape": args.shape,
            **SHAPES[args.shape],
            "dtype": args.dtype,
            "wkv_impl": args.wkv_impl,
        },
        "ours": figures,
    }
    write(report, args.out)
    if want_official(args.official):
        report["official_rwkv"] = official_figures(model, args)
        write(report, args.out)
    print(json.dumps(report, indent=2))
    return report


def write(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


def use_engine(model, pack: bool | None) -> None:
    """Make generate() use an engine that decodes packed (True), unpacked, or as default."""
    from rwkv_ray.generation import engine as eng

    eng.engine_for(model, pack)


def eng_pack(model) -> bool:
    from rwkv_ray.generation import engine as eng

    return eng.engine_for(model).pack


if __name__ == "__main__":
    main()
