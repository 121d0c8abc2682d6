"""MLflow tracking (rank 0 only) and the export of a tuning result.

- Run params: the whole job config, flattened (`optimizer.lr`, ...).
- Metrics per optimizer step: loss, lr, grad_norm, tokens_per_s, step_time, tokens (counted
  targets) and data_checksum (sum of the global batch's token ids: which data a step saw).
- Artifacts (under `export/`): config.yaml; for state modes the tuned initial state in our
  format (state.npz, `rwkv_ray.generation.state_io.save_state`, batch 1) and as an RWKV-PEFT
  state .pth ({'blocks.i.att.time_state': [H, value, key]}, which holds the wkv state only:
  the two shift vectors of `state+shift` exist in our format alone); for full tuning the
  model (config.json + model.weights.h5) and an official float32 .pth. Plus loss_curve.png.
- A registered model version (source = the run's export/ folder) with an alias.

The tracking URI: `mlflow.tracking_uri`, else env MLFLOW_TRACKING_URI, else
sqlite:///<working directory>/mlflow.db. Under `ray job submit --working-dir .` the working
directory is a temporary copy: a job there must set one of the two (job_paths.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from rwkv_ray.models import RWKV6CausalLM
from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.job_paths import default_tracking_uri

STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time", "tokens", "data_checksum")


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """For an http(s) tracking URI: ValueError where nothing answers there (any HTTP reply,
    even an auth error, counts as an answer). Run on the driver before the job starts:
    MLflow's client retries an unreachable server for minutes, and on rank 0 that is after
    the model is built."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # a server answered
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(
            f"mlflow.tracking_uri {uri}: no MLflow server answers there ({e}); start it, fix "
            "the URI (or MLFLOW_TRACKING_URI), or set mlflow.enabled: false"
        ) from e


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to the database (mlartifacts/), never into the
    working directory of whichever process created the experiment (a Ray worker's)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (MLflow 3)
CUT_MARK = "...[cut]"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            text = str(value)
            # MLflow's limit on a param's length; a cut value says so.
            limit = MAX_PARAM_LENGTH - len(CUT_MARK)
            out[prefix + key] = text if len(text) <= MAX_PARAM_LENGTH else text[:limit] + CUT_MARK
    return out


# ---- the export of a result (also used without MLflow) -----------------------------------
def export_result(model: RWKV6CausalLM, config: JobConfig, out_dir: Path) -> Path:
    """Write the tuning result (see the module docstring) into `out_dir`."""
    from rwkv_ray.convert import export_checkpoint, save_model
    from rwkv_ray.generation.state_io import export_peft_state, save_state

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if config.mode == "full":
        save_model(model, out_dir / "model")
        export_checkpoint(model, out_dir / "model.pth", dtype="float32")
    else:
        state = model.initial_state(1).numpy()
        save_state(state, out_dir / "state.npz", model)
        export_peft_state(state, out_dir / "state.pth", drop_shift=True)
    return out_dir


def loss_curve_png(steps: list[int], losses: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _client(config: JobConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(config.mlflow.tracking_uri))


def create_run(client, config: JobConfig) -> str:
    """A new run in the job's experiment (created with it), the config as its params."""
    from mlflow.entities import Param

    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(
            config.mlflow.experiment, artifact_location=artifact_location(client.tracking_uri)
        )
    )
    run = client.create_run(experiment_id, run_name=config.name, tags={"mode": config.mode})
    params = [Param(k, v) for k, v in flatten(config.to_dict()).items()]
    for i in range(0, len(params), 90):
        client.log_batch(run.info.run_id, params=params[i : i + 90])
    return run.info.run_id


class Tracker:
    """One MLflow run per job. Use on rank 0 only. `run_id`: the job's run (resumed after a
    restart); None creates one. Under `run_job` the driver opens the run (`open_job_run`)
    and marks it failed when the job fails for good (`mark_failed`): a worker that dies
    cannot."""

    def __init__(self, config: JobConfig, run_id: str | None = None):
        self.config = config
        self.client = _client(config)
        self.run_id = run_id or create_run(self.client, config)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(metrics[k]), now, step) for k in STEP_METRICS if k in metrics]
        self.client.log_batch(self.run_id, metrics=batch)

    def export(self, model: RWKV6CausalLM, config: JobConfig, export_dir: Path) -> None:
        """The export (`export_result`) plus the loss curve, into `export_dir`."""
        export_result(model, config, export_dir)
        history = self.client.get_metric_history(self.run_id, "loss")
        history = sorted(history, key=lambda m: m.step)
        if history:
            loss_curve_png(
                [m.step for m in history],
                [m.value for m in history],
                export_dir / "loss_curve.png",
                f"{config.name} ({config.mode})",
            )

    def publish(self, config: JobConfig, export_dir: Path) -> None:
        """Log the export as the run's artifacts, register a model version, end the run."""
        self.client.log_artifacts(self.run_id, str(export_dir), artifact_path="export")
        self._register(config)
        self.client.set_terminated(self.run_id)

    def finish(self, model: RWKV6CausalLM, config: JobConfig, export_dir: Path) -> None:
        self.export(model, config, export_dir)
        self.publish(config, export_dir)

    def _register(self, config: JobConfig) -> None:
        name = config.registered_model_name
        if not name:
            return
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        run = self.client.get_run(self.run_id)
        version = self.client.create_model_version(
            name, source=f"{run.info.artifact_uri}/export", run_id=self.run_id
        )
        self.client.set_registered_model_alias(name, config.mlflow.alias, version.version)


def open_job_run(config: JobConfig, saved_run_id: str | None) -> str:
    """On the driver: the job's MLflow run. `saved_run_id` (the one its newest checkpoint
    names: a resubmitted job) is reopened as RUNNING; without one, or where that run is
    gone, a new run. Passed to the workers, so a restart before the first checkpoint logs
    into the same run (not a second one)."""
    from mlflow.exceptions import MlflowException

    client = _client(config)
    if saved_run_id:
        try:
            client.update_run(saved_run_id, status="RUNNING")
            return saved_run_id
        except MlflowException as e:
            print(f"MLflow run {saved_run_id} of the last checkpoint is gone ({e}): a new run")
    return create_run(client, config)


def mark_failed(config: JobConfig, run_id: str) -> None:
    """On the driver, after the job failed for good: the run's status FAILED (not left
    RUNNING). An MLflow error here is printed, not raised over the job's own error."""
    try:
        _client(config).set_terminated(run_id, "FAILED")
    except Exception as e:  # noqa: BLE001 - the job's error is the one to show
        print(f"could not mark MLflow run {run_id} failed: {e}")
