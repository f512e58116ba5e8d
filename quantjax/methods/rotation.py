"""Function-preserving rotations of a params tree (QuaRot / SpinQuant, R1 and R2).

An orthogonal `R` (`R R^T = I`) inserted between a weight that writes a
hidden vector and the weights that read it changes no output: the writer
becomes `W R`, every reader `R^T W`. Chosen well (a randomized Hadamard), it
spreads each outlier channel over all channels, so the rotated weights, and
the activations the readers see, quantize with far less error; every
quantizer after it (RTN, GPTQ, learned rounding) gains, and the result is an
ordinary model of the same architecture that any runtime runs unchanged
(QuaRot, Ashkboos et al. 2024, arXiv:2404.00456; SpinQuant, Liu et al. 2024,
arXiv:2405.16406).

Two rotations are applied here, both exact in float arithmetic:

* **R1, the residual stream** (`ResidualRotation`). The RMSNorms that read
  the stream are made scale-free first: each norm's scale `s` is multiplied
  into the rows of the linears it feeds and set to 1 (`normalize(x R) =
  normalize(x) R`, since `R` keeps the root mean square). Then the
  embedding table and the linears that write the stream (attention output,
  MLP down) are multiplied by `R` on their residual axis, the linears that
  read it (q/k/v, gate/up, the head) by `R^T`. A head tied to the embedding
  is untied first (after the fold it is `diag(s_final) E^T`, no longer the
  table), so its bytes count in every size.
* **R2, values and attention output per head** (`HeadRotation`): each value
  head's columns of `v_proj` by `R2`, each query head's rows of `o_proj` by
  `R2^T` (attention mixes positions, not a head's dimensions, so `R2`
  passes through it).

Which norm feeds which linears, and each weight's residual axis, is
architecture data (`RotationTable`) that lives beside each model
(`quantjax.models.llama.rotation_table(config)`); this module knows no model.

The matrices are float64 (`quantjax.numerics.hadamard.orthogonal`), the
products are taken in float64 and cast back to each weight's dtype, so a
rotated float32 model's perplexity equals the original's to ~1e-6.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from quantjax import rules as rules_lib
from quantjax.methods.fold import FoldGroup
from quantjax.numerics import hadamard as hadamard_lib
from quantjax.numerics.qarray import QArray
from quantjax.transforms import fake_quant_params

__all__ = ["ResidualRotation", "HeadRotation", "RotationTable", "rotate", "rotation_matrices",
           "RotationResult", "untie", "learn_rotation", "LearnedRotation"]


@dataclasses.dataclass(frozen=True)
class ResidualRotation:
  """Where a model reads and writes its residual stream (R1's data).

  Attributes:
    width: the residual width d.
    norms: `FoldGroup(norm scale path, consumer kernel paths)` for every norm
      whose output only feeds linears (its scale is folded into their input
      rows, `[d, out]` kernels); the final norm's group names the head.
    embeddings: tables `[vocab, d]` (the residual on their last axis).
    readers: kernels `[d, out]` that read the stream (the consumers of
      `norms`, listed again here; the head included).
    writers: kernels `[in, d]` that add into the stream.
    untie: `(embedding path, head kernel path)`: the head is the embedding's
      transpose and must become its own `[d, vocab]` kernel at that path
      (the model's config must then be untied); None for an untied model.
    norm_offset: the norm multiplies by `offset + scale` (1.0 for Gemma's
      `(1 + scale)`, 0.0 for Llama's); after the fold the scale is
      `1 - offset`.
  """

  width: int
  norms: tuple[FoldGroup, ...]
  embeddings: tuple[str, ...]
  readers: tuple[str, ...]
  writers: tuple[str, ...]
  untie: tuple[str, str] | None = None
  norm_offset: float = 0.0


@dataclasses.dataclass(frozen=True)
class HeadRotation:
  """Value / attention-output pairs rotated per head (R2's data).

  Attributes:
    pairs: `(v kernel [d, Hkv * D], o kernel [H * D, d])` per layer.
    head_dim: D.
    num_heads, num_kv_heads: H and Hkv (query head `h` reads value head
      `h // (H / Hkv)`).
  """

  pairs: tuple[tuple[str, str], ...]
  head_dim: int
  num_heads: int
  num_kv_heads: int


@dataclasses.dataclass(frozen=True)
class RotationTable:
  """The rotations a model allows: R1 (`residual`), R2 (`heads`), either None
  when the architecture does not allow it, with `why_not` saying why."""

  residual: ResidualRotation | None
  heads: HeadRotation | None
  why_not: str = ""


class RotationResult(NamedTuple):
  """`params`: the rotated tree (pure dict); `untied`: the head was untied (use
  the model's untied config); `info`: what was applied (kinds, widths)."""

  params: Any
  untied: bool
  info: dict


def rotation_matrices(table: RotationTable, *, r1: Any = "hadamard", r2: Any = "hadamard",
                      seed: int = 0) -> dict[str, np.ndarray]:
  """`{"r1": [d, d], "r2": [D, D]}` float64 for the kinds asked (a kind name
  from `hadamard.ROTATION_KINDS`, an explicit matrix, or None for none)."""
  out = {}
  for key, spec, width, what, offset in (
      ("r1", r1, table.residual.width if table.residual else None, "R1 (residual stream)", 0),
      ("r2", r2, table.heads.head_dim if table.heads else None, "R2 (value heads)", 1)):
    if spec is None:
      continue
    if width is None:
      raise ValueError(f"{what} is not available for this model: "
                       f"{table.why_not or 'its rotation table has no entry for it'}")
    if isinstance(spec, str):
      out[key] = hadamard_lib.orthogonal(width, spec, seed + offset, what=what)
    else:
      m = np.asarray(spec, np.float64)
      if m.shape != (width, width):
        raise ValueError(f"{what}: matrix of shape {m.shape}, expected ({width}, {width})")
      err = float(np.abs(m @ m.T - np.eye(width)).max())
      if err > 1e-5:
        raise ValueError(f"{what}: the matrix is not orthogonal (max |R R^T - I| = {err:.2e})")
      out[key] = m
  return out


def _float_leaf(leaves: Mapping[str, Any], path: str, what: str) -> np.ndarray:
  if path not in leaves:
    raise KeyError(f"{what}: no weight at {path!r} (the rotation table does not match "
                   "these params)")
  x = leaves[path]
  if isinstance(x, QArray) or not hasattr(x, "shape"):
    raise TypeError(f"{what}: {path} is a {type(x).__name__}, not a float array; rotate the "
                    "float model before quantizing it")
  return np.asarray(x, np.float64)


def _check_axis(path: str, shape, axis: int, width: int, what: str) -> None:
  if len(shape) < 2 or shape[axis] != width:
    raise ValueError(f"{what}: {path} has shape {tuple(shape)}; expected the width {width} "
                     f"on axis {axis}")


def _set_path(tree: dict, path: str, value: Any) -> dict:
  """A copy of the nested dict `tree` with `value` at `a/b/c` (created if absent)."""
  head, _, rest = path.partition("/")
  out = dict(tree)
  if rest:
    out[head] = _set_path(tree.get(head, {}), rest, value)
  else:
    out[head] = value
  return out


def _fold(leaves: Mapping[str, Any], table: RotationTable, what: str) -> tuple[dict, bool]:
  """R1's preparation (float64): the tied head untied, every norm's scale folded into the
  rows of the linears it feeds. Returns the changed leaves and whether it untied."""
  res = table.residual
  d = res.width
  new: dict[str, np.ndarray] = {}

  def get(path):
    return new[path] if path in new else _float_leaf(leaves, path, what)

  untied = False
  if res.untie is not None:
    emb, head = res.untie
    e = get(emb)
    _check_axis(emb, e.shape, -1, d, what)
    if head in leaves:
      raise ValueError(f"{what}: the table says the head is tied, but {head} exists")
    new[head] = e.T.copy()
    untied = True
  for g in res.norms:
    s = get(g.prev)
    if s.shape[-1] != d:
      raise ValueError(f"{what}: norm scale {g.prev} has shape {s.shape}, expected width {d}")
    eff = s + res.norm_offset
    for c in g.consumers:
      w = get(c)
      _check_axis(c, w.shape, 0, d, what)
      new[c] = eff[:, None] * w
    new[g.prev] = np.full_like(s, 1.0 - res.norm_offset)
  return new, untied


def _apply(get, table: RotationTable, r1, r2, xp) -> dict:
  """The rotated leaves (`get(path)` reads the folded ones), with numpy or jax.numpy `xp`
  (the learned rotation runs the same code inside `jax.grad`)."""
  new = {}
  if r1 is not None:
    res = table.residual
    d = res.width
    what = "R1 (residual stream)"
    for p in res.embeddings:
      e = get(p)
      _check_axis(p, e.shape, -1, d, what)
      new[p] = e @ r1
    for p in res.readers:
      w = get(p)
      _check_axis(p, w.shape, 0, d, what)
      new[p] = r1.T @ w
    for p in res.writers:
      w = get(p)
      _check_axis(p, w.shape, -1, d, what)
      new[p] = w @ r1
  if r2 is not None:
    hr = table.heads
    hd, h, hk = hr.head_dim, hr.num_heads, hr.num_kv_heads
    what = "R2 (value heads)"
    for vp, op in hr.pairs:
      v = new.get(vp, get(vp))
      o = new.get(op, get(op))
      _check_axis(vp, v.shape, -1, hk * hd, what)
      _check_axis(op, o.shape, 0, h * hd, what)
      new[vp] = (v.reshape(v.shape[0], hk, hd) @ r2).reshape(v.shape)
      new[op] = xp.einsum("ed,hef->hdf", r2, o.reshape(h, hd, o.shape[-1])).reshape(o.shape)
  return new


def _with_leaves(tree: Any, new: Mapping[str, Any], cast) -> Any:
  present = {p for p, _ in rules_lib.tree_leaves_with_paths(tree)}
  out = rules_lib.map_with_paths(lambda p, x: cast(p, new[p]) if p in new else x, tree)
  for p in sorted(set(new) - present):
    out = _set_path(out, p, cast(p, new[p]))
  return out


def rotate(params: Any, table: RotationTable, *, r1: Any = "hadamard", r2: Any = "hadamard",
           seed: int = 0) -> RotationResult:
  """The params with the rotations of `table` applied (see the module docstring).

  Args:
    params: float params (a pure nested dict or an `nnx.State`).
    table: the model's `RotationTable`.
    r1, r2: "hadamard" (randomized Hadamard; an error for a width with no
      construction), "auto" (Hadamard, else random orthogonal x
      Walsh-Hadamard), "random", an explicit orthogonal matrix (e.g. one
      learned by `learn_rotation`), or None.
    seed: the random signs / blocks.
  """
  mats = rotation_matrices(table, r1=r1, r2=r2, seed=seed)
  if not mats:
    raise ValueError("nothing to rotate: r1 and r2 are both None")
  tree = rules_lib.to_pure(params)
  leaves = dict(rules_lib.tree_leaves_with_paths(tree))
  dtypes = {p: getattr(x, "dtype", None) for p, x in leaves.items()}
  new, untied = {}, False
  if "r1" in mats:
    new, untied = _fold(leaves, table, "R1 (residual stream)")
    if untied:
      emb, head = table.residual.untie
      dtypes[head] = dtypes[emb]
  what = "R1 (residual stream)" if "r1" in mats else "R2 (value heads)"

  def get(path):
    return new[path] if path in new else _float_leaf(leaves, path, what)
  new.update(_apply(get, table, mats.get("r1"), mats.get("r2"), np))
  info: dict[str, Any] = {}
  if "r1" in mats:
    info["r1"] = {"width": table.residual.width, "kind": r1 if isinstance(r1, str) else "matrix",
                  "untied_head": untied}
  if "r2" in mats:
    info["r2"] = {"width": table.heads.head_dim, "kind": r2 if isinstance(r2, str) else "matrix",
                  "pairs": len(table.heads.pairs)}

  def cast(path, x):
    return np.asarray(x, dtype=np.dtype(dtypes.get(path) or np.float32))

  return RotationResult(_with_leaves(tree, new, cast), untied, info)


def untie(params: Any, embedding: str, head: str) -> Any:
  """The params with the embedding's transpose `[d, vocab]` added as `head` (the same
  function for a model whose config is then untied)."""
  tree = rules_lib.to_pure(params)
  leaves = dict(rules_lib.tree_leaves_with_paths(tree))
  if head in leaves:
    raise ValueError(f"untie: {head} exists already (the model is untied)")
  e = _float_leaf(leaves, embedding, "untie")
  return _set_path(tree, head, np.asarray(e.T, dtype=np.dtype(leaves[embedding].dtype)))


class LearnedRotation(NamedTuple):
  """`r1`, `r2`: the learned orthogonal matrices (float64; None where not rotated), for
  `rotate(params, table, r1=..., r2=...)`; `history`: the training loss per step."""

  r1: np.ndarray | None
  r2: np.ndarray | None
  history: list


def _cayley(x, xp):
  """The orthogonal `(I - A)^-1 (I + A)` of the skew-symmetric `A = (X - X^T) / 2`."""
  a = (x - x.T) / 2
  eye = xp.eye(x.shape[0], dtype=x.dtype)
  return xp.linalg.solve(eye - a, eye + a)


def _nearest_orthogonal(m: np.ndarray) -> np.ndarray:
  u, _, vt = np.linalg.svd(m)
  return u @ vt


def learn_rotation(loss_fn, params: Any, table: RotationTable, batches, rules, *,
                   r1: Any = "hadamard", r2: Any = "hadamard", steps: int = 100,
                   learning_rate: float = 1e-3, seed: int = 0,
                   progress: bool = True) -> LearnedRotation:
  """SpinQuant's learned rotations (Liu et al. 2024, arXiv:2405.16406): R1 and R2 trained
  with `jax.grad` to lower the loss of the fake-quantized rotated model.

  Each rotation is `R0 C(X)`, `R0` the starting rotation (`r1` / `r2`: a kind or a
  matrix, as in `rotate`) and `C(X)` the Cayley transform of a skew-symmetric
  matrix (orthogonal for every `X`, identity at `X = 0`), so the model stays
  exactly the float model's function at every step and only its quantization
  error changes. Each step: rotate the folded float params by the current
  matrices, quantize-dequantize them by `rules` (straight-through,
  `transforms.fake_quant_params`), and take an Adam step on `X` along the
  gradient of `loss_fn(params, batch)` (e.g. the model's next-token NLL,
  `quantjax.models.llama.loss_fn(config)`; with an untied config when `table`
  unties the head). `batches` cycle. The result goes to `rotate`.
  """
  mats = rotation_matrices(table, r1=r1, r2=r2, seed=seed)
  if not mats:
    raise ValueError("nothing to learn: r1 and r2 are both None")
  tree = rules_lib.to_pure(params)
  leaves = dict(rules_lib.tree_leaves_with_paths(tree))
  new, _ = _fold(leaves, table, "R1 (residual stream)") if "r1" in mats else ({}, False)
  base = _with_leaves(tree, new, lambda p, x: np.asarray(x, np.float32))
  base = jax.tree.map(jnp.asarray, base)
  r0 = {k: jnp.asarray(v, jnp.float32) for k, v in mats.items()}
  x0 = {k: jnp.zeros_like(v) for k, v in r0.items()}
  base_leaves = dict(rules_lib.tree_leaves_with_paths(base))

  def rotated(x):
    r = {k: r0[k] @ _cayley(x[k], jnp) for k in r0}
    changed = _apply(base_leaves.__getitem__, table, r.get("r1"), r.get("r2"), jnp)
    return fake_quant_params(_with_leaves(base, changed, lambda p, v: v), rules)

  opt = optax.adam(learning_rate)

  @jax.jit
  def step(x, state, batch):
    loss, g = jax.value_and_grad(lambda x: loss_fn(rotated(x), batch))(x)
    upd, state = opt.update(g, state, x)
    return optax.apply_updates(x, upd), state, loss

  batches = list(batches)
  if not batches:
    raise ValueError("learn_rotation needs at least one batch")
  x, state = x0, opt.init(x0)
  history = []
  bar = tqdm(range(steps), desc="learn rotation", disable=not progress)
  for i in bar:
    x, state, loss = step(x, state, jnp.asarray(batches[i % len(batches)]))
    loss = float(loss)
    if not np.isfinite(loss):
      raise FloatingPointError(f"learn_rotation: the loss is {loss} at step {i}; lower the "
                               "learning rate")
    history.append(loss)
    bar.set_postfix(loss=f"{loss:.4f}")
  out = {k: _nearest_orthogonal(np.asarray(mats[k], np.float64)
                                @ _cayley(np.asarray(x[k], np.float64), np))
         for k in mats}
  return LearnedRotation(out.get("r1"), out.get("r2"), history)
