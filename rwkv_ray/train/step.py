"""The jitted training step: Keras `stateless_call` + AdamW `stateless_apply`. No Ray here.

- Modes: `full` trains every weight; `state` trains only each layer's initial wkv state
  (shared over the batch); `state+shift` also the two initial token-shift vectors. Frozen
  variables never pass through the optimizer, so they stay bit-identical.
- Precision: `float32`, or `bfloat16` = bf16 compute. In full mode the weights the optimizer
  updates stay float32 (Keras "mixed_bfloat16": float32 master, bf16 matmuls) unless
  model.master_weights is bfloat16 (weights and AdamW moments in bf16, Keras "bfloat16");
  in state modes the frozen weights are stored in bf16 and the trained states are float32.
  The decay, bonus, GroupNorm and state variables are float32 in every case.
- Loss: next-token cross-entropy with the head applied piece by piece
  (`summed_head_loss`), so the [B, T, V] logits never exist at once.
- Optimizer: AdamW (weight decay on weight matrices only, as RWKV-LM), warmup (from 1% of
  the peak, as RWKV-LM) then cosine decay, global-norm clipping, gradient accumulation over
  micro-batches (loss = token-weighted mean over the whole global batch).
- Data parallel: one global mesh over every process's devices, batch sharded over "data",
  everything else replicated (or AdamW's moments split over one worker's devices,
  `shard_optimizer`); XLA adds the gradient all-reduce. One process or many, the
  same step computes the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rwkv_ray.models import RWKV6CausalLM
from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.loss import summed_head_loss

WARMUP_START_FRACTION = 0.01  # RWKV-LM starts warmup at 1% of the peak lr


class TrainState(NamedTuple):
    """Everything a step updates (a pytree of jax arrays)."""

    trainable: list
    non_trainable: list
    optimizer: list


class PendingStep(NamedTuple):
    """A step `TrainStep.dispatch` queued: its metrics (device scalars, not yet computed)
    and when it was dispatched (time.perf_counter())."""

    metrics: dict
    dispatched: float


# ---- model ---------------------------------------------------------------------------------
def host_device() -> jax.Device | None:
    """This process's CPU device (jax.devices would give rank 0's), or None without a CPU
    backend (JAX_PLATFORMS lacks cpu)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def move_to_host(*owners) -> None:
    """Move the variables of Keras models and optimizers into host memory. A TrainStep's
    state holds the device copy; variables left on the GPU would be a second copy (1.6B full
    tuning with float32 masters: 18 GiB of weights and AdamW moments per GPU; an H100
    measured a 43.6 GiB peak for a step whose plan needs about 26). Build first, on the
    accelerator, then move: built in host memory, the 1.6B model and its optimizer took
    142 s on a 2-core machine (the official init's orthogonal matrices are QRs)."""
    host = host_device()
    if host is None:
        return
    for owner in owners:
        for variable in owner.variables:
            variable.assign(jax.device_put(variable.value, host))


def use_compilation_cache(path: str | None) -> None:
    """Keep this process's compiled executables in `path` (JAX's persistent compilation cache,
    keyed by the program, the compiler and the device; "~" is this machine's home), so that a
    restarted worker or a resubmitted job loads the compiled step instead of compiling it
    again. JAX caches compilations of 1 s or more. None: leave JAX's own setting."""
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def dtype_policy(config: JobConfig) -> str:
    if config.model.dtype == "float32":
        return "float32"
    if config.mode == "full" and config.model.master_weights == "float32":
        return "mixed_bfloat16"
    return "bfloat16"


def build_model(config: JobConfig) -> RWKV6CausalLM:
    """The model the job tunes (loaded or from the official init), with the mode applied."""
    from rwkv_ray.convert import load_model

    policy, impl = dtype_policy(config), config.model.wkv_impl
    num_layers = config.model_config().num_layers if config.model.config is not None else None
    scope = _remat_scope(config, num_layers)
    with scope:
        if config.model.path is not None:
            model = load_model(config.model.path, dtype=policy, wkv_impl=impl)
        else:
            keras.utils.set_random_seed(config.model.init_seed)
            model = RWKV6CausalLM.from_model_config(
                config.model_config(), wkv_impl=impl, dtype=policy
            )
    set_mode(model, config.mode)
    return model


