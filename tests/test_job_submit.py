"""`ray job submit` round trip on a real local cluster, and a resubmitted job resumes (#4, #7).

A head node from `ray start --head` (127.0.0.1, free ports, its own temp dir, 2 CPUs, the
dashboard: it serves the jobs API), then exactly what README.md "Run on a cluster" shows:
  ray job submit --address http://127.0.0.1:<port> --runtime-env infra/runtime_env.yaml \
    --working-dir . -- python jobs/finetune.py --config <tiny job>
The job trains a 1-layer model for 3 steps (checkpoints at 2 and 3; local storage and a
sqlite MLflow under tmp). The same job resubmitted with max_steps 5 must resume at step 4:
one MLflow run whose steps 1..5 are each logged once, steps 4-5 after the first job ended,
and every step's data_checksum (sum of the batch's token ids) equal to an uninterrupted
reading of the data, so step 4 read the 4th batch, not the 1st again.

The cluster's environment has no PYTHONPATH, KERAS_BACKEND or JAX_PLATFORMS: the uploaded
working_dir and infra/runtime_env.yaml must be enough to import and run rwkv_ray. Ray 2.60
turns on token authentication for local clusters; the cluster and the CLI share a random
token through RAY_AUTH_MODE/RAY_AUTH_TOKEN (never ~/.ray/auth_token: other sessions use it).
`ray stop` would stop every Ray on the machine; the cluster is stopped by its process group.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from train_support import TINY_MODEL, job_dict, pattern_tokens, write_dataset  # noqa: E402

from rwkv_ray.train import checkpoint as ckpt_io  # noqa: E402
from rwkv_ray.train.config import JobConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
JOB_NAME = "submit-resume"
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


def free_ports(count: int) -> list[int]:
    """Distinct free ports, outside Ray's worker port range (10002-19999) on Linux."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def cluster_env(token: str, cache_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "KERAS_BACKEND", "JAX_PLATFORMS", "RAY_ADDRESS")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job = this venv's
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # One compilation cache for both jobs (the trainer forwards it to its workers): the
        # resubmitted job skips most of the compile.
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",  # every worker line reaches the job log (the test reads it)
    )
    return env


def wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log: Path) -> None:
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(f"the jobs API did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_cluster(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's process group (every process `ray start` started), SIGKILL what is
    left after 5 s (gcs_server can ignore SIGTERM), then any straggler whose command line
    names this cluster's private temp dir."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(jobs API url, environment for the `ray` CLI) of a fresh local head node."""
    # Ray's unix sockets live under the temp dir and must fit in 107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="rwkv-ray-", dir="/tmp")
    token = secrets.token_hex(32)
    env = cluster_env(token, tmp_path_factory.mktemp("jax_cache"))
    gcs, dashboard, client, agent = free_ports(4)
    log = Path(temp_dir) / "head.log"
    command = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "wb") as out:
        # A new session = a new process group, so teardown can signal exactly this cluster.
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, token, head, log)
        yield url, env
    finally:
        stop_cluster(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, submission_id: str, config_path: Path) -> str:
    """`ray job submit` as README.md shows it; returns its output, after checking the exit
    code and the job's final status."""
    url, env = cluster
    command = [
        str(BIN / "ray"), "job", "submit", "--address", url,
        "--submission-id", submission_id,
        "--runtime-env", "infra/runtime_env.yaml", "--working-dir", ".",
        "--", "python", "jobs/finetune.py", "--config", str(config_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert job_status(url, env["RAY_AUTH_TOKEN"], submission_id) == "SUCCEEDED", output[-4000:]
    return output


def job_status(url: str, token: str, submission_id: str) -> str:
    """The job's status from the jobs REST API (what `ray job status` prints)."""
    request = urllib.request.Request(
        f"{url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def write_job(tmp: Path, data_dir: Path, max_steps: int) -> Path:
    job = job_dict(
        data_dir,
        tmp / "runs",  # absolute: the driver's working dir is Ray's copy of the repo
        name=JOB_NAME,
        model={"config": {**TINY_MODEL, "num_layers": 1}, "init_seed": 0},
        schedule={"max_steps": max_steps, "warmup_steps": 1},
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        checkpointing={"storage_path": str(tmp / "runs"), "every_steps": 2, "keep": 2},
        mlflow={
            "enabled": True,
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "experiment": "job-submit",
            "registered_model": "",
        },
    )
    path = tmp / f"job-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def reference_checksums(config: JobConfig, steps: int) -> list[float]:
    """data_checksum of steps 1..`steps` of one uninterrupted reading of the data (in this
    process, with no model built: the order depends on (seed, epoch) alone)."""
    from rwkv_ray.train.worker import micro_batches, open_reader

    reader, sums, epoch = open_reader(config, rank=0), [], 0
    while len(sums) < steps:
        for _, tokens, _ in micro_batches(reader, epoch, 0, config.optimizer.grad_accum):
            sums.append(float(tokens.sum()))
            if len(sums) == steps:
                break
        epoch += 1
    return sums


def mlflow_history(tmp: Path, key: str) -> tuple[str, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("job-submit")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == [JOB_NAME]  # one run, resumed, never a second
    run = runs[0]
    return run.info.status, sorted(client.get_metric_history(run.info.run_id, key),
                                   key=lambda m: (m.step, m.timestamp))  # fmt: skip


def latest_meta(tmp: Path) -> tuple[str, dict]:
    uri = ckpt_io.latest_checkpoint(tmp / "runs" / JOB_NAME)
    assert uri is not None
    return uri, ckpt_io.read_meta(uri)


def reported_steps(output: str) -> list[int]:
    """global_step of every `ray.train.report` the job's log shows."""
    return [int(s) for s in re.findall(r"Reporting training result \d+: .*?'global_step': (\d+)",
                                       output)]  # fmt: skip


def test_submitted_job_trains_and_a_resubmitted_job_resumes(cluster, tmp_path):
    data = write_dataset(tmp_path / "data", pattern_tokens(16, 16, TINY_MODEL["vocab_size"]))
    first = write_job(tmp_path, data, max_steps=3)
    expected = reference_checksums(JobConfig.from_dict(yaml.safe_load(first.read_text())), 5)

    # ---- first submission: 3 steps -----------------------------------------------------
    output = submit(cluster, "rwkv-first", first)
    first_done_ms = time.time() * 1000
    assert reported_steps(output) == [2, 3], output[-4000:]
    uri, meta = latest_meta(tmp_path)
    assert (meta["global_step"], meta["epoch"], meta["batch"]) == (3, 0, 3)
    assert (Path(uri) / "export" / "model" / "model.weights.h5").is_file()
    status, loss = mlflow_history(tmp_path, "loss")
    assert status == "FINISHED"
    assert [m.step for m in loss] == [1, 2, 3]
    assert all(math.isfinite(m.value) for m in loss)
    # Toy counting data, lr 3e-3: 3 steps take the loss from ~ln(97) = 4.57 to well below.
    assert loss[0].value == pytest.approx(math.log(TINY_MODEL["vocab_size"]), abs=0.5)
    assert loss[-1].value < loss[0].value - 0.5

    # ---- resubmission: same name and storage, 5 steps --------------------------------------
    second = write_job(tmp_path, data, max_steps=5)
    output = submit(cluster, "rwkv-resumed", second)
    # Resumed from the step-3 checkpoint: the first step it reports is 4 (never 1 or 2).
    assert reported_steps(output) == [4, 5], output[-4000:]
    assert '"global_step": 5' in output
    uri, meta = latest_meta(tmp_path)
    assert (meta["global_step"], meta["epoch"], meta["batch"]) == (5, 1, 1)
    assert (Path(uri) / "export" / "model.pth").is_file()
    status, loss = mlflow_history(tmp_path, "loss")
    assert status == "FINISHED"
    assert [m.step for m in loss] == [1, 2, 3, 4, 5]  # each step logged once
    assert all(math.isfinite(m.value) for m in loss)
    assert all(m.timestamp <= first_done_ms for m in loss[:3])  # untouched by the resume
    assert all(m.timestamp > first_done_ms for m in loss[3:])  # new steps only
    _, checksums = mlflow_history(tmp_path, "data_checksum")
    np.testing.assert_array_equal([m.value for m in checksums], expected)
