"""Fine-tuning job settings: frozen dataclasses, loaded from YAML with `--set` overrides.

    config = load_job_config("jobs/configs/state/tiny.yaml", ["optimizer.lr=0.01"])
    payload = config.to_dict()          # plain dict: what crosses the Ray boundary
    same = JobConfig.from_dict(payload)

Every section rejects unknown keys by their dotted name (`optimizer.lrr`), and every value
is checked where it is read, so a bad job fails on the driver before Ray starts anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from rwkv_ray.models.rwkv6_config import RWKV6Config
from rwkv_ray.ops.wkv import WKV_IMPLS

MODES = ("full", "state", "state+shift")
DTYPES = ("float32", "bfloat16")
REMAT_MODES = (False, True, "block", "dots")


class JobConfigError(ValueError):
    """A job setting is invalid; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str | None = None  # converted model dir or official .pth; None = from scratch
    config: dict | None = None  # RWKV6Config fields for a from-scratch model (official init)
    dtype: str = "float32"  # bfloat16: bf16 compute; fp32 master weights where they train
    # Full tuning at dtype bfloat16: "float32" keeps float32 master weights (and AdamW
    # moments); "bfloat16" stores the weights and moments in bf16 as fla's and torch's bf16
    # models train: half the memory of the training state (1.6B: ~13 GB instead of ~26 GB),
    # room for fewer recomputed blocks, but updates below bf16's resolution are lost.
    master_weights: str = "float32"
    wkv_impl: str | None = None  # None = the op's auto choice
    # Recompute in the backward pass instead of keeping activations: false = keep all;
    # true or "block" = keep each block's input only, recompute the block (least memory);
    # "dots" = keep every matmul's output, recompute the elementwise work and the WKV op.
    remat: bool | str = False
    # With remat true / "block": how many blocks to recompute, the first ones (None = all).
    # Every block keeps the same activations, so recomputing only as many as the memory
    # needs spends the least extra compute (BENCHMARKS.md, full tuning at 1.6B).
    remat_blocks: int | None = None
    init_seed: int = 0  # seed of the from-scratch init (the same on every worker)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train: str = ""  # dataset uri (directory of shards + manifest, or s3://...)
    eval: str | None = None  # held-out dataset uri for evaluate.py
    batch_size_per_stream: int = 4
    num_streams: int | None = None  # None = one stream per worker; a multiple of num_workers
    seed: int = 0  # shuffle seed; the order is fixed by (seed, epoch)
    cache_dir: str | None = None  # where s3:// shards are cached


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.0  # AdamW decay, on weight matrices only (as RWKV-LM)
    beta_1: float = 0.9
    beta_2: float = 0.99  # RWKV-LM's default
    epsilon: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm clipping; None = off
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    epochs: int = 1  # ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps (across epochs); None = epochs * per epoch
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1  # cosine decays to lr * this


@dataclasses.dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 1  # all GPUs of a node in one worker (JaxTrainer rewrites CVD)
    # Share of each GPU's memory JAX may take (XLA_PYTHON_CLIENT_MEM_FRACTION in the workers).
    # JAX's own default, 0.75, left the 1.6B full-tuning step without room for its
    # activations on an 80 GB card (a 47.9 GiB buffer did not fit beside the weights).
    gpu_memory_fraction: float = 0.95
    # JAX's persistent compilation cache on each worker's node ("~" = the worker's home):
    # a restarted worker or a resubmitted job reuses the compiled step instead of compiling
    # again (the 1.6B step takes about 95 s to compile on an H100 host). None = off.
    compilation_cache_dir: str | None = "~/.cache/rwkv_ray/jax"
    # Full tuning over several GPUs of one worker: AdamW's moments split over them (ZeRO
    # stage 1), each GPU keeping and updating 1/N; the same numbers, less memory per GPU.
    shard_optimizer: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    storage_path: str = "runs"  # local dir (relative: to the working dir) or s3://bucket/prefix
    every_steps: int = 100
    keep: int = 2  # checkpoints kept by Ray
    max_failures: int = 0  # worker-group restarts from the last checkpoint


@dataclasses.dataclass(frozen=True)
class MlflowSettings:
    enabled: bool = True
    tracking_uri: str | None = None  # None: env MLFLOW_TRACKING_URI, else ./mlflow.db (sqlite)
    experiment: str = "rwkv_ray"
    registered_model: str | None = None  # None = the job name; "" = do not register
    alias: str = "candidate"  # MLflow reserves "latest"