def _remat_scope(config: JobConfig, num_layers: int | None):
    if config.model.remat not in (True, "block"):  # "dots" is applied by the step
        return contextlib.nullcontext()
    # Block names are block_0..block_{L-1}; a loaded model's L is not known yet, so name
    # generously (names that match no layer are ignored). With remat_blocks only the first
    # ones: which blocks does not change the memory, only how many.
    count = config.model.remat_blocks or num_layers or 256
    return keras.RematScope(mode="list_of_layers", layer_names=[f"block_{i}" for i in range(count)])


def state_variables(model: RWKV6CausalLM, with_shift: bool) -> list:
    out = []
    for block in model.backbone.blocks:
        out.append(block.time_mix.initial_wkv)
        if with_shift:
            out += [block.time_mix.initial_shift, block.channel_mix.initial_shift]
    return out


def set_mode(model: RWKV6CausalLM, mode: str) -> None:
    """Flip trainable flags: everything (full) or only the initial states."""
    model.trainable = True
    if mode == "full":
        for v in model.weights:
            v.trainable = True
        for v in state_variables(model, with_shift=True):
            v.trainable = False
        return
    for v in model.weights:
        v.trainable = False
    for v in state_variables(model, with_shift=mode == "state+shift"):
        v.trainable = True


# ---- optimizer -----------------------------------------------------------------------------
def learning_rate_schedule(config: JobConfig, total_steps: int):
    s, lr = config.schedule, config.optimizer.lr
    warmup = min(s.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=s.final_lr_fraction)
    return keras.optimizers.schedules.CosineDecay(
        lr * WARMUP_START_FRACTION,
        decay_steps,
        alpha=s.final_lr_fraction,
        warmup_target=lr,
        warmup_steps=warmup,
    )


def is_weight_matrix(variable) -> bool:
    """Dense kernels and the embedding: the only variables RWKV-LM decays."""
    return variable.path.endswith(("kernel", "embeddings"))


def build_optimizer(config: JobConfig, model: RWKV6CausalLM, total_steps: int):
    o = config.optimizer
    schedule = learning_rate_schedule(config, total_steps)
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=o.weight_decay,
        beta_1=o.beta_1,
        beta_2=o.beta_2,
        epsilon=o.epsilon,
    )
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if not is_weight_matrix(v)]
    )
    optimizer.build(model.trainable_variables)
    optimizer.schedule = schedule  # the step reports the lr it used
    return optimizer


# ---- the step ------------------------------------------------------------------------------
def global_norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def make_step_fn(
    model: RWKV6CausalLM,
    optimizer,
    clip_norm: float | None,
    remat: bool | str = False,
    row_groups: int = 1,
) -> Callable:
    """(state, tokens [A,B,T], loss_mask [A,B,T]) -> (state, metrics); A = micro-batches.
    `row_groups`: the data-parallel device count (see summed_head_loss)."""

    grad_of = jax.value_and_grad(summed_loss_fn(model, remat, row_groups), has_aux=True)

    def step(state: TrainState, tokens, loss_mask):
        def micro(carry, batch):
            grads_sum, loss_sum, count_sum = carry
            (total, count), grads = grad_of(state.trainable, state.non_trainable, *batch)
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + total, count_sum + count), None

        zeros = jax.tree_util.tree_map(lambda v: jnp.zeros(v.shape, jnp.float32), state.trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0))
        (grads, loss_sum, count), _ = jax.lax.scan(micro, init, (tokens, loss_mask))
        denominator = jnp.maximum(count, 1.0)
        grads = [g / denominator for g in grads]
        norm = global_norm(grads)
        if clip_norm is not None:
            scale = jnp.minimum(1.0, clip_norm / (norm + 1e-6))
            grads = [g * scale for g in grads]
        grads = [g.astype(v.dtype) for g, v in zip(grads, state.trainable, strict=True)]
        lr = optimizer.schedule(state.optimizer[0])  # variables[0] is the step counter
        trainable, opt_vars = optimizer.stateless_apply(state.optimizer, grads, state.trainable)
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": norm,
            "lr": lr,
            "tokens": count,  # counted target tokens of the global batch
            "data_checksum": jnp.sum(tokens),  # which data the step saw (resume tests)
        }
        return TrainState(trainable, state.non_trainable, opt_vars), metrics

    return step


