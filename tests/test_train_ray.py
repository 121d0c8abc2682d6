"""Ray Train end to end on CPU: 2 JAX processes, one of them killed mid-run, against one
process with the same global batch; checkpoints on S3 (a moto server on 127.0.0.1); the MLflow
run's metrics, artifacts and model version.

6 optimizer steps over an epoch boundary (4 steps per epoch), global batch 4 (2 streams):
  reference: one process reading streams [0, 1] (the worker's reader, model and step code,
     without Ray: a 1-worker Ray group would add minutes of start-up on a 2-core machine);
  job: 2 Ray Train workers (one stream each, JaxTrainer + jax.distributed on CPU), rank 1's
     process exits after step 3 (once); the worker group restarts from the step-2
     checkpoint on s3:// (FailureConfig(max_failures=1)).
The job must end where the reference ends: same parameters (float32; tolerance 2e-5
absolute, only the reduction order of the gradient all-reduce differs; seen: ~1e-7) and the
same data at every step (data_checksum = sum of the global batch's token ids).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_support import job_dict, pattern_tokens, write_dataset  # noqa: E402

from rwkv_ray.train import checkpoint as ckpt_io  # noqa: E402
from rwkv_ray.train.config import JobConfig  # noqa: E402

BUCKET = "rwkv-test"


@pytest.fixture(scope="module")
def s3_server(s3_endpoint):
    ckpt_io.s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    return s3_endpoint


@pytest.fixture(scope="module")
def ray_session(s3_server, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("jax_cache")
    import ray

    # One JAX compilation cache for every worker: a restarted worker group skips compiling.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def result_checkpoint(result) -> ckpt_io.TrainCheckpoint:
    with result.checkpoint.as_directory() as directory:
        return ckpt_io.read_local(directory)


def last_per_step(client, run_id: str, key: str) -> dict[int, float]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}  # a replayed step keeps its latest value


def reference_run(config: JobConfig) -> tuple[list[np.ndarray], dict[int, float]]:
    """The job's steps in this process (1 worker reading every stream), no Ray."""
    from rwkv_ray.train.step import TrainStep, build_model, build_optimizer, to_numpy
    from rwkv_ray.train.worker import micro_batches, open_reader, total_steps

    reader = open_reader(config, rank=0)
    _, steps = total_steps(config, reader.steps_per_epoch)
    model = build_model(config)
    train = TrainStep(model, build_optimizer(config, model, steps), config.optimizer.clip_norm)
    state, checksums, epoch = train.initial_state(), {}, 0
    while len(checksums) < steps:
        for _, tokens, mask in micro_batches(reader, epoch, 0, config.optimizer.grad_accum):
            state, metrics = train(state, tokens, mask)
            checksums[len(checksums) + 1] = metrics["data_checksum"]
            if len(checksums) == steps:
                break
        epoch += 1
    return [to_numpy(v) for v in state.trainable], checksums


def test_two_workers_with_one_killed_equal_one_process(ray_session, s3_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from rwkv_ray.train.trainer import run_job

    data = write_dataset(tmp_path / "data", pattern_tokens(16, 32, 97), num_shards=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = tmp_path / "xla"
    job = job_dict(
        data,
        f"s3://{BUCKET}/runs",
        name="two",
        s3_endpoint_url=s3_server,
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "compilation_cache_dir": str(cache)},
        checkpointing={"storage_path": f"s3://{BUCKET}/runs", "max_failures": 1},
        debug={"progress": False, "fail_at_step": 3, "fail_rank": 1, "fail_mode": "exit"},
        mlflow={"enabled": True, "tracking_uri": uri, "experiment": "test"},
    )
    result = run_job(JobConfig.from_dict(job))
    job["scaling"] = {"num_workers": 1}
    expected, expected_sums = reference_run(JobConfig.from_dict(job))

    got = result_checkpoint(result)
    assert (got.global_step, got.epoch, got.batch) == (6, 1, 2)
    # The workers kept the compiled step for a restart (JAX's persistent cache).
    assert sorted(cache.glob("jit_step*")), f"no compiled step in {cache}"
    diffs = [np.abs(x - y).max() for x, y in zip(expected, got.trainable, strict=True)]
    print(f"max |params(2 workers, 1 killed) - params(1 process)| = {max(diffs):.2e}")
    assert max(diffs) < 2e-5, max(diffs)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    run_id = run.info.run_id
    assert last_per_step(client, run_id, "data_checksum") == expected_sums  # none lost/repeated
    replayed = client.get_metric_history(run_id, "data_checksum")
    assert sorted(m.step for m in replayed) == [1, 2, 3, 3, 4, 5, 6]  # step 3 ran twice
    losses = last_per_step(client, run_id, "loss")
    assert losses[6] < 0.8 * losses[1]
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time"):
        assert sorted(last_per_step(client, run_id, key)) == list(range(1, 7))
    assert run.data.params["optimizer.lr"] == "0.003"
    assert run.data.params["scaling.num_workers"] == "2"
    names = {f.path for f in client.list_artifacts(run_id, "export")}
    expected_files = {"model.pth", "model", "config.yaml", "loss_curve.png"}
    assert {f"export/{n}" for n in expected_files} <= names
    assert client.get_model_version_by_alias("two", "candidate").run_id == run_id

    listing = ckpt_io.s3_client(s3_server).list_objects_v2(Bucket=BUCKET, Prefix="runs/two/")
    keys = [o["Key"] for o in listing["Contents"]]
    assert sum(k.endswith("/meta.json") for k in keys) >= 2  # steps 4 and 6 at least
    assert any(k.endswith("/export/model.pth") for k in keys)  # the final checkpoint's export
