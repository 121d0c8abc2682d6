"""`run_job(config)`: a Ray Train V2 `JaxTrainer` built from a `JobConfig`.

- Scaling: `scaling.num_workers` JAX processes (jax.distributed is initialised by the
  trainer's JaxConfig). GPUs: one worker per node holding all of its GPUs
  (`scaling.gpus_per_worker`): JaxTrainer rewrites CUDA_VISIBLE_DEVICES to 0..n-1.
- CPU (tests, `make demo`): JaxConfig(use_gpu=True) + ScalingConfig(use_gpu=False) + worker
  env JAX_PLATFORMS=cpu. With use_gpu=False the JaxConfig would skip jax.distributed and
  every worker would train alone; use_gpu=True only picks the "initialize" branch, and the
  env var keeps JAX on the CPU (Ray 2.60, verified by tests/test_train_ray.py).
- Storage: `checkpointing.storage_path`, local (a relative path is taken from the driver's
  working directory: `job_paths.resolve_job_paths`) or s3://bucket/prefix (pyarrow S3; the
  job's `s3_endpoint_url` or env AWS_ENDPOINT_URL for an S3-compatible server).
  Resubmitting the same `name` with the same storage resumes from the run's latest
  checkpoint.
- FailureConfig(max_failures): a failed worker group restarts from the latest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from rwkv_ray.train.config import JobConfig, JobConfigError
from rwkv_ray.train.tracking import tracking_uri

FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "RWKV_WKV_IMPL",
    "JAX_COMPILATION_CACHE_DIR",
)


def storage(config: JobConfig) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for RunConfig."""
    path = config.checkpointing.storage_path
    if not path.startswith("s3://"):
        local = Path(path)
        return str(local if local.is_absolute() else Path.cwd() / local), None
    endpoint = config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint is None:
        return path, None
    import pyarrow.fs

    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint,
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )
    return path[len("s3://") :], filesystem


def run_storage_uri(config: JobConfig) -> str:
    """Where the run's checkpoints live: <storage_path>/<name> (a local path or s3:// uri)."""
    path = config.checkpointing.storage_path
    if path.startswith("s3://"):
        return f"{path.rstrip('/')}/{config.name}"
    return str(Path(storage(config)[0]) / config.name)


def worker_env(config: JobConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["KERAS_BACKEND"] = "jax"
    # Train's print patch re-logs each print as a log record with its own newline: the state
    # lines of the worker's progress bar (ray.experimental.tqdm_ray) would each add an empty
    # line on the driver. Unpatched, prints still reach the driver through the worker's stdout.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    env["MLFLOW_TRACKING_URI"] = tracking_uri(config.mlflow.tracking_uri)
    if config.s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = config.s3_endpoint_url
    if config.scaling.use_gpu:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(config.scaling.gpu_memory_fraction)
    else:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def build_trainer(config: JobConfig, mlflow_run_id: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxConfig, JaxTrainer

    from rwkv_ray.train.worker import train_loop_per_worker

    s = config.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    storage_path, filesystem = storage(config)
    run_config = RunConfig(
        name=config.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.checkpointing.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.checkpointing.keep),
        worker_runtime_env={"env_vars": worker_env(config)},
    )
    return JaxTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "mlflow_run_id": mlflow_run_id},
        # use_gpu=True on CPU too: it is what makes JaxConfig call jax.distributed.initialize.
        jax_config=JaxConfig(use_gpu=True),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
    )


def run_job(config: JobConfig):
    """Train (or resume) the job on the connected Ray cluster; returns the Ray `Result`."""
    if not config.data.train:
        raise JobConfigError(
            "data.train: give the prepared training dataset (a directory or s3://)"
        )
    from rwkv_ray.train.job_paths import resolve_job_paths

    config = resolve_job_paths(config, ray_is_this_machine())  # the workers get absolute paths
    run_id = None
    if config.mlflow.enabled:
        from rwkv_ray.train.tracking import check_tracking_server, mark_failed, open_job_run

        check_tracking_server(tracking_uri(config.mlflow.tracking_uri))
        run_id = open_job_run(config, saved_run_id(config))
    try:
        result = build_trainer(config, run_id).fit()
    except BaseException:
        if run_id is not None:
            mark_failed(config, run_id)
        raise
    if run_id is not None:
        registered = config.registered_model_name
        where = f"; registered as models:/{registered}@{config.mlflow.alias}" if registered else ""
        print(f"MLflow run {run_id} (experiment {config.mlflow.experiment!r}){where}")
    if result.checkpoint is not None:
        link_latest(config, result.checkpoint.path)
    return result


def ray_is_this_machine() -> bool:
    """Whether every node of the connected Ray cluster is this machine (a local Ray)."""
    import ray

    if not ray.is_initialized():
        return False
    here = ray.util.get_node_ip_address()
    return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])


def saved_run_id(config: JobConfig) -> str | None:
    """The MLflow run id that the job's newest checkpoint names (a resubmitted job)."""
    from rwkv_ray.train import checkpoint as ckpt_io

    found = ckpt_io.checkpoints_newest_first(run_storage_uri(config), config.s3_endpoint_url)
    if not found:
        return None
    meta = ckpt_io.read_meta(found[0][1], config.s3_endpoint_url)
    return (meta.get("extra") or {}).get("mlflow_run_id")


def link_latest(config: JobConfig, checkpoint_path: str) -> None:
    """<storage>/<name>/latest -> the run's final checkpoint (local storage only): a path
    that stays the same from run to run, for the next job's model.path (state tuning of a
    full run's export: `.../latest/export/model`)."""
    if config.checkpointing.storage_path.startswith("s3://"):
        return
    run_dir, checkpoint = Path(run_storage_uri(config)), Path(checkpoint_path)
    if checkpoint.parent != run_dir:
        return
    temporary = run_dir / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(checkpoint.name)  # relative: the run folder may be moved
    os.replace(temporary, run_dir / "latest")
