"""A small optax training loop shared by distillation and quantization-aware training.

`fit(loss_fn, params, batch_fn, config)` runs AdamW with linear warm-up and
cosine decay and global-norm clipping; the train step is jitted. Pruning masks
stay enforced after every update. Data order and randomness are functions of
the step number (`batch_fn(step)`, `fold_in(key, step)`), so a run resumed
from its last checkpoint ends with exactly the params of an uninterrupted run.

Precision regimes (`TrainConfig.precision`):

- "fp32": FP32 weights, gradients and Adam moments (16 B per trained
  parameter before activations).
- "mixed_bf16": FP32 master weights and Adam moments; each step casts the
  floating-point params to BF16, differentiates the loss at the BF16 copy (BF16
  gradients) and applies the update, upcast, to the FP32 masters (16 B per
  parameter: 4 master + 2 copy + 2 gradient + 8 moments; Micikevicius et al.,
  2018). Activations follow the model's compute dtype.
- "bf16": everything in BF16: weights, gradients and both Adam moments (8 B
  per parameter). The result is BF16. Caveat: without stochastic rounding,
  an update smaller than half a BF16 ulp of its weight (2^-9 relative) is lost.

`step_memory(...)` compiles the same train step and returns XLA's buffer
assignment for it (arguments, outputs, temporaries): what one step allocates.

References:
  Micikevicius et al., "Mixed Precision Training", ICLR 2018.
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (the 16 B/parameter accounting of mixed-precision Adam).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quantjax.io import checkpoint as checkpoint_lib
from quantjax.sparsity.magnitude import apply_masks

__all__ = ["PRECISIONS", "TrainConfig", "TrainState", "make_optimizer", "make_schedule", "fit",
           "cast_floating", "step_memory"]

PRECISIONS = ("fp32", "mixed_bf16", "bf16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Optimisation settings.

  Attributes:
    steps: number of optimizer steps.
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0 to the peak.
    end_lr_ratio: the cosine decays to `learning_rate * end_lr_ratio`.
    weight_decay: AdamW decoupled weight decay.
    clip_norm: global-norm gradient clipping (None: off).
    seed: base of the per-step PRNG keys.
    checkpoint_every: save the train state every N steps (0: only at the end).
    precision: "fp32", "mixed_bf16" or "bf16" (see the module docstring).
  """

  steps: int = 100
  learning_rate: float = 1e-4
  warmup_steps: int = 10
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  seed: int = 0
  checkpoint_every: int = 0
  precision: str = "fp32"

  def __post_init__(self):
    if self.precision not in PRECISIONS:
      raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")


class TrainState(NamedTuple):
  step: int
  params: Any
  opt_state: Any
  seconds: float = 0.0  # training wall time up to `step`, summed over resumed runs


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine decay to `end_lr_ratio` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps, end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Clip -> AdamW with warm-up + cosine schedule."""
  schedule = make_schedule(cfg)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts the floating-point array leaves of `tree` to `dtype` (others unchanged)."""
  def f(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(f, tree)


def _make_train_step(loss_fn, opt, config: TrainConfig, masks, has_frozen: bool):
  """The jitted `(params, opt_state, batch, step, frozen) -> (params, opt_state, loss)`."""
  base_key = jax.random.key(config.seed)

  def step_loss(p, batch, key, frozen_):
    return loss_fn(p, batch, key) if not has_frozen else loss_fn(p, batch, key, frozen_)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, opt_state, batch, step, frozen_):
    key = jax.random.fold_in(base_key, step)
    if config.precision == "mixed_bf16":
      # differentiate at a BF16 copy; the update is applied to the FP32 masters
      loss, grads = jax.value_and_grad(step_loss)(cast_floating(p, jnp.bfloat16), batch, key,
                                                  frozen_)
      grads = jax.tree.map(lambda g, w: g.astype(w.dtype), grads, p)
    else:
      loss, grads = jax.value_and_grad(step_loss)(p, batch, key, frozen_)
    updates, opt_state = opt.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
    if masks is not None:
      p = apply_masks(p, masks)
    return p, opt_state, loss

  return train_step


def _start_params(params: Any, config: TrainConfig, masks: Any) -> Any:
  if masks is not None:
    params = apply_masks(params, masks)
  if config.precision == "bf16":
    params = cast_floating(params, jnp.bfloat16)
  return params


def step_memory(loss_fn: Callable[..., jax.Array], params: Any, batch: Any, config: TrainConfig,
                *, masks: Any = None, frozen: Any = None) -> dict[str, int]:
  """XLA's buffer assignment for one train step of `fit` with these arguments.

  Compiles (does not run) the step `fit` would run and returns, in bytes:
  `arguments` (params, optimizer state, batch, frozen tree), `outputs`,
  `aliased` (outputs written into donated arguments), `temporaries`
  (gradients, activations saved for the backward pass, workspace) and
  `peak` = arguments + outputs - aliased + temporaries: the memory the step
  holds at once on a device (the host's process adds its own runtime).
  """
  opt = make_optimizer(config)
  params = _start_params(params, config, masks)
  opt_state = jax.eval_shape(opt.init, params)
  step = _make_train_step(loss_fn, opt, config, masks, frozen is not None)
  m = step.lower(params, opt_state, batch, jnp.asarray(0, jnp.int32), frozen).compile() \
      .memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def _ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, "train_state")


