"""A small optax training loop shared by distillation and quantization-aware training.

`fit(loss_fn, params, batch_fn, config)` runs AdamW with linear warm-up and
cosine decay and global-norm clipping; the train step is jitted. Pruning masks
stay enforced after every update. Data order and randomness are functions of
the step number (`batch_fn(step)`, `fold_in(key, step)`), so a run resumed
from its last checkpoint ends with exactly the params of an uninterrupted run.
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

__all__ = ["TrainConfig", "TrainState", "make_optimizer", "make_schedule", "fit"]


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
  """

  steps: int = 100
  learning_rate: float = 1e-4
  warmup_steps: int = 10
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  seed: int = 0
  checkpoint_every: int = 0

  def __post_init__(self):
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
        frozen: Any = None) -> tuple[Any, list[dict]]:
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

  Params and optimizer state are updated in place (buffer donation); `params`
  itself is copied first, so the caller's arrays stay valid.

  Returns:
    `(params, history)`: final params, and `[{"step", "loss", "lr", "seconds"}...]`
    where `seconds` is the training wall time up to that step (compilation
    included), summed over the runs that resumed one another.
  """
  opt = make_optimizer(config)
  if masks is not None:
    params = apply_masks(params, masks)
  state = TrainState(0, params, opt.init(params))
  history: list[dict] = []
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    restored = _restore(workdir, state.opt_state)
    if restored is not None:
      state, history = restored
  base_key = jax.random.key(config.seed)

  def step_loss(p, batch, key, frozen_):
    return loss_fn(p, batch, key) if frozen is None else loss_fn(p, batch, key, frozen_)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, opt_state, batch, step, frozen_):
    key = jax.random.fold_in(base_key, step)
    loss, grads = jax.value_and_grad(step_loss)(p, batch, key, frozen_)
    updates, opt_state = opt.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
    if masks is not None:
      p = apply_masks(p, masks)
    return p, opt_state, loss

  schedule = make_schedule(config)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=state.step, desc="train", leave=False)
  p, opt_state, step = state.params, state.opt_state, state.step
  # donated below: never hand the caller's (or `frozen`'s) buffers to the step
  p = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else jnp.array(a), p)
  t0 = time.perf_counter() - state.seconds
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
