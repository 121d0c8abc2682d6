"""`run_demo(out_dir)`: the fine-tuning service end to end on a laptop (2 CPU cores, < 5 min).

1. start a local Ray; prepare data/demo_corpus.jsonl and data/demo_eval.jsonl into TFRecord
   shards (Ray Data);
2. full-fine-tune a tiny RWKV6 (2 layers, C=128, World vocabulary) from the official init
   (Ray Train, JaxTrainer) - the loss falls from ~11 to ~2;
3. state-tune the result with the time-shift states (`state+shift`);
4. both runs go to MLflow (sqlite:///mlflow.db at the repo root unless MLFLOW_TRACKING_URI);
5. held-out perplexity base vs tuned, a sample generated from the tuned state, and how to
   open the MLflow UI.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.tracking import tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[2]  # the demo corpus ships with the repository
CORPUS = REPO_ROOT / "data" / "demo_corpus.jsonl"
EVAL = REPO_ROOT / "data" / "demo_eval.jsonl"
SEQ_LEN = 48
BATCH = 4  # rows per step: the 65536-wide head dominates a step on CPU
TINY = {"vocab_size": 65536, "num_layers": 2, "hidden_size": 128, "checkpoint_dtype": "float32"}


def prepare_demo_data(out_dir: Path) -> tuple[str, str]:
    from rwkv_ray.data.prepare import prepare

    missing = [str(path) for path in (CORPUS, EVAL) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the demo's corpus is not here ({', '.join(missing)}): it ships with the "
            "repository, not the package; run the demo from a clone (make demo)"
        )
    paths = []
    for name, source in (("train", CORPUS), ("eval", EVAL)):
        output = out_dir / "data" / name
        prepare(
            {"inputs": [str(source)], "output": str(output), "seq_len": SEQ_LEN,
             "num_shards": 2, "overwrite": True, "progress": False}
        )  # fmt: skip
        paths.append(str(output))
    return paths[0], paths[1]


def demo_job(
    name: str, mode: str, steps: int, data: tuple[str, str], out_dir: Path, **model
) -> JobConfig:
    full = mode == "full"
    return JobConfig.from_dict(
        {
            "name": name,
            "mode": mode,
            "model": model,
            "data": {"train": data[0], "eval": data[1], "batch_size_per_stream": BATCH},
            "optimizer": {"lr": 3e-3 if full else 0.05, "clip_norm": 1.0},
            "schedule": {"max_steps": steps, "warmup_steps": 10},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "checkpointing": {"storage_path": str(out_dir / "runs"), "every_steps": 100},
            "mlflow": {"experiment": "rwkv_ray-demo", "registered_model": f"demo-{mode}"},
        }
    )


def final_export(result) -> Path:
    return Path(result.checkpoint.path) / "export"


def start_local_ray() -> None:
    """A 2-CPU local Ray with what Ray Train V2's helper actors rely on."""
    import ray

    # The preemption watcher (one actor per run) handles spot-node preemption, which a laptop
    # does not have; its start logs an error line about its own restart policy.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train V2's PlacementGroupCleaner asks the State API every second whether the run's
    # controller is alive. Ray serves that API from the dashboard (include_dashboard=False
    # leaves it out: a warning a second, all run long), and Ray processes find it through
    # RAY_ADDRESS, else only while this is the one Ray on the machine (a `rwkv-ray serve` in
    # another terminal breaks the lookup). The hook (a lambda: pickled by value, so workers
    # need not import this module) sets RAY_ADDRESS in each of this cluster's processes.
    pin_address = lambda: os.environ.setdefault(  # noqa: E731
        "RAY_ADDRESS", ray.get_runtime_context().gcs_address
    )
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        runtime_env={"worker_process_setup_hook": pin_address},
    )


def run_demo(
    out_dir: str | Path = "out/demo", full_steps: int = 150, state_steps: int = 60
) -> dict:
    import ray

    from rwkv_ray.train.evaluate import apply_export, perplexity
    from rwkv_ray.train.step import build_model
    from rwkv_ray.train.trainer import run_job

    out_dir = Path(out_dir).resolve()
    started = time.perf_counter()
    if not ray.is_initialized():
        start_local_ray()
    train, eval_ = prepare_demo_data(out_dir)
    print(f"[1/4] prepared {train} and {eval_} ({time.perf_counter() - started:.0f} s)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    full = demo_job(f"demo-full-{stamp}", "full", full_steps, (train, eval_), out_dir, config=TINY)
    result = run_job(full)
    model_dir = final_export(result) / "model"
    print(f"[2/4] full fine-tuning: loss {result.metrics['loss']:.3f} -> {model_dir}")
    name = f"demo-state-{stamp}"
    state = demo_job(name, "state+shift", state_steps, (train, eval_), out_dir, path=str(model_dir))
    result = run_job(state)
    print(
        f"[3/4] state tuning (+ time-shift states): loss {result.metrics['loss']:.3f} -> "
        f"{final_export(result) / 'state.npz'}"
    )
    base = build_model(state)
    report = {"base": perplexity(base, eval_, 8)}
    tuned = apply_export(base, state, final_export(result))
    report["tuned"] = perplexity(tuned, eval_, 8)
    sample = generate_sample(tuned)
    print(
        f"[4/4] held-out perplexity {report['base']['perplexity']:.3f} (full-tuned) -> "
        f"{report['tuned']['perplexity']:.3f} (+ tuned state); sample: {sample!r}"
    )
    uri = tracking_uri()
    print(f"done in {time.perf_counter() - started:.0f} s")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    return {"perplexity": report, "sample": sample, "tracking_uri": uri}


def generate_sample(model, prompt: str = "On Monday, Ben went to the") -> str:
    from rwkv_ray.generation import generate

    return prompt + generate(model, [prompt], 24, end_token=261).text[0]
