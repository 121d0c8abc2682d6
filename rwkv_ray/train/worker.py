"""The per-worker training loop that Ray Train runs (`train_loop_per_worker`).

Every worker: rebuild the config from the plain dict, open its data streams, build the
model and the compiled step, restore the latest checkpoint (if any), then loop. Rank 0 alone
writes checkpoints, MLflow records and the final export; every worker calls
`ray.train.report` together (it is a barrier in Ray Train V2).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import ray.train

from rwkv_ray.train import checkpoint as ckpt_io
from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.step import (
    TrainState,
    TrainStep,
    build_model,
    build_optimizer,
    move_to_host,
    to_numpy,
    use_compilation_cache,
)


class InjectedFailure(RuntimeError):
    """Raised by `debug.fail_at_step` (tests of fault tolerance)."""


class NonFiniteStepError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite: the run stops before any
    checkpoint holds the weights that step left (`check_finite`)."""


def check_finite(metrics: dict[str, float], step: int) -> None:
    """Raise NonFiniteStepError where the step's loss or gradient norm is not finite.

    Called on every step's metrics before a checkpoint of the state after it is written, so
    the saved checkpoints (and the final export) keep finite weights: a finite gradient norm
    means a finite update, and a step with a NaN loss or gradient has already updated the
    weights with it."""
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics}
    bad = {k: v for k, v in bad.items() if not math.isfinite(v)}
    if bad:
        found = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteStepError(
            f"step {step}: {found}. The run stopped before writing a checkpoint at or after "
            "this step, so the latest checkpoint holds finite weights. Usual causes: a "
            "learning rate too high (optimizer.lr, schedule.warmup_steps) or gradient "
            "clipping off (optimizer.clip_norm). A resubmitted job, and a restart under "
            "checkpointing.max_failures, resume from that checkpoint and replay the same "
            "batches: change the settings first."
        )


def open_reader(config: JobConfig, rank: int):
    from rwkv_ray.data.reader import ShardReader

    d = config.data
    return ShardReader(
        d.train,
        d.batch_size_per_stream,
        d.seed,
        streams=config.streams_of(rank),
        num_streams=config.num_streams,
        cache_dir=d.cache_dir,
        s3_endpoint_url=config.s3_endpoint_url,
    )