def summed_loss_fn(
    model: RWKV6CausalLM, remat: bool | str = False, row_groups: int = 1
) -> Callable:
    """(trainable, non_trainable, tokens, loss_mask) -> (summed loss, counted tokens): the
    model run statelessly and its head applied piece by piece (`summed_head_loss`).

    remat="dots" runs the model under jax.checkpoint with a policy that keeps the outputs of
    the matmuls (their weights have no batch dimension) and recomputes everything else in
    the backward pass. Other values: the model is used as built (`build_model` applies
    per-block remat through Keras). `row_groups`: the data-parallel device count, so that
    the head's gradient is reduced over the devices once, not after every piece
    (`summed_head_loss`)."""
    which, index = _variable_index(model, model.head.kernel)

    def hidden_of(trainable, non_trainable, tokens):
        (hidden, _), _ = model.stateless_call(trainable, non_trainable, tokens, return_hidden=True)
        return hidden

    if remat == "dots":
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        hidden_of = jax.checkpoint(hidden_of, policy=policy)

    def loss_of(trainable, non_trainable, tokens, loss_mask):
        hidden = hidden_of(trainable, non_trainable, tokens)
        kernel = (trainable, non_trainable)[which][index]
        return summed_head_loss(hidden, kernel, tokens, loss_mask, row_groups=row_groups)

    return loss_of


def _variable_index(model: RWKV6CausalLM, variable) -> tuple[int, int]:
    """(0, i) if `variable` is model.trainable_variables[i], (1, i) if non-trainable."""
    for which, variables in enumerate((model.trainable_variables, model.non_trainable_variables)):
        for i, candidate in enumerate(variables):
            if candidate is variable:
                return which, i
    raise ValueError(f"{variable.path} is not a variable of the model")


def optimizer_shardings(optimizer, mesh: Mesh, split: bool) -> list[NamedSharding]:
    """Each optimizer variable's sharding on the data-parallel mesh: replicated, or with
    `split` (ZeRO stage 1) AdamW's moments cut over the devices along their first axis where
    it divides evenly, so each device keeps and updates 1/N of them; XLA then reduces the
    gradients to each device's part only and gathers the updated weights. Small variables
    (the step counter, the lr, vectors shorter than 2**14) stay replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec("data"))
    devices = mesh.devices.size

    def sharding(variable):
        shape = tuple(variable.shape)
        big = bool(shape) and np.prod(shape) >= 2**14 and shape[0] % devices == 0
        return rows if split and devices > 1 and big else replicated

    return [sharding(v) for v in optimizer.variables]


class StepMemoryError(MemoryError):
    """XLA's plan for the compiled step needs more device memory than JAX may use."""


