"""Parts: the units a method quantizes (a weight, or one slice of a stacked weight)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from quantjax.methods.capture.trace import Layout
from quantjax.methods.capture.stats import InputStats
from quantjax.numerics.formats import resolve_format
from quantjax.numerics.qarray import QArray


# ----------------------------------------------------------------------------
# Blocks: the program downstream of a group, for block-wise objectives.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Block:
  """The traced program from a group's first matmul to the next group boundary, handed
  to methods that fit a group's weights to the float model's values there (a method
  asks for it with a class attribute `wants_block = True`; sequential mode only).

  `fn(*env_b, *weights, *consts)` is the span for one calibration batch (`env_b[j] =
  env[j][b]`), differentiable, the same Python object for every span of one structure
  (identical layers), so a method's compiled loop keyed on it is reused. Its outputs are
  every value live at the span's end; `outputs` lists those that depend on the group's
  weights, and `targets[j]` (`[n_batches, ...]`) is output `outputs[j]` of the float
  model (the float span on the float model's inputs).

  Attributes:
    name: the group's weights, for messages.
    fn: see above.
    env: the span's inputs, stacked over batches, from the quantized prefix.
    weights: the span's weight inputs (current values; the group's are float).
    consts: the span's other inputs.
    slot: `{part.key: index in weights}` for the group's parts.
    outputs: indices of the compared outputs of `fn`.
    targets: the float model's values of those outputs, stacked over batches.
  """

  name: str
  fn: Callable[..., Any]
  env: list[jax.Array]
  weights: list[jax.Array]
  consts: list[Any]
  slot: dict[tuple, int]
  outputs: tuple[int, ...]
  targets: list[jax.Array]

  @property
  def n_batches(self) -> int:
    return int(self.targets[0].shape[0]) if self.targets else 0


# ----------------------------------------------------------------------------
# Parts: the units a method quantizes.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Part:
  """One weight (or one slice of a stacked weight) a method changes.

  Attributes:
    path: the leaf's path; `region`: the slice (`()` for the whole leaf).
    rule: the `QuantRule` / `PruneRule` that selected it.
    layout: how its matmuls contract it (`Layout`).
    value: its current float value, shape `layout.shape`.
    stats: `InputStats` of its matmul inputs (merged over its sites).
    source: id of its input source (weights with the same id read the same input).
    group: id of its input group.
  """

  path: str
  region: tuple[int, ...]
  rule: Any
  layout: Layout
  value: jax.Array
  leaf: int = -1
  stats: InputStats | None = None
  source: int = -1
  group: int = -1
  sites: list[int] = dataclasses.field(default_factory=list)
  # site -> which slice of its batched matmul this part is (experts); absent: the whole site
  slots: dict[int, int] = dataclasses.field(default_factory=dict)
  # The block objective of its group (methods with `wants_block`; see `Block`).
  block: Block | None = None

  @property
  def key(self) -> tuple[str, tuple[int, ...]]:
    return (self.path, self.region)

  @property
  def name(self) -> str:
    return self.path + "".join(f"[{i}]" for i in self.region)

  def matrix(self) -> jax.Array:
    """Current value as float32 `[K, N]`."""
    return self.layout.to_matrix(jnp.asarray(self.value, jnp.float32))

  def from_matrix(self, m: jax.Array) -> jax.Array:
    """A `[K, N]` matrix back in the slice's layout and dtype."""
    return self.layout.from_matrix(m).astype(self.value.dtype)

  # --- formats oriented to the matmul -------------------------------------
  def leaf_format(self, fmt: Any) -> Any:
    """`fmt` placed on this weight's axes: groups along its (innermost)
    contraction axis, per-channel scales per output, axes counted from the
    end so slices of a stacked weight and the stacked QArray agree.

    Calibrated methods orient every format this way, whatever `group_axis` /
    `channel_axis` the spec says: a `[out, in]` weight is quantized like its
    `[in, out]` transpose.
    """
    fmt = resolve_format(fmt)
    lay = self.layout
    nd = len(lay.shape)
    neg = lambda a: a - nd  # noqa: E731
    if fmt.is_cast:
      return fmt
    inner = lay.contract[-1] if lay.contract else 0
    if fmt.granularity == "per_tensor":
      return fmt.replace(group_axis=neg(inner))
    if fmt.granularity == "per_channel":
      if len(lay.free) == 1:
        return fmt.replace(channel_axis=neg(lay.free[0]), group_axis=neg(inner))
      if len(lay.contract) == 1:
        # One scale per output element: a single group spanning the input axis.
        return fmt.replace(granularity="group", group_size=lay.shape[inner],
                           group_axis=neg(inner))
      raise ValueError(f"{self.name}: per-channel scales over {len(lay.free)} output axes and "
                       f"{len(lay.contract)} input axes cannot be stored; use a group format")
    g = fmt.group_size
    if lay.shape[inner] % g:
      raise ValueError(
          f"{self.name}: group_size {g} does not divide its innermost input axis "
          f"(axis {inner} of the weight slice {lay.shape}, length {lay.shape[inner]}); "
          f"choose a divisor of {lay.shape[inner]} or per_channel")
    return fmt.replace(group_axis=neg(inner))

  def matrix_format(self, fmt: Any) -> Any:
    """`fmt` for the `[K, N]` matrix view (groups along K, channels along N)."""
    fmt = resolve_format(fmt)
    if fmt.is_cast:
      return fmt
    self.leaf_format(fmt)  # the same checks
    return fmt.replace(channel_axis=-1, group_axis=0)

  def qarray_from_matrix(self, qm: Any) -> Any:
    """A QArray of the `[K, N]` matrix (in `matrix_format`) as one of this weight's
    layout (in `leaf_format`), the same codes and scales."""
    lay = self.layout
    fmt = self.leaf_format(qm.fmt)
    codes = lay.from_matrix(qm.codes())
    perm = tuple(lay.contract) + tuple(lay.free)
    inv = np.argsort(perm)
    inner = lay.contract[-1] if lay.contract else 0

    def place(a):
      if a is None:
        return None
      a = jnp.asarray(a)
      sizes = []
      for ax in perm:
        if ax in lay.contract:
          if qm.fmt.granularity == "group" and ax == inner:
            sizes.append(lay.shape[ax] // qm.fmt.group_size)
          else:
            sizes.append(lay.shape[ax] if (qm.fmt.granularity == "group") else 1)
        else:
          sizes.append(lay.shape[ax] if a.shape[-1] != 1 else 1)
      return jnp.transpose(a.reshape(sizes), inv)
    return QArray.from_codes(codes, fmt, place(qm.scale), place(qm.zero_point),
                             dtype=self.value.dtype)

  def k_to_leaf(self, v: jax.Array) -> jax.Array:
    """A per-input-feature vector `[K]` shaped to broadcast against this weight."""
    return self.layout.k_vector_to_leaf(v)