def total_steps(config: JobConfig, reader_steps_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps of the job)."""
    per_epoch = reader_steps_per_epoch // config.optimizer.grad_accum
    if per_epoch < 1:
        raise ValueError(
            f"data.train has {reader_steps_per_epoch} batches per epoch per stream, fewer "
            f"than optimizer.grad_accum ({config.optimizer.grad_accum})"
        )
    return per_epoch, config.schedule.max_steps or config.schedule.epochs * per_epoch


def micro_batches(reader, epoch: int, start_batch: int, grad_accum: int):
    """Yield (next batch index, tokens [A,b,T], loss_mask [A,b,T]) groups of `grad_accum`."""
    group: list[dict] = []
    index = start_batch
    for batch in reader.batches(epoch, start_step=start_batch):
        group.append(batch)
        index += 1
        if len(group) == grad_accum:
            tokens = np.stack([b["tokens"] for b in group]).astype(np.int32)
            mask = np.stack([b["loss_mask"] for b in group]).astype(np.float32)
            yield index, tokens, mask
            group = []


def latest_saved(config: JobConfig) -> ckpt_io.TrainCheckpoint | None:
    """The newer of Ray's latest registered checkpoint and the newest complete one in the
    run's storage. Ray Train V2 registers a reported checkpoint when its controller polls
    the workers; a worker that dies right after a report can lose that registration even
    though the files are stored (seen on Ray 2.60), so the storage is searched as well."""
    saved = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            try:
                saved = ckpt_io.read_local(directory)
            except (ckpt_io.IncompleteCheckpointError, FileNotFoundError) as e:
                print(f"skipping Ray's latest checkpoint: {e}", file=sys.stderr)
    from rwkv_ray.train.trainer import run_storage_uri

    newer = ckpt_io.read_newest(
        run_storage_uri(config),
        config.s3_endpoint_url,
        newer_than=-1 if saved is None else saved.global_step,
    )
    return newer or saved


def restore(train: TrainStep, config: JobConfig) -> tuple[TrainState, dict[str, Any]]:
    """The initial train state, or the one of the latest Ray Train checkpoint."""
    position = {"global_step": 0, "epoch": 0, "batch": 0, "rng": None, "extra": {}}
    saved = latest_saved(config)
    if saved is None:
        position["rng"] = np.asarray(jax.random.key_data(jax.random.key(config.data.seed)))
        return train.initial_state(), position
    saved.check_fits(
        [v.path for v in train.model.trainable_variables],
        [v.path for v in train.optimizer.variables],
    )
    state = train.initial_state()
    state = TrainState(
        [train.replicate(a) for a in saved.trainable],
        state.non_trainable,
        [train.replicate(a) for a in saved.optimizer],
    )
    position.update(
        global_step=saved.global_step,
        epoch=saved.epoch,
        batch=saved.batch,
        rng=saved.rng,
        extra=saved.extra,
        restored=True,
    )
    return state, position


def to_checkpoint(train: TrainStep, state: TrainState, config: JobConfig, position) -> Any:
    return ckpt_io.TrainCheckpoint(
        trainable=[to_numpy(a) for a in state.trainable],
        optimizer=[to_numpy(a) for a in state.optimizer],
        rng=np.asarray(position["rng"]),
        global_step=position["global_step"],
        epoch=position["epoch"],
        batch=position["batch"],
        trainable_paths=[v.path for v in train.model.trainable_variables],
        optimizer_paths=[v.path for v in train.optimizer.variables],
        config=config.to_dict(),
        extra=position["extra"],
    )


def report(train, state, config, position, metrics, rank, final=False, tracker=None) -> None:
    """All workers report together; rank 0 attaches the checkpoint (and the final export)."""
    metrics = {**metrics, "global_step": position["global_step"], "epoch": position["epoch"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / ckpt_io.checkpoint_name(position["global_step"])
        ckpt_io.write_local(to_checkpoint(train, state, config, position), directory)
        export_dir = directory / "export"
        if final:
            train.write_back(state)
            if tracker is not None:
                tracker.export(train.model, config, export_dir)
            else:
                from rwkv_ray.train.tracking import export_result

                export_result(train.model, config, export_dir)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        if final and tracker is not None:
            # After the report: the result is stored with the final checkpoint before MLflow
            # (artifacts, the model registry) is asked for anything that could fail.
            tracker.publish(config, export_dir)


def maybe_fail(config: JobConfig, position, rank: int) -> None:
    """Test hook: fail once at `debug.fail_at_step` (a resumed run does not fail again)."""
    d = config.debug
    if d.fail_at_step != position["global_step"] or rank != d.fail_rank:
        return
    if position.get("restored"):
        return
    if d.fail_mode == "exit":
        # Ray Train V2 collects a worker's reports only when the controller polls it
        # (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). A process that dies
        # before that poll takes its last report with it, so the run would restart from an
        # older checkpoint than the one just written: wait out a few polls first, the way
        # a real crash some time after a checkpoint would.
        interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
        time.sleep(3 * interval)
        os._exit(1)  # a killed worker process, not a Python exception
    raise InjectedFailure(f"injected failure at step {position['global_step']} on rank {rank}")


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train entry point. `payload` = {"config": JobConfig.to_dict()}."""
    config = JobConfig.from_dict(payload["config"])
    use_compilation_cache(config.scaling.compilation_cache_dir)  # before the step compiles
    context = ray.train.get_context()
    rank = context.get_world_rank()
    reader = open_reader(config, rank)
    per_epoch, steps = total_steps(config, reader.steps_per_epoch)
    model = build_model(config)
    optimizer = build_optimizer(config, model, steps)
    move_to_host(model, optimizer)  # the step's state is the only copy on the GPUs
    train = TrainStep(
        model,
        optimizer,
        config.optimizer.clip_norm,
        config.model.remat,
        shard_optimizer=config.scaling.shard_optimizer,
    )
    state, position = restore(train, config)
    tracker = None
    if rank == 0 and config.mlflow.enabled:
        from rwkv_ray.train.tracking import Tracker

        # The driver's run (run_job checked the one the checkpoints name: it may be gone).
        run_id = payload.get("mlflow_run_id") or position["extra"].get("mlflow_run_id")
        tracker = Tracker(config, run_id=run_id)
        position["extra"]["mlflow_run_id"] = tracker.run_id
    progress = _progress(config, rank, steps, position["global_step"])
    metrics: dict[str, float] = {}
    while position["global_step"] < steps:
        args = (reader, config, position, rank, steps, tracker, progress)
        state, metrics = run_epoch(train, state, metrics, *args)
    if progress is not None:
        progress.close()  # before the final report: the worker may be gone soon after it
    report(train, state, config, position, metrics, rank, final=True, tracker=tracker)


