"""Settings of the data preparation job: a frozen dataclass that rejects unknown keys.

cfg = PrepareConfig.from_dict({"inputs": ["data/demo_corpus.jsonl"], "output": "out"})
cfg = PrepareConfig.from_yaml("prepare.yaml")
payload = cfg.to_dict()  # plain dict: what crosses the Ray boundary
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

FORMATS = ("auto", "jsonl", "text", "parquet")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".parquet": "parquet"}


class PrepareConfigError(ValueError):
    """A prepare setting is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]  # files or directories, local or s3://
    output: str  # dataset directory (local or s3://): shards + manifest.json
    seq_len: int = 512  # every example is truncated (keeping its beginning) / left-padded
    num_shards: int = 8  # >= the number of training workers (streams) that will read it
    format: str = "auto"  # auto (from the file suffix) | jsonl | text | parquet
    text_field: str = "text"  # jsonl / parquet column of plain text (loss on every token)
    prompt_field: str = "prompt"  # with response_field: loss only on the response tokens
    response_field: str = "response"
    vocab_path: str | None = None  # None = the World vocab shipped in rwkv_ray/assets
    rows_per_task: int = 2048  # input rows tokenized per Ray task
    overwrite: bool = False  # replace an existing dataset at `output`
    s3_endpoint_url: str | None = None  # e.g. a local S3 server; else env AWS_ENDPOINT_URL
    progress: bool = True  # Ray Data progress bars

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str | os.PathLike):
            object.__setattr__(self, "inputs", (str(self.inputs),))
        else:
            paths = isinstance(self.inputs, list | tuple) and all(
                isinstance(p, str | os.PathLike) for p in self.inputs
            )
            _check(paths, "inputs", f"must be a path or a list of paths, got {self.inputs!r}")
            object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        _check(len(self.inputs) > 0, "inputs", "give at least one input file or directory")
        _check(isinstance(self.output, str | os.PathLike), "output", "must be a path")
        _check(bool(str(self.output)), "output", "give an output directory")
        object.__setattr__(self, "output", str(self.output))
        for key in ("vocab_path", "s3_endpoint_url"):
            value = getattr(self, key)
            _check(value is None or isinstance(value, str), key, f"must be a string, got {value!r}")
        # Booleans only: a quoted "false" is truthy, and `overwrite` deletes a dataset.
        for key in ("overwrite", "progress"):
            value = getattr(self, key)
            _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        for key in ("seq_len", "num_shards", "rows_per_task"):
            value = getattr(self, key)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            _check(ok, key, f"must be an int >= 1, got {value!r}")
        _check(self.format in FORMATS, "format", f"must be one of {FORMATS}, got {self.format!r}")
        for key in ("text_field", "prompt_field", "response_field"):
            _check(isinstance(getattr(self, key), str) and getattr(self, key), key, "empty")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["inputs"] = list(self.inputs)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PrepareConfig:
        if not isinstance(values, Mapping):
            raise PrepareConfigError(f"settings must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PrepareConfigError(
                f"unknown prepare setting(s) {unknown}; known settings: {sorted(known)}"
            )
        # Named as on the command line and in a YAML file: the same keys come from either.
        required = {"inputs": "input paths (inputs)", "output": "--out (output)"}
        missing = [name for key, name in required.items() if key not in values]
        if missing:
            raise PrepareConfigError(f"missing required setting(s): {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> PrepareConfig:
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, Mapping):
            raise PrepareConfigError(f"{path}: expected a mapping of settings")
        return cls.from_dict({**values, **overrides})

    def input_format(self, path: str) -> str:
        """The format of one input file (``format``, or from its suffix when ``auto``)."""
        if self.format != "auto":
            return self.format
        for suffix, fmt in SUFFIX_FORMATS.items():
            if path.endswith(suffix):
                return fmt
        raise PrepareConfigError(
            f"cannot tell the format of {path!r} from its suffix "
            f"(known: {sorted(SUFFIX_FORMATS)}); set format to one of {FORMATS[1:]}"
        )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise PrepareConfigError(f"{key}: {message}")