def check_fits(memory, limit_bytes: int | None) -> None:
    """Raise StepMemoryError, naming the settings that lower it, when a compiled step's
    memory plan (`Compiled.memory_analysis()`) exceeds limit_bytes per device. The state is
    donated, so the outputs written over it (alias) need no room of their own. No limit
    (a backend that reports none, such as the CPU) or no plan: nothing to check."""
    if memory is None or limit_bytes is None:
        return
    gib = lambda n: n / 2**30  # noqa: E731
    state = memory.argument_size_in_bytes
    scratch = memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    if state + scratch <= limit_bytes:
        return
    raise StepMemoryError(
        f"the compiled training step needs {gib(state + scratch):.1f} GiB per device "
        f"({gib(state):.1f} GiB of weights, optimizer state and batch, {gib(scratch):.1f} GiB "
        f"of scratch in XLA's plan), more than the {gib(limit_bytes):.1f} GiB JAX may use. "
        "Lower it with model.remat: true (model.remat_blocks: N recomputes only the first N "
        "blocks), a smaller data.batch_size_per_stream with optimizer.grad_accum for the same "
        "batch, or model.master_weights: bfloat16; or raise scaling.gpu_memory_fraction."
    )


def device_memory_limit() -> int | None:
    """Bytes JAX may allocate on this process's first device, or None where the backend
    does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return (stats or {}).get("bytes_limit")


class TrainStep:
    """The compiled step on a global data-parallel mesh (1 process or many). `remat` is the
    job's model.remat: the step applies "dots" itself (per-block remat is built into the
    model by `build_model`, as Keras offers it only per layer). Each batch shape is compiled
    ahead of its first step and its memory plan checked against `memory_limit` bytes per
    device (None: the device's own limit; unchecked on CPU), so a step that cannot fit fails
    at once with the settings to change (StepMemoryError) instead of an allocator error.
    `shard_optimizer=True` splits AdamW's moments over the devices (ZeRO stage 1,
    `optimizer_shardings`; one process only): the same numbers, 1/N of their memory each.

    Move the model and optimizer to host memory once built: the state is the device copy.

    Example:
        model = build_model(config)
        optimizer = build_optimizer(config, model, total_steps)
        move_to_host(model, optimizer)
        train = TrainStep(model, optimizer, clip_norm=1.0)
        state = train.initial_state()
        state, metrics = train(state, tokens, loss_mask)    # local shard of [A,B,T] each
        state, step = train.dispatch(state, tokens, loss_mask)  # or: queue it, and then
        metrics = train.finish(step)                          # wait for it (in order)
        train.write_back(state)                              # values -> keras variables
    """

    def __init__(
        self,
        model: RWKV6CausalLM,
        optimizer,
        clip_norm: float | None,
        remat: bool | str = False,
        memory_limit: int | None = None,
        shard_optimizer: bool = False,
    ):
        self.model, self.optimizer = model, optimizer
        self.memory_limit = memory_limit
        self._executables: dict[tuple, Callable] = {}  # batch shapes -> compiled step
        self._last_finished = 0.0  # perf_counter() when `finish` last saw a step end
        if optimizer.variables[0].path.split("/")[-1] != "iteration":
            raise RuntimeError(f"unexpected first optimizer variable {optimizer.variables[0]}")
        self.mesh = Mesh(np.array(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data = NamedSharding(self.mesh, PartitionSpec(None, "data"))
        if shard_optimizer and jax.process_count() > 1:
            # Every process would hold only its devices' parts, and checkpoints are written
            # by rank 0 alone: split over the GPUs of one worker only.
            raise ValueError(
                "shard_optimizer splits AdamW's moments over the GPUs of one worker; this job "
                f"has {jax.process_count()} workers: use scaling.num_workers: 1 with all GPUs "
                "in it (scaling.gpus_per_worker), or shard_optimizer: false"
            )
        self.optimizer_shardings = optimizer_shardings(optimizer, self.mesh, shard_optimizer)
        state = TrainState(self.replicated, self.replicated, self.optimizer_shardings)
        self._step = jax.jit(
            make_step_fn(model, optimizer, clip_norm, remat, row_groups=self.mesh.size),
            in_shardings=(state, self.data, self.data),
            out_shardings=(state, self.replicated),
            donate_argnums=(0,),
        )

    def initial_state(self) -> TrainState:
        return TrainState(
            [self.replicate(v.value) for v in self.model.trainable_variables],
            [self.replicate(v.value) for v in self.model.non_trainable_variables],
            [
                self.replicate(v.value, sharding)
                for v, sharding in zip(
                    self.optimizer.variables, self.optimizer_shardings, strict=True
                )
            ],
        )

    def replicate(self, value, sharding: NamedSharding | None = None) -> jax.Array:
        """A host value on every device (or cut as `sharding` says: each device its part)."""
        value = np.asarray(value)
        sharding = sharding or self.replicated
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    def shard_batch(self, local) -> jax.Array:
        """This process's rows [A,b,T] -> the global [A,B,T] array."""
        local = np.asarray(local)
        devices = jax.local_device_count()
        if local.shape[1] % devices:
            raise ValueError(
                f"each worker's batch ({local.shape[1]} rows) must be a multiple of its "
                f"{devices} devices: change data.batch_size_per_stream"
            )
        return jax.make_array_from_process_local_data(self.data, local)

    def __call__(self, state: TrainState, tokens, loss_mask):
        """One step, waited for: (new state, its metrics as floats)."""
        state, step = self.dispatch(state, tokens, loss_mask)
        return state, self.finish(step)

    def dispatch(self, state: TrainState, tokens, loss_mask) -> tuple[TrainState, PendingStep]:
        """Queue one step on the devices and return at once: (new state, the step in
        flight). Dispatch the next step before `finish`ing this one, and the host's work
        between steps (this call, the next batch, logging) runs while the devices compute."""
        started = time.perf_counter()
        # The context mesh lets the WKV kernel split the batch per device (a Pallas call is
        # not partitioned by XLA; see rwkv_ray/ops/wkv_kernel.py `per_device_rows`).
        tokens, loss_mask = self.shard_batch(tokens), self.shard_batch(loss_mask)
        with jax.set_mesh(self.mesh):
            compiling = time.perf_counter()
            step = self.compiled(state, tokens, loss_mask)
            started += time.perf_counter() - compiling  # a first call's compiling is no step
            state, metrics = step(state, tokens, loss_mask)
        return state, PendingStep(metrics, started)

    def finish(self, step: PendingStep) -> dict[str, float]:
        """Wait for a dispatched step: its metrics as floats, with `step_time`, the seconds
        from its dispatch, or from the end of the step before it when that was later (the
        devices run one step at a time), to its end. Finish steps in dispatch order."""
        metrics = {k: float(to_numpy(v)) for k, v in step.metrics.items()}
        done = time.perf_counter()
        metrics["step_time"] = done - max(step.dispatched, self._last_finished)
        self._last_finished = done
        return metrics

    def compiled(self, state: TrainState, tokens: jax.Array, loss_mask: jax.Array) -> Callable:
        """The step compiled for these (global, sharded) batch shapes, its memory plan
        checked the first time (call under the step's mesh)."""
        key = (tokens.shape, loss_mask.shape)
        if key not in self._executables:
            compiled = self._step.lower(state, tokens, loss_mask).compile()
            check_fits(compiled.memory_analysis(), self.memory_limit or device_memory_limit())
            self._executables[key] = compiled
        return self._executables[key]

    def write_back(self, state: TrainState) -> None:
        """Copy a state's values into the keras model and optimizer variables."""
        pairs = (
            (self.model.trainable_variables, state.trainable),
            (self.model.non_trainable_variables, state.non_trainable),
            (self.optimizer.variables, state.optimizer),
        )
        host = host_device()  # where move_to_host put them: no second device copy
        for variables, values in pairs:
            for variable, value in zip(variables, values, strict=True):
                variable.assign(jax.device_put(to_numpy(value), host))


def to_numpy(value) -> np.ndarray:
    """A jax array -> numpy: a replicated (maybe multi-process) one from this process's copy;
    one split over this process's devices (shard_optimizer) assembled from its parts."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return np.asarray(value)
