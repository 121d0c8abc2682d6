"""The tuned-state registry: named state files in one directory.

A state named `NAME` is the file `<states_dir>/NAME.npz` written by
`rwkv_ray.generation.save_state`. Names are checked against `NAME_PATTERN` (no '/', no
'..', no leading '.'), so a request can never reach outside the directory. Loaded states
are cached; a file that does not fit the model is refused with its reason. A name that is
an MLflow URI (`runs:/...`, `models:/...`) is fetched from MLflow instead
(`rwkv_ray.serve.mlflow_states`).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from rwkv_ray.serve.schemas import NAME_PATTERN

SUFFIX = ".npz"
_NAME = re.compile(NAME_PATTERN)


class UnknownStateError(KeyError):
    """No state of that name in the registry."""


def check_name(name: str, what: str = "state") -> str:
    """Return `name` if it is a valid state (or session) name, else raise ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '-', '.' (no paths)"
        )
    return name


class StateRegistry:
    """Named states from `directory` (None: no states), loaded for `model` on first use;
    MLflow URIs go to `mlflow` (an `MlflowStates`; None: refused)."""

    def __init__(self, directory: str | os.PathLike | None, model=None, mlflow=None):
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None and not self.directory.is_dir():
            raise FileNotFoundError(f"states directory {self.directory} does not exist")
        self._model, self.mlflow = model, mlflow
        self._cache: dict[str, object] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if self.directory is None:
            return []
        found = (p.name[: -len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}"))
        return sorted(n for n in found if _NAME.fullmatch(n) and ".." not in n)

    def path(self, name: str) -> Path:
        check_name(name)
        if self.directory is None:
            raise UnknownStateError(f"unknown state {name!r}: the server has no states directory")
        path = self.directory / f"{name}{SUFFIX}"
        if not path.is_file():
            raise UnknownStateError(f"unknown state {name!r}; GET /v1/states lists them")
        return path

    def get(self, name: str):
        """The `GenerationState` named `name` (ValueError, UnknownStateError, or a
        StateMismatchError if the file was saved for another model)."""
        from rwkv_ray.generation import load_state
        from rwkv_ray.serve.mlflow_states import is_mlflow_name

        if is_mlflow_name(name):
            if self.mlflow is None:
                raise UnknownStateError(f"state {name!r}: this server has no MLflow source")
            return self.mlflow.get(name)
        path = self.path(name)
        with self._lock:
            stamp = path.stat().st_mtime_ns
            cached = self._cache.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            state = load_state(path, self._model)
            self._cache[name] = (stamp, state)
            return state

    def describe(self) -> list[dict]:
        from rwkv_ray.generation.state_io import read_state_metadata

        out = []
        for name in self.names():
            try:
                meta = read_state_metadata(self.directory / f"{name}{SUFFIX}")
            except (ValueError, OSError) as err:
                out.append({"name": name, "error": str(err)})
                continue
            out.append(
                {"name": name, "created": meta.get("created"), "has_logits": meta["has_logits"]}
            )
        return out