@dataclasses.dataclass(frozen=True)
class DebugSettings:
    fail_at_step: int | None = None  # tests: raise once on rank `fail_rank` after this step
    fail_rank: int = 0
    fail_mode: str = "raise"  # raise: a Python exception; exit: the worker process dies
    progress: bool = True  # tqdm bar on rank 0


@dataclasses.dataclass(frozen=True)
class JobConfig:
    name: str = "rwkv6-finetune"  # Ray run name (resubmit the same name to resume)
    mode: str = "full"  # full | state | state+shift
    s3_endpoint_url: str | None = None  # S3-compatible server for every s3:// uri of the job
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    optimizer: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = dataclasses.field(default_factory=ScheduleSettings)
    scaling: ScalingSettings = dataclasses.field(default_factory=ScalingSettings)
    checkpointing: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    mlflow: MlflowSettings = dataclasses.field(default_factory=MlflowSettings)
    debug: DebugSettings = dataclasses.field(default_factory=DebugSettings)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_streams(self) -> int:
        return self.data.num_streams or self.scaling.num_workers

    def streams_of(self, rank: int) -> list[int]:
        """The data streams worker `rank` reads."""
        return list(range(rank, self.num_streams, self.scaling.num_workers))

    @property
    def registered_model_name(self) -> str:
        """The MLflow registered model the result goes to ("": not registered)."""
        return self.name if self.mlflow.registered_model is None else self.mlflow.registered_model

    def model_config(self) -> RWKV6Config | None:
        return None if self.model.config is None else RWKV6Config.from_dict(self.model.config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> JobConfig:
        return _build(cls, values, "")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise JobConfigError(f"{key}: {message}")


def validate(c: JobConfig) -> None:
    _check(c.mode in MODES, "mode", f"must be one of {MODES}, got {c.mode!r}")
    _check(bool(c.name), "name", "must not be empty")
    m = c.model
    _check(
        (m.path is None) != (m.config is None),
        "model",
        "set exactly one of model.path (a checkpoint) and model.config (from scratch)",
    )
    if m.config is not None:
        try:
            RWKV6Config.from_dict(m.config)
        except ValueError as e:
            raise JobConfigError(f"model.config: {e}") from e
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    _check(
        m.wkv_impl is None or str(m.wkv_impl).strip().lower() in WKV_IMPLS,
        "model.wkv_impl",
        f"must be one of {WKV_IMPLS} or null (RWKV_WKV_IMPL, else auto), got {m.wkv_impl!r}",
    )
    _check(0 <= m.init_seed < 2**32, "model.init_seed", f"must be in [0, 2**32), got {m.init_seed}")
    _check(m.remat in REMAT_MODES, "model.remat", f"must be one of {REMAT_MODES}, got {m.remat!r}")
    if m.remat_blocks is not None:
        _check(
            m.remat_blocks >= 1,
            "model.remat_blocks",
            f"must be an integer >= 1 or null, got {m.remat_blocks!r}",
        )
        _check(
            m.remat in (True, "block"),
            "model.remat_blocks",
            f"counts recomputed blocks: needs model.remat true or 'block', got {m.remat!r}",
        )
    _check(
        m.master_weights in DTYPES,
        "model.master_weights",
        f"must be one of {DTYPES}, got {m.master_weights!r}",
    )
    _check(
        m.master_weights == "float32" or m.dtype == "bfloat16",
        "model.master_weights",
        "bfloat16 master weights need model.dtype bfloat16",
    )
    d = c.data
    _check(d.batch_size_per_stream >= 1, "data.batch_size_per_stream", "must be >= 1")
    _check(
        d.num_streams is None or d.num_streams >= 1,
        "data.num_streams",
        f"must be >= 1 or null (one stream per worker), got {d.num_streams}",
    )
    _check(d.seed >= 0, "data.seed", f"must be >= 0, got {d.seed}")
    cache = c.scaling.compilation_cache_dir
    _check(
        cache is None or (isinstance(cache, str) and cache.strip() != ""),
        "scaling.compilation_cache_dir",
        f"must be a directory path or null (off), got {cache!r}",
    )
    fraction = c.scaling.gpu_memory_fraction
    _check(0 < fraction <= 1, "scaling.gpu_memory_fraction", f"must be in (0, 1], got {fraction}")
    workers = c.scaling.num_workers
    _check(workers >= 1, "scaling.num_workers", "must be >= 1")
    cpus, gpus = c.scaling.cpus_per_worker, c.scaling.gpus_per_worker
    _check(0 < cpus < math.inf, "scaling.cpus_per_worker", f"must be > 0, got {cpus}")
    _check(gpus >= 1, "scaling.gpus_per_worker", f"must be >= 1, got {gpus}")
    _check(
        not (c.scaling.shard_optimizer and workers > 1),
        "scaling.shard_optimizer",
        f"splits the optimizer over the GPUs of one worker; num_workers is {workers}: put the "
        "GPUs in one worker (scaling.gpus_per_worker) or turn it off",
    )
    _check(
        c.num_streams % workers == 0,
        "data.num_streams",
        f"must be a multiple of scaling.num_workers ({workers}), got {c.num_streams}",
    )
    if c.scaling.use_gpu:  # each worker splits its rows over its GPUs
        rows = c.num_streams // workers * d.batch_size_per_stream
        _check(
            rows % gpus == 0,
            "data.batch_size_per_stream",
            f"a worker's batch ({c.num_streams // workers} stream(s) x {d.batch_size_per_stream} "
            f"rows = {rows}) must be a multiple of scaling.gpus_per_worker ({gpus})",
        )
    o = c.optimizer
    _check(0 < o.lr < math.inf, "optimizer.lr", f"must be > 0 and finite, got {o.lr}")
    _check(0 <= o.weight_decay < math.inf, "optimizer.weight_decay", "must be >= 0, finite")
    for name in ("beta_1", "beta_2"):
        beta = getattr(o, name)
        _check(0 <= beta < 1, f"optimizer.{name}", f"must be in [0, 1), got {beta}")
    _check(0 < o.epsilon < math.inf, "optimizer.epsilon", f"must be > 0, got {o.epsilon}")
    _check(o.grad_accum >= 1, "optimizer.grad_accum", "must be >= 1")
    _check(
        o.clip_norm is None or 0 < o.clip_norm < math.inf,
        "optimizer.clip_norm",
        "must be > 0 and finite, or null",
    )
    s = c.schedule
    _check(s.epochs >= 1, "schedule.epochs", "must be >= 1")
    _check(s.max_steps is None or s.max_steps >= 1, "schedule.max_steps", "must be >= 1")
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    _check(0 <= s.final_lr_fraction <= 1, "schedule.final_lr_fraction", "must be in [0, 1]")
    _check(c.debug.fail_mode in ("raise", "exit"), "debug.fail_mode", "must be raise or exit")
    if c.mlflow.enabled:
        _check_mlflow_names(c)
    _check(c.checkpointing.every_steps >= 1, "checkpointing.every_steps", "must be >= 1")
    _check(c.checkpointing.keep >= 1, "checkpointing.keep", "must be >= 1")
    _check(c.checkpointing.max_failures >= -1, "checkpointing.max_failures", "must be >= -1")


def _check_mlflow_names(c: JobConfig) -> None:
    """MLflow's own rules for the registered model's name and alias (checked by MLflow only
    when the job registers its result, after all the training)."""
    _check(bool(c.mlflow.experiment.strip()), "mlflow.experiment", "must not be empty")
    name = c.registered_model_name
    if not name:
        return  # not registered
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    name_key = "name" if c.mlflow.registered_model is None else "mlflow.registered_model"
    for key, check, value in (
        (name_key + " (the registered model's name)", validation._validate_model_name, name),
        ("mlflow.alias", validation._validate_model_alias_name, c.mlflow.alias),
        ("mlflow.alias", validation._validate_model_alias_name_reserved, c.mlflow.alias),
    ):
        try:
            check(value)
        except MlflowException as e:
            raise JobConfigError(f"{key}: {e.message}") from e


# ---- building from dicts, YAML and overrides -----------------------------------------------
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, values: Any, prefix: str):
    where = prefix.rstrip(".") or "the job config"
    if not isinstance(values, Mapping):
        raise JobConfigError(f"{where}: must be a mapping, got {type(values).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise JobConfigError(f"unknown key(s) {keys}; known in {where}: {sorted(types_)}")
    kwargs = {}
    for name, value in values.items():
        kind = types_[name]
        if dataclasses.is_dataclass(kind):  # a section: null means its defaults
            kwargs[name] = _build(kind, {} if value is None else value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check (and gently convert: int -> float, '1e-3' -> float) a leaf value."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        _check(type(None) in options, key, "must not be null")
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, Mapping):
            return dict(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise JobConfigError(f"{key}: must be {names}, got {value!r}")


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """`key.sub=value` strings (value parsed as YAML) applied to a nested dict."""
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise JobConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise JobConfigError(f"{'.'.join(parts[: depth + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return values


def load_job_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> JobConfig:
    """YAML file (or nothing) + `key=value` overrides -> a validated `JobConfig`."""
    values: Any = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, Mapping):
            raise JobConfigError(f"{path}: the top level must be a mapping")
    return JobConfig.from_dict(apply_overrides(dict(values), overrides))
