"""Job configs: YAML + dotted overrides, unknown keys named, plain-dict round trip, and the
example configs in jobs/configs/ all load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rwkv_ray.train.config import JobConfig, JobConfigError, load_job_config

CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*/*.yaml"))


def test_example_configs_load_and_round_trip():
    assert len(CONFIGS) >= 3
    for path in CONFIGS:
        config = load_job_config(path)
        assert JobConfig.from_dict(config.to_dict()) == config


def test_overrides_are_parsed_as_yaml_and_nested():
    path = Path(__file__).parents[1] / "jobs/configs/full/tiny.yaml"
    config = load_job_config(
        path, ["optimizer.lr=1e-4", "scaling.num_workers=2", "mlflow.enabled=false"]
    )
    assert config.optimizer.lr == 1e-4 and isinstance(config.optimizer.lr, float)
    assert config.scaling.num_workers == 2 and not config.mlflow.enabled
    assert config.streams_of(1) == [1] and config.num_streams == 2


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.lrr=1", "optimizer.lrr"),
        ("bogus=1", "bogus"),
        ("model.config.hiden_size=64", "hiden_size"),
        ("mode=lora", "mode"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("scaling.num_workers=3", "data.num_streams"),  # 2 streams over 3 workers
        ("debug.fail_mode=crash", "debug.fail_mode"),
        ("model.remat=layers", "model.remat"),
        ("model.remat_blocks=0", "model.remat_blocks"),
        ("model.remat_blocks=2", "model.remat_blocks"),  # needs model.remat true or block
        ("model.master_weights=float16", "model.master_weights"),
        ("model.master_weights=bfloat16", "model.master_weights"),  # needs dtype bfloat16
        ("scaling.compilation_cache_dir=5", "scaling.compilation_cache_dir"),
        ("scaling.compilation_cache_dir=' '", "scaling.compilation_cache_dir"),
        ("data.num_streams=0", "data.num_streams"),
        ("data.num_streams=-1", "data.num_streams"),
        ("data.seed=-1", "data.seed"),
        ("scaling.gpus_per_worker=0", "scaling.gpus_per_worker"),
        ("scaling.cpus_per_worker=-2", "scaling.cpus_per_worker"),
        ("optimizer.beta_1=1.5", "optimizer.beta_1"),
        ("optimizer.epsilon=-1", "optimizer.epsilon"),
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("optimizer=0", "optimizer: must be a mapping"),  # not "the defaults"
        # Checked by the worker or by MLflow after all the training, before:
        ("model.wkv_impl=bogus", "model.wkv_impl"),
        ("model.init_seed=-1", "model.init_seed"),
        ("mlflow.alias=v1", "mlflow.alias: Version alias name 'v1' is reserved"),
        ("mlflow.alias=''", "mlflow.alias: Registered model alias name cannot be empty"),
        ("mlflow.alias=Latest", "mlflow.alias"),
        ("name=ft:v2", "name (the registered model's name): Invalid model name 'ft:v2'"),
        ("mlflow.registered_model=a/b", "mlflow.registered_model"),
        ("mlflow.experiment=' '", "mlflow.experiment"),
        # 8 rows over a worker's 3 GPUs: the first step would refuse them, after Ray started
        (("scaling.use_gpu=true", "scaling.gpus_per_worker=3"), "data.batch_size_per_stream"),
    ],
)
def test_bad_settings_name_the_key(override, named):
    path = Path(__file__).parents[1] / "jobs/configs/full/tiny.yaml"
    overrides = [override] if isinstance(override, str) else list(override)
    with pytest.raises(JobConfigError, match=re.escape(named)):
        load_job_config(path, ["data.num_streams=2", *overrides])


def test_model_needs_exactly_one_source():
    with pytest.raises(JobConfigError, match="model"):
        JobConfig.from_dict({"model": {}})
    with pytest.raises(JobConfigError, match="model"):
        JobConfig.from_dict({"model": {"path": "x", "config": {"num_layers": 2}}})


def test_gpu_workers_get_the_memory_fraction_cpu_workers_the_cpu_platform():
    from rwkv_ray.train.trainer import worker_env

    path = Path(__file__).parents[1] / "jobs/configs/full/tiny.yaml"
    gpu = worker_env(load_job_config(path, ["scaling.use_gpu=true"]))
    assert gpu["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95" and "JAX_PLATFORMS" not in gpu
    custom = load_job_config(path, ["scaling.use_gpu=true", "scaling.gpu_memory_fraction=0.6"])
    assert worker_env(custom)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.6"
    cpu = worker_env(load_job_config(path, []))
    assert cpu["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in cpu
    for bad in ("0", "1.5"):
        with pytest.raises(JobConfigError, match=r"scaling\.gpu_memory_fraction"):
            load_job_config(path, [f"scaling.gpu_memory_fraction={bad}"])


def test_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path):
    import jax

    from rwkv_ray.train.step import use_compilation_cache

    path = Path(__file__).parents[1] / "jobs/configs/full/tiny.yaml"
    assert load_job_config(path, []).scaling.compilation_cache_dir == "~/.cache/rwkv_ray/jax"
    assert (
        load_job_config(path, ["scaling.compilation_cache_dir=null"]).scaling.compilation_cache_dir
        is None
    )
    before = jax.config.jax_compilation_cache_dir
    try:
        use_compilation_cache(None)  # off: JAX's own setting stays
        assert jax.config.jax_compilation_cache_dir == before
        use_compilation_cache("~/xla-cache")  # "~" is this machine's home
        assert jax.config.jax_compilation_cache_dir == str(Path.home() / "xla-cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_split_optimizer_needs_one_worker():
    path = Path(__file__).parents[1] / "jobs/configs/full/tiny.yaml"
    one = load_job_config(path, ["scaling.shard_optimizer=true"])
    assert one.scaling.shard_optimizer and one.scaling.num_workers == 1
    with pytest.raises(JobConfigError, match=r"scaling\.shard_optimizer.*num_workers is 2"):
        load_job_config(
            path, ["scaling.shard_optimizer=true", "scaling.num_workers=2", "data.num_streams=2"]
        )


def test_a_job_without_training_data_stops_before_ray():
    from rwkv_ray.train.trainer import run_job

    path = Path(__file__).parents[1] / "jobs/configs/full/tiny.yaml"
    with pytest.raises(JobConfigError, match=r"data\.train: give the prepared training"):
        run_job(load_job_config(path, ["data.train=''"]))


def test_long_params_are_cut_at_mlflows_limit_with_a_mark():
    from rwkv_ray.train.tracking import CUT_MARK, MAX_PARAM_LENGTH, flatten

    flat = flatten({"model": {"path": "p" * 716, "long": "x" * 7000}})
    assert flat["model.path"] == "p" * 716  # was cut at 500 without a word
    assert len(flat["model.long"]) == MAX_PARAM_LENGTH and flat["model.long"].endswith(CUT_MARK)


def test_an_unreachable_tracking_server_is_reported_before_the_job_starts():
    """Nothing listening: a ValueError at once (MLflow's client retried for minutes on
    rank 0); an HTTP reply of any status passes; sqlite needs no server."""
    import http.server
    import socket
    import threading

    from rwkv_ray.train.tracking import check_tracking_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ValueError, match="no MLflow server answers there"):
        check_tracking_server(f"http://127.0.0.1:{free}", timeout_s=5)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_port}")  # 501: an answer
    finally:
        server.shutdown()
    check_tracking_server("sqlite:///nowhere/mlflow.db")
