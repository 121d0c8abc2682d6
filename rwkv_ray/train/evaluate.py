"""Perplexity on held-out shards: the base model vs the tuned result of a job. No Ray.

    report = evaluate_job(config, tuned="runs/tiny/checkpoint_.../export", max_batches=20)
    # {"base": {"loss": 4.1, "perplexity": 60.3, "tokens": 4096}, "tuned": {...}}

`tuned` is a job's export folder (the final Ray checkpoint's `export/`, or the MLflow run's
`export` artifacts): `model/` after full tuning, `state.npz` after state tuning.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from rwkv_ray.models import RWKV6CausalLM
from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.step import build_model, summed_loss_fn


def perplexity(
    model: RWKV6CausalLM,
    dataset_uri: str,
    batch_size: int = 8,
    max_batches: int | None = None,
    s3_endpoint_url: str | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token loss (nats) and its exp over a prepared dataset: every
    example, in batches of `batch_size` (the last one filled with padding rows, which have
    no target), so the figure does not depend on the batch size."""
    from rwkv_ray.data.reader import ShardReader

    # One example per reader step: the training reader drops a stream's last partial batch.
    reader = ShardReader(
        dataset_uri, 1, seed=0, streams=[0], num_streams=1, s3_endpoint_url=s3_endpoint_url
    )
    score = jax.jit(summed_loss_fn(model))  # the training step's loss, never whole logits
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    total, count, done = 0.0, 0.0, 0

    def add(rows: list[dict]) -> None:
        nonlocal total, count, done
        tokens = np.concatenate([r["tokens"] for r in rows])
        mask = np.concatenate([r["loss_mask"] for r in rows])
        pad = batch_size - len(rows)  # one compiled shape: padding rows, all zero
        tokens = np.pad(tokens, ((0, pad), (0, 0)))
        mask = np.pad(mask, ((0, pad), (0, 0)))
        s, c = score(trainable, non_trainable, tokens, mask)
        total, count, done = total + float(s), count + float(c), done + 1

    rows: list[dict] = []
    for row in reader.batches(0):
        if max_batches is not None and done >= max_batches:
            break
        rows.append(row)
        if len(rows) == batch_size:
            add(rows)
            rows = []
    if rows and (max_batches is None or done < max_batches):
        add(rows)
    if count == 0:
        raise ValueError(f"{dataset_uri}: no target tokens to evaluate")
    loss = total / count
    # exp overflows float64 past ~709 nats (a diverged model): its perplexity is inf.
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 709 else math.inf, "tokens": count}


def apply_export(model: RWKV6CausalLM, config: JobConfig, export_dir: str | Path):
    """The tuned model: the exported weights (full) or the base with the tuned state."""
    from rwkv_ray.convert import load_model
    from rwkv_ray.train.step import dtype_policy

    export_dir = Path(export_dir)
    if config.mode == "full":  # in the base's precision: the two scores differ by tuning only
        path = export_dir / "model"
        return load_model(path, dtype=dtype_policy(config), wkv_impl=config.model.wkv_impl)
    from rwkv_ray.generation.state_io import load_state

    state = load_state(export_dir / "state.npz", model)
    for i, block in enumerate(model.backbone.blocks):
        block.time_mix.initial_shift.assign(np.asarray(state.att_shift)[i, 0])
        block.time_mix.initial_wkv.assign(np.asarray(state.wkv)[i, 0])
        block.channel_mix.initial_shift.assign(np.asarray(state.ffn_shift)[i, 0])
    return model


def latest_export(config: JobConfig) -> Path:
    """The export/ folder of the job's newest checkpoint in local storage."""
    from rwkv_ray.train.trainer import storage

    path, filesystem = storage(config)
    if filesystem is not None or path.startswith("s3://"):
        raise ValueError("the job's storage is on S3: pass the export folder explicitly")
    found = sorted(
        Path(path, config.name).glob("checkpoint_*/export"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise FileNotFoundError(f"no finished run of {config.name!r} under {path}")
    return found[-1]


def evaluate_job(
    config: JobConfig,
    tuned: str | Path | None = None,
    dataset_uri: str | None = None,
    max_batches: int | None = None,
) -> dict[str, dict[str, float]]:
    dataset_uri = dataset_uri or config.data.eval
    if not dataset_uri:
        raise ValueError("no held-out data: set data.eval or pass a dataset")
    batch = config.data.batch_size_per_stream
    base = build_model(config)
    report = {"base": perplexity(base, dataset_uri, batch, max_batches, config.s3_endpoint_url)}
    model = apply_export(base, config, tuned or latest_export(config))
    report["tuned"] = perplexity(model, dataset_uri, batch, max_batches, config.s3_endpoint_url)
    return report