def _save(workdir: str, state: TrainState, history: list[dict]) -> None:
  tree = {"params": state.params, "opt_state": list(jax.tree.leaves(state.opt_state)),
          "step": np.asarray(state.step, np.int64),
          "seconds": np.asarray(state.seconds, np.float64)}
  checkpoint_lib.save_params(_ckpt_dir(workdir), tree)
  tmp = os.path.join(workdir, ".history.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(history, f)
  os.replace(tmp, os.path.join(workdir, "history.json"))


def _restore(workdir: str, opt_state_like: Any) -> tuple[TrainState, list[dict]] | None:
  path = _ckpt_dir(workdir)
  if not checkpoint_lib.exists(path):  # also finds a save interrupted between its renames
    return None
  tree = checkpoint_lib.restore_params(path)
  treedef = jax.tree.structure(opt_state_like)
  opt_state = jax.tree.unflatten(treedef, tree["opt_state"])
  hist_path = os.path.join(workdir, "history.json")
  history = []
  if os.path.isfile(hist_path):
    with open(hist_path, encoding="utf-8") as f:
      history = json.load(f)
  seconds = float(tree["seconds"]) if "seconds" in tree else 0.0  # older checkpoints: unknown
  return TrainState(int(tree["step"]), tree["params"], opt_state, seconds), history


def fit(loss_fn: Callable[[Any, Any, jax.Array], jax.Array], params: Any,
        batch_fn: Callable[[int], Any], config: TrainConfig, *, masks: Any = None,
        workdir: str | None = None, progress: bool = True, log_every: int = 10,
        stop_after: int | None = None, batch_sharding: Any = None,
        frozen: Any = None, donate_params: bool = False) -> tuple[Any, list[dict]]:
  """Minimises `loss_fn(params, batch, key)` over `config.steps` steps.

  Args:
    loss_fn: differentiable in `params`; `key` is a per-step PRNG key. With
      `frozen`, called as `loss_fn(params, batch, key, frozen)`.
    params: initial trainable params (any pytree of float arrays).
    batch_fn: `step -> batch`; must be deterministic for exact resumption.
    config: `TrainConfig`.
    masks: pruning masks (see `quantjax.sparsity`); re-applied after every
      update so pruned weights stay exactly zero.
    workdir: if given, the train state is checkpointed there (every
      `checkpoint_every` steps and at the end) and a later call resumes.
    progress: tqdm bar.
    log_every: record the loss every N steps in the returned history.
    stop_after: stop (after checkpointing) once this step is reached; for
      tests of interruption.
    batch_sharding: a `jax.sharding.Sharding` for every batch (e.g.
      `NamedSharding(mesh, P("data"))`); params keep whatever sharding they
      arrive with (see `quantjax.distributed.shard_params`), and the optimizer
      state follows them.
    frozen: a pytree the loss reads but does not train (a teacher's params).
      Pass large arrays here rather than closing over them in `loss_fn`: a
      closed-over array becomes a constant of the compiled step, which XLA
      copies and constant-folds (slow compiles, gigabytes of extra memory).

    donate_params: hand the caller's `params` arrays to the first step instead
      of copying them (they are deleted, so the caller must not use them
      again): one copy of the weights instead of two while training.

  Params and optimizer state are updated in place (buffer donation); unless
  `donate_params`, `params` itself is copied first, so the caller's arrays
  stay valid.

  Returns:
    `(params, history)`: final params, and `[{"step", "loss", "lr", "seconds"}...]`
    where `seconds` is the training wall time up to that step (compilation
    included), summed over the runs that resumed one another.
  """
  opt = make_optimizer(config)
  params = _start_params(params, config, masks)
  state = TrainState(0, params, opt.init(params))
  history: list[dict] = []
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    restored = _restore(workdir, state.opt_state)
    if restored is not None:
      state, history = restored
  train_step = _make_train_step(loss_fn, opt, config, masks, frozen is not None)

  schedule = make_schedule(config)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=state.step, desc="train", leave=False)
  p, opt_state, step = state.params, state.opt_state, state.step
  # donated below: never hand the caller's (or `frozen`'s) buffers to the step, unless asked
  if donate_params:
    p = jax.tree.map(jnp.asarray, p)
  else:
    p = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else jnp.array(a), p)
  t0 = time.perf_counter() - state.seconds
  del params, state  # the working copy is all the loop needs
  while step < config.steps:
    batch = batch_fn(step)
    if batch_sharding is not None:
      batch = jax.tree.map(lambda b: jax.device_put(b, batch_sharding), batch)
    p, opt_state, loss = train_step(p, opt_state, batch, jnp.asarray(step, jnp.int32), frozen)
    step += 1
    if step % log_every == 0 or step == config.steps:
      # `lr`: the rate the update of this step used (optax counts from 0).
      history.append({"step": step, "loss": float(loss), "lr": float(schedule(step - 1)),
                      "seconds": time.perf_counter() - t0})
      if bar is not None:
        bar.set_postfix(loss=f"{float(loss):.4f}")
    if bar is not None:
      bar.update(1)
    done = step == config.steps or (stop_after is not None and step >= stop_after)
    if workdir is not None and (done or (config.checkpoint_every and
                                         step % config.checkpoint_every == 0)):
      _save(workdir, TrainState(step, p, opt_state, time.perf_counter() - t0), history)
    if stop_after is not None and step >= stop_after:
      break
  if bar is not None:
    bar.close()
  return p, history
