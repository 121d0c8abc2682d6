"""Tuned states from MLflow: the state a fine-tuning run logged, by run or registered model.

The fine-tuning job (`rwkv_ray.train.tracking`) logs a state-mode result as the artifact
`export/state.npz` of its run and registers a model version whose source is the run's
`export/` folder (alias `candidate` by default). A request's `state` may name one of them
(an optional `mlflow:` prefix is accepted):

    runs:/<run_id>                  the run's export/state.npz
    runs:/<run_id>/<path>           <path> if it ends in .npz, else <path>/state.npz
    models:/<name>@<alias>          state.npz of the version the alias points to
    models:/<name>/<version>

Files are downloaded with MLflow's artifact API into `cache_dir` once (a run's artifacts
do not change); an alias is resolved again after `alias_ttl_s`, so moving `candidate` to a
new version takes effect without a restart. A file that is not a state of this model is
refused with the reason (`StateMismatchError`, a ValueError); an unknown run, model,
alias or artifact raises `UnknownStateError`.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from pathlib import Path

from rwkv_ray.serve.schemas import MLFLOW_STATE_PATTERN
from rwkv_ray.serve.states import UnknownStateError

STATE_FILE = "state.npz"
DEFAULT_PATH = "export/state.npz"
_URI = re.compile(MLFLOW_STATE_PATTERN)


def is_mlflow_name(name: str) -> bool:
    return bool(_URI.fullmatch(name))


class MlflowStates:
    """States named by MLflow URIs, for one model.

    Args:
        model: the served model (states are checked against it).
        tracking_uri: the MLflow tracking (and registry) URI; None = the training job's
            default (`rwkv_ray.train.tracking.tracking_uri`: env MLFLOW_TRACKING_URI, else
            mlflow.db in the working directory).
        cache_dir: where artifacts are downloaded (None = a fresh temporary directory).
        alias_ttl_s: how long a resolved `models:/<name>@<alias>` is reused.
    """

    def __init__(self, model, tracking_uri=None, cache_dir=None, alias_ttl_s: float = 30.0):
        from rwkv_ray.train.tracking import tracking_uri as default_uri

        self.model = model
        self.tracking_uri = default_uri(tracking_uri)
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="rwkv_ray_states_")
        self.cache_dir = Path(cache_dir)
        self.alias_ttl_s = float(alias_ttl_s)
        self._states: dict[str, object] = {}
        self._aliases: dict[tuple[str, str], tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        """The `GenerationState` an MLflow URI names (see the module docstring)."""
        from mlflow.exceptions import MlflowException

        from rwkv_ray.generation import load_state

        uri = name.removeprefix("mlflow:")
        if not is_mlflow_name(name) or any(p in (".", "..") for p in uri.split("/")[1:]):
            raise ValueError(f"invalid MLflow state {name!r}: see GET /v1/states for the forms")
        with self._lock:
            try:
                key, download = self._resolve(uri)
                if key not in self._states:
                    path = download(self.cache_dir / key)
                    self._states[key] = load_state(path, self.model)
            except (MlflowException, OSError) as err:
                raise UnknownStateError(f"MLflow state {name!r}: {err}") from None
            return self._states[key]

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)

    def _resolve(self, uri: str):
        """(cache key, a function downloading the state file into a folder -> its path)."""
        from mlflow.artifacts import download_artifacts

        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/") :].partition("/")
            path = path or DEFAULT_PATH
            if not path.endswith(".npz"):
                path = f"{path.rstrip('/')}/{STATE_FILE}"
            key = f"runs/{run_id}/{path}"
            if key not in self._states:  # a state loaded once needs no server round trip
                self._client().get_run(run_id)  # an unknown run fails here, clearly

            def download(folder: Path) -> str:
                return download_artifacts(
                    run_id=run_id,
                    artifact_path=path,
                    dst_path=str(folder),
                    tracking_uri=self.tracking_uri,
                )

            return key, download
        spec = uri[len("models:/") :]
        if "@" not in spec and f"models/{spec}" in self._states:  # a numbered version
            return f"models/{spec}", None
        version = self._model_version(spec)

        def download(folder: Path) -> str:
            # The source is often runs:/<id>/export: resolved by this tracking server too.
            source = f"{version.source.rstrip('/')}/{STATE_FILE}"
            return download_artifacts(
                artifact_uri=source, dst_path=str(folder), tracking_uri=self.tracking_uri
            )

        return f"models/{version.name}/{version.version}", download

    def _model_version(self, spec: str):
        client = self._client()
        if "@" not in spec:
            name, _, number = spec.partition("/")
            return client.get_model_version(name, number)
        name, alias = spec.split("@", 1)
        now = time.monotonic()
        cached = self._aliases.get((name, alias))
        if cached is not None and now - cached[0] < self.alias_ttl_s:
            return cached[1]
        version = client.get_model_version_by_alias(name, alias)
        self._aliases[(name, alias)] = (now, version)
        return version
