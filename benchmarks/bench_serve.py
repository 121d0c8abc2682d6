"""Serving throughput and latency: continuous batching vs one request at a time, over HTTP.

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/bench_serve.py \\
        --out benchmarks/results/serve_cpu.json

Method: a local Ray Serve app (`rwkv_ray.serve.app`) on 127.0.0.1 serving a random model of
--shape; --clients threads each send streaming /v1/generate requests back to back (1-token
prompts, greedy, id 0 banned so every request makes exactly --max-tokens tokens) until
--requests have been sent or --max-seconds have passed. Per request: latency (request sent
-> last event) and time to first token; aggregate tokens/s = tokens received / wall time of
the run. Each mode is warmed up first (compilation is not timed). Modes: `batched`
(--slots slots) and `serial` (1 slot: requests queue and run one at a time, the same code).
The clients run on the same machine as the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SHAPES = {
    "tiny": dict(vocab_size=1000, num_layers=2, hidden_size=128),
    "tiny-world": dict(vocab_size=65536, num_layers=1, hidden_size=64, head_size=32),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=64, help="requests per mode")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--max-seconds", type=float, default=120, help="per mode: no new requests after")
    p.add_argument("--slots", type=int, default=16, help="batch slots of the batched mode")
    p.add_argument("--steps-per-call", type=int, default=4)
    p.add_argument("--modes", default="serial,batched")
    p.add_argument("--out", help="write the figures as JSON here")
    return p.parse_args(argv)


def save_model(shape: str, folder: Path) -> Path:
    from rwkv_ray.convert import save_model as save
    from rwkv_ray.models import RWKV6CausalLM, RWKV6Config

    config = RWKV6Config(**SHAPES[shape], checkpoint_dtype="float32")
    return save(RWKV6CausalLM.from_model_config(config), folder / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, body: dict) -> dict:
    import requests

    start = time.perf_counter()
    first, tokens, error = None, 0, None
    with requests.post(f"{url}/v1/generate", json=body, stream=True, timeout=600) as r:
        if r.status_code != 200:
            return dict(error=f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line:
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            elif "token" in event:
                tokens += 1
                first = first or time.perf_counter() - start
    return dict(latency=time.perf_counter() - start, ttft=first, tokens=tokens, error=error)


def run_clients(url: str, args) -> dict:
    """--clients threads sending requests back to back; figures of the run."""
    sent, lock, deadline = [0], threading.Lock(), time.monotonic() + args.max_seconds

    def client(index: int) -> list[dict]:
        out = []
        while True:
            with lock:
                if sent[0] >= args.requests or time.monotonic() > deadline:
                    return out
                sent[0] += 1
                n = sent[0]
            body = dict(tokens=[1 + n % 500], max_tokens=args.max_tokens, token_ban=[0])
            out.append(one_request(url, dict(body, stream=True)))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in results if r.get("error") is None]
    latency = np.array([r["latency"] for r in ok])
    ttft = np.array([r["ttft"] for r in ok])
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p95_s": float(np.percentile(latency, 95)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
    }


def bench_mode(model_dir: Path, slots: int, args) -> dict:
    import requests
    from ray import serve

    from rwkv_ray.serve.app import app_builder

    app = dict(model=str(model_dir), max_batch_size=slots, steps_per_call=args.steps_per_call)
    serve.run(app_builder(dict(app, num_cpus=1)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    warm = dict(tokens=[3], max_tokens=args.max_tokens, token_ban=[0], stream=True)
    for _ in range(2):  # compiles the prefill and the decode call
        one_request(url, warm)
    figures = run_clients(url, args)
    figures["server_stats"] = requests.get(f"{url}/v1/stats", timeout=60).json()
    serve.delete("bench")
    return figures


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import ray
    from ray import serve

    env = {k: os.environ[k] for k in ("KERAS_BACKEND", "JAX_PLATFORMS") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, runtime_env={"env_vars": env})
    args.port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    modes = {"serial": 1, "batched": args.slots}
    out = {
        "benchmark": "serve",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "KERAS_BACKEND=jax JAX_PLATFORMS=cpu python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            # A shared machine: the 1-minute load average when the run started.
            "load_average_1m": os.getloadavg()[0],
            "jax_backend": jax.default_backend(),
            "jax": jax.__version__,
        },
        "model": dict(shape=args.shape, **SHAPES[args.shape], dtype="float32"),
        "load": {k: getattr(args, k) for k in ("clients", "requests", "max_tokens", "max_seconds")}
        | {"steps_per_call": args.steps_per_call},
        "modes": {},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = save_model(args.shape, Path(tmp))
            for mode in args.modes.split(","):
                out["modes"][mode] = dict(
                    slots=modes[mode], **bench_mode(model_dir, modes[mode], args)
                )
                print(mode, json.dumps(out["modes"][mode], indent=1), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if {"serial", "batched"} <= set(out["modes"]):
        serial, batched = out["modes"]["serial"], out["modes"]["batched"]
        out["batched_vs_serial"] = {
            "tokens_per_s": batched["tokens_per_s"] / serial["tokens_per_s"],
            "latency_p50": batched["latency_p50_s"] / serial["latency_p50_s"],
        }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