def run_epoch(train, state, metrics, reader, config, position, rank, steps, tracker, progress):
    """Steps through the rest of `position["epoch"]` (or until `steps`), updating
    `position` in place; returns (state, the last step's metrics).

    One step stays in flight: step n is dispatched before step n-1's metrics are read and
    logged, so reading the next batch, MLflow and the progress bar overlap the devices'
    work. A step is waited for before anything that needs it done: a checkpoint, the end
    of the epoch or the job, and `debug.fail_at_step`."""
    accum = config.optimizer.grad_accum
    groups = micro_batches(reader, position["epoch"], position["batch"], accum)
    in_flight = None  # (the PendingStep, its global step number, its tokens' size)

    def record(pending, global_step, size) -> dict[str, float]:
        done = train.finish(pending)
        done["tokens_per_s"] = size * config.scaling.num_workers / done["step_time"]
        if tracker is not None:
            tracker.log_step(global_step, done)
        if progress is not None:
            progress.set_description(f"{config.name} loss {done['loss']:.4f}")
            progress.update(1)
        check_finite(done, global_step)  # logged first, so MLflow shows the step
        return done

    for next_batch, tokens, mask in groups:
        state, pending = train.dispatch(state, tokens, mask)
        if in_flight is not None:
            metrics = record(*in_flight)  # the step before, while this one runs
        position.update(global_step=position["global_step"] + 1, batch=next_batch)
        if next_batch + accum > reader.steps_per_epoch:  # no full group left: next epoch
            position.update(epoch=position["epoch"] + 1, batch=0)
        in_flight = (pending, position["global_step"], tokens.size)
        step = position["global_step"]
        checkpoint_due = step % config.checkpointing.every_steps == 0
        if (
            step >= steps
            or checkpoint_due
            or position["batch"] == 0
            or (step == config.debug.fail_at_step)
        ):
            metrics, in_flight = record(*in_flight), None
        if step >= steps:
            return state, metrics
        if checkpoint_due:
            report(train, state, config, position, metrics, rank)
        maybe_fail(config, position, rank)
        if position["batch"] == 0:
            return state, metrics
    if in_flight is not None:
        metrics = record(*in_flight)
    position.update(epoch=position["epoch"] + 1, batch=0)  # a reader that ended early
    return state, metrics


def _progress(config: JobConfig, rank: int, total: int, initial: int):
    if rank != 0 or not config.debug.progress:
        return None
    # Ray's tqdm: the worker prints the bar's state and the driver draws one bar in place
    # (trainer.worker_env turns off Train's print patch for it). A plain tqdm's carriage-return
    # redraws reach the driver as one new log line each.
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=config.name, unit="step")
    bar.n = initial  # a resumed run (this tqdm has no `initial`)
    return bar
