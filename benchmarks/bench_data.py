"""Data pipeline throughput on CPU: prepare (Ray Data) and the training-worker reader.

    python benchmarks/bench_data.py [--rows 20000] [--seq-len 512] [--cpus 2]

prepare: a synthetic English corpus (jsonl) -> shards on a local Ray with ``--cpus`` CPUs,
timed after a warm-up run (so worker start-up and tokenizer load are excluded; reported
apart). reader: one ShardReader (one training worker, one stream) over those shards, padded
tokens per second (what a GPU step consumes), after its first batch. The load average is
recorded too: on a shared machine it explains a lot. Writes benchmarks/results/data_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "the a of to and in is it that was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound "
    "river mountain garden library station market kettle window morning evening quietly"
).split()


def corpus(path: Path, rows: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            n = rng.randint(20, 160)
            text = " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."
            size += len(text.encode())
            f.write(json.dumps({"text": text}) + "\n")
    return size


def bench_prepare(src: Path, out: Path, args) -> dict:
    from rwkv_ray.data.prepare import prepare

    small = src.with_name("warmup.jsonl")
    small.write_text("".join(src.read_text().splitlines(keepends=True)[:200]))
    t0 = time.perf_counter()
    prepare({"inputs": [str(small)], "output": str(out) + "_warm", "seq_len": args.seq_len,
             "num_shards": 2, "progress": False})  # fmt: skip
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = prepare({"inputs": [str(src)], "output": str(out), "seq_len": args.seq_len,
                        "num_shards": args.shards, "progress": False})  # fmt: skip
    wall = time.perf_counter() - t0
    totals = manifest["totals"]
    return {
        "warmup_s": round(warmup, 2),
        "wall_s": round(wall, 2),
        "examples_per_s": round(totals["examples"] / wall, 1),
        "real_tokens_per_s": round(totals["tokens"] / wall),
        "padded_tokens_per_s": round(totals["examples"] * args.seq_len / wall),
        "text_mb_per_s": round(args.corpus_bytes / wall / 1e6, 3),
        "totals": totals,
    }


def bench_reader(out: Path, args, streams: list[int], num_streams: int) -> dict:
    from rwkv_ray.data.reader import ShardReader

    t0 = time.perf_counter()
    reader = ShardReader(str(out), args.batch, seed=0, streams=streams, num_streams=num_streams)
    it = reader.batches(0)
    first = next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = sum(1 for _ in it)
    wall = time.perf_counter() - t0
    padded = steps * first["tokens"].size
    return {
        "streams": streams,
        "num_streams": num_streams,
        "batch": list(first["tokens"].shape),
        "steps_timed": steps,
        "startup_s": round(startup, 2),
        "padded_tokens_per_s": round(padded / wall),
        "batches_per_s": round(steps / wall, 1),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="batch size per stream")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--out", default="benchmarks/results/data_cpu.json")
    args = parser.parse_args()
    import ray

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "corpus.jsonl")
        args.corpus_bytes = corpus(src, args.rows)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            prep = bench_prepare(src, Path(tmp, "ds"), args)
        finally:
            ray.shutdown()
        readers = [bench_reader(Path(tmp, "ds"), args, [0], 1),
                   bench_reader(Path(tmp, "ds"), args, [0], 2)]  # fmt: skip
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "load_average_start_end": [round(load_start[0], 1), round(os.getloadavg()[0], 1)],
        "rows": args.rows,
        "corpus_bytes": args.corpus_bytes,
        "seq_len": args.seq_len,
        "ray_cpus": args.cpus,
        "prepare": prep,
        "reader_per_worker": readers,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
