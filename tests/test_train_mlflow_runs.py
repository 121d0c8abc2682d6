"""The MLflow run of a job across failures, with `run_job`'s driver code and the real worker
loop run in this process (Ray Train's report / checkpoint calls stand in: a 2-core machine
cannot afford a Ray start per case; test_train_ray.py runs the real thing once).

- A restart before the first checkpoint logs into the job's one run (it opened a second).
- A job that fails for good leaves its run FAILED (it stayed RUNNING).
- A model-registry error after training leaves the final checkpoint and its export stored
  (the registration came before the final report, so the error discarded them).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_support import job_dict, pattern_tokens, write_dataset  # noqa: E402

from rwkv_ray.train import checkpoint as ckpt_io  # noqa: E402
from rwkv_ray.train import trainer as trainer_mod  # noqa: E402
from rwkv_ray.train.config import JobConfig  # noqa: E402

pytest.importorskip("mlflow")


class InProcessTrainer:
    """`fit()` as Ray Train runs it with FailureConfig(max_failures): the worker loop, and
    after a failure again from the last reported checkpoint (copied into the run's storage
    the way Ray persists it), at most `max_failures` times. `debug.fail_at_step` fails the
    first attempt only (a transient failure; the worker's hook fails once per checkpoint)."""

    def __init__(self, config: JobConfig, mlflow_run_id: str | None, monkeypatch):
        self.config, self.run_id, self.monkeypatch = config, mlflow_run_id, monkeypatch
        self.run_dir = Path(config.checkpointing.storage_path) / config.name
        self.latest: Path | None = None

    def _fake_ray_train(self):
        import ray.train

        class Context:
            def get_world_rank(self):
                return 0

        class Stored:
            def __init__(self, path):
                self.path = str(path)

            @contextlib.contextmanager
            def as_directory(self):
                yield self.path

        def report(metrics, checkpoint=None):
            if checkpoint is not None:
                self.latest = self.run_dir / f"ray_checkpoint_{metrics['global_step']:06d}"
                shutil.rmtree(self.latest, ignore_errors=True)
                shutil.copytree(checkpoint.path, self.latest)

        self.monkeypatch.setattr(ray.train, "get_context", lambda: Context())
        self.monkeypatch.setattr(
            ray.train,
            "get_checkpoint",
            lambda: None if self.latest is None else Stored(self.latest),
        )
        self.monkeypatch.setattr(ray.train, "report", report)

    def fit(self):
        import keras

        from rwkv_ray.train.worker import train_loop_per_worker

        self._fake_ray_train()
        payload = {"config": self.config.to_dict(), "mlflow_run_id": self.run_id}
        for attempt in range(self.config.checkpointing.max_failures + 1):
            keras.backend.clear_session()  # a fresh worker process
            if attempt == 1:
                payload["config"]["debug"]["fail_at_step"] = None
            try:
                train_loop_per_worker(payload)
                return self
            except Exception:
                if attempt == self.config.checkpointing.max_failures:
                    raise

    @property
    def checkpoint(self):
        return None  # no `latest` link: the storage is not Ray's layout here


def run_in_process(tmp_path, monkeypatch, **sections) -> tuple[JobConfig, str]:
    data = write_dataset(tmp_path / "data", pattern_tokens(16, 32, 97), num_shards=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = job_dict(
        data,
        tmp_path / "runs",
        schedule={"max_steps": 4, "warmup_steps": 0},
        mlflow={"enabled": True, "tracking_uri": uri, "experiment": "e"},
    )
    for key, value in sections.items():
        job[key] = {**job[key], **value}
    config = JobConfig.from_dict(job)
    monkeypatch.setattr(
        trainer_mod,
        "build_trainer",
        lambda config, run_id=None: InProcessTrainer(config, run_id, monkeypatch),
    )
    return config, uri


def runs_of(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e").experiment_id
    return client, client.search_runs([experiment])


def test_a_restart_before_the_first_checkpoint_keeps_one_run(tmp_path, monkeypatch):
    config, uri = run_in_process(
        tmp_path,
        monkeypatch,
        checkpointing={"every_steps": 3, "max_failures": 1},
        debug={"fail_at_step": 2},
    )
    trainer_mod.run_job(config)
    client, runs = runs_of(uri)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    (run,) = runs
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    print("loss steps logged:", steps)
    assert steps == [1, 1, 2, 2, 3, 4], steps  # steps 1 and 2 again after the restart
    # A resubmitted job (a new driver) reopens the run its newest checkpoint names.
    assert trainer_mod.saved_run_id(config) == run.info.run_id


def test_a_job_that_fails_for_good_marks_its_run_failed(tmp_path, monkeypatch):
    config, uri = run_in_process(tmp_path, monkeypatch, debug={"fail_at_step": 3})
    with pytest.raises(Exception, match="injected failure at step 3"):
        trainer_mod.run_job(config)
    _, (run,) = runs_of(uri)
    assert run.info.status == "FAILED"


def test_a_registry_error_keeps_the_final_checkpoint_and_export(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from rwkv_ray.train import tracking

    def refuse(self, config):
        raise MlflowException("registry down")

    monkeypatch.setattr(tracking.Tracker, "_register", refuse)
    config, uri = run_in_process(tmp_path, monkeypatch)
    with pytest.raises(MlflowException, match="registry down"):
        trainer_mod.run_job(config)
    final = ckpt_io.read_newest(tmp_path / "runs" / config.name)
    assert final.global_step == 4
    latest = ckpt_io.latest_checkpoint(tmp_path / "runs" / config.name)
    assert (Path(latest) / "export" / "model.pth").is_file()
    _, (run,) = runs_of(uri)
    assert run.info.status == "FAILED"


def test_a_resubmission_whose_run_is_gone_logs_into_a_new_run(tmp_path, monkeypatch):
    """The checkpoints name a run the tracking store does not have (mlflow.db moved, or
    another tracking URI): the resumed job logs into a new run (its first log_batch raised
    'Run ... not found' on the worker, after the model was built, on every attempt)."""
    config, _ = run_in_process(tmp_path, monkeypatch)
    trainer_mod.run_job(config)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    job = config.to_dict()
    job["schedule"]["max_steps"] = 6
    job["mlflow"]["tracking_uri"] = other
    trainer_mod.run_job(JobConfig.from_dict(job))
    client, (run,) = runs_of(other)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [5, 6]
