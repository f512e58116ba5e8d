"""Knowledge-distillation losses.

References:
  Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
  2015, arXiv:1503.02531 (soft targets with temperature, T^2 scaling).
  Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (hidden-state
  matching).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["kd_logits_loss", "cross_entropy", "hidden_mse", "distill_loss"]


def _mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(x)
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd_logits_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                   temperature: float = 1.0, mask: jax.Array | None = None) -> jax.Array:
  """`T^2 * KL(softmax(t/T) || softmax(s/T))`, averaged over positions `[..., vocab]`."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} differ in shape")
  t = temperature
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return (t * t) * _mean(kl, mask)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy; `labels` are integer ids of `logits[..., :]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _mean(nll, mask)


def hidden_mse(student: Sequence[jax.Array], teacher: Sequence[jax.Array]) -> jax.Array:
  """Mean over layers of the mean squared difference of hidden states."""
  if len(student) != len(teacher):
    raise ValueError(f"{len(student)} student hidden states vs {len(teacher)} teacher ones")
  if not student:
    return jnp.zeros((), jnp.float32)
  losses = [jnp.mean((s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)) ** 2)
            for s, t in zip(student, teacher)]
  return sum(losses) / len(losses)


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array | None = None,
                 *, alpha: float = 1.0, temperature: float = 2.0,
                 student_hidden: Sequence[jax.Array] = (), teacher_hidden: Sequence[jax.Array] = (),
                 hidden_weight: float = 0.0, mask: jax.Array | None = None) -> jax.Array:
  """`alpha * KD + (1 - alpha) * CE(labels) + hidden_weight * hidden MSE`."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  loss = alpha * kd_logits_loss(student_logits, teacher_logits, temperature=temperature, mask=mask)
  if alpha < 1.0:
    if labels is None:
      raise ValueError("alpha < 1 mixes in the task cross-entropy: pass labels")
    loss = loss + (1.0 - alpha) * cross_entropy(student_logits, labels, mask=mask)
  if hidden_weight:
    loss = loss + hidden_weight * hidden_mse(student_hidden, teacher_hidden)
  return loss
