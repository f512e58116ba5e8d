"""Calibration on any JAX model: capture the matmuls that read params leaves.

A calibrated method (GPTQ, AWQ, SmoothQuant, static activation ranges,
Wanda, SparseGPT, the importance matrix, the error report) needs, for every
weight it changes, the inputs of the matmuls that read it. This module gets
them from the user's own forward function `fn(params, batch)`, with no model
change and no names: an NNX module (`nnx_apply`), a linen module and its
variables (`linen_apply`), quantjax's own models, or any function of a
params pytree.

How (`trace`):

1. `jax.make_jaxpr(fn)(params, batch)` records the computation once.
   Nested `jit`s, `remat`/`checkpoint`, `custom_jvp` / `custom_vjp` calls are
   inlined, and every `lax.scan` that reads params (`nn.scan`, `nnx.scan`,
   scanned layers with stacked weights `[L, ...]`) is unrolled, so the flat
   program has one equation per operation of every layer.
2. Dataflow marks each `dot_general` and `conv_general_dilated` one of whose
   operands is a params leaf reached only through layout operations
   (`astype`, transpose, reshape, slicing, sharding constraints) and the
   other depends on the batch: a *site*. Applying the same layout operations
   to an array of element indices tells, exactly, which leaf element each
   operand element is: that gives the weight's contraction axes, its output
   axes, and for stacked weights the slice (layer) a site reads. Each weight
   (or slice) is then seen as a matrix `[K, N]` (contraction axes in the
   leaf's axis order, then output axes) and each site's input as features
   `[T, K]` in the same order; methods work on those.
3. Sites whose input is the same value (after value-preserving reshapes and
   casts) form a *group*: q/k/v read one normed input, gate/up another.

Calibration (`calibrate`) then cuts the flat program at the first site of
each group that a rule targets. *Sequential* mode runs segment n for every
calibration batch, with the weights of groups before n already replaced by
their quantized values (and the activation quantization of their sites
applied), accumulates the statistics of group n's inputs inside the same
compiled call, quantizes group n, and carries the segment's live values on:
each equation runs once per batch, so the cost is one forward pass plus the
statistics, linear in depth. Segments are compiled once per distinct
structure (identical layers share one executable). *One-pass* mode takes all
statistics from the float model (the quantized weights are not fed forward),
batch by batch. Nothing after the last targeted group is run.

Trade-offs of the jaxpr route, against patching `jax.lax.dot_general` during a
call (Qwix's interception): it sees every matmul, including `jnp.einsum`,
`x @ w`, stock Flax layers and calls inside jitted or scanned code, with
exact knowledge of which leaf an operand is (no identity heuristics), and it
is what makes error-propagating sequential calibration possible without
re-running the model per group. Its costs: it relies on `jax.extend.core`
(the jaxpr data structures), weights used inside `lax.cond` / `while_loop`
bodies are not seen (a targeted weight used only there is reported), and the
calibration batches must all have one shape (the program is traced once).

References:
  Frantar et al. GPTQ, ICLR 2023, arXiv:2210.17323 (sequential quantization
  with inputs from the quantized prefix). llm-compressor's sequential
  pipeline and Qwix's interception-based calibration are the designs this
  combines (see docs/design.md).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import math
import os
import re
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

try:
  from jax.extend.core import DebugInfo, DropVar
except ImportError:  # jax < 0.10 exports neither from jax.extend.core (same classes)
  from jax._src.core import DebugInfo, DropVar

from quantjax import rules as rules_lib

__all__ = ["Site", "Layout", "Capture", "InputStats", "Part", "trace", "calibrate",
           "collect_stats", "nnx_apply", "linen_apply", "CalibrationResult", "STAT_KINDS",
           "tree_from_parts", "effective_weight"]

logger = logging.getLogger("quantjax")

# Call-like primitives whose body is inlined: name -> the param holding the jaxpr.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Unary ops that leave values unchanged (identity on element indices).
_SAME = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
         "pvary", "mesh_cast"}
# Unary data-movement ops (applied to an index array to map elements).
_MOVE = {"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "slice",
         "dynamic_slice", "rev"}
# Ops a segment recomputes from their inputs rather than taking a folded constant
# (XLA fuses them into their consumers for free).
_CHEAP = {"broadcast_in_dim", "iota", "reshape", "convert_element_type", "squeeze",
          "expand_dims"}
# Value-preserving unary ops walked back from a matmul input to its group's root value.
_ROOT_OPS = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
             "reshape", "squeeze", "expand_dims", "transpose", "pvary"}
_MATMULS = {"dot_general", "conv_general_dilated", "ragged_dot_general"}
# Ops between a batch of ids and the gather that reads a params leaf with them
# (jnp.take / x[ids] wrap negative ids with lt / add / select_n).
_INDEX_OPS = {"convert_element_type", "copy", "broadcast_in_dim", "reshape", "expand_dims",
              "squeeze", "select_n", "lt", "ge", "add", "clamp", "and"}

STAT_KINDS = ("hessian", "absmean", "sqmean", "range", "sample")


def _is_lit(a) -> bool:
  return isinstance(a, jcore.Literal)


def _is_drop(v) -> bool:
  return isinstance(v, DropVar)


# ----------------------------------------------------------------------------
# Model adapters.
# ----------------------------------------------------------------------------

def nnx_apply(model: Any) -> tuple[Callable[[Any, Any], Any], Any]:
  """`(fn, state)` for an NNX module: `fn(state, batch) = model(batch)`.

  The state is `nnx.split(model)`'s; rebuild the module from the calibrated
  state with `nnx.merge(graphdef, state)` (or `nnx.update(model, state)`).
  """
  from flax import nnx
  graphdef, state = nnx.split(model)

  def fn(st, batch):
    return nnx.merge(graphdef, st)(batch)
  return fn, state


def linen_apply(module: Any, variables: Any, **apply_kwargs) -> tuple[Callable, Any]:
  """`(fn, variables)` for a linen module: `fn(variables, batch) = module.apply(variables, batch)`."""

  def fn(v, batch):
    return module.apply(v, batch, **apply_kwargs)
  return fn, variables


# ----------------------------------------------------------------------------
# The flat program.
# ----------------------------------------------------------------------------

class _Flat:
  """Builds one flat list of equations from a (nested) jaxpr."""

  def __init__(self):
    self.eqns: list[Any] = []
    self.constvars: list[Any] = []
    self.consts: list[Any] = []
    self.pdep: set = set()  # vars that depend on params
    # var -> (source atom, index): the index-th slice of a param-dependent scan input
    self.regions: dict[Any, tuple[Any, int]] = {}
    self._helpers: dict[Any, Any] = {}

  def add_const(self, value) -> Any:
    aval = jax.typeof(value)
    v = jcore.Var(aval)
    self.constvars.append(v)
    self.consts.append(value)
    return v

  @staticmethod
  def fresh(v):
    return DropVar(v.aval) if _is_drop(v) else jcore.Var(v.aval)

  def is_pdep(self, a) -> bool:
    return (not _is_lit(a)) and a in self.pdep

  def emit(self, eqn, ins):
    outs = [self.fresh(v) for v in eqn.outvars]
    self.eqns.append(eqn.replace(invars=list(ins), outvars=outs))
    if any(self.is_pdep(a) for a in ins):
      self.pdep.update(o for o in outs if not _is_drop(o))
    return outs

  def inline(self, jaxpr, ins, const_atoms=()) -> list[Any]:
    env: dict[Any, Any] = {}
    for v, a in zip(jaxpr.constvars, const_atoms):
      env[v] = a
    for v, a in zip(jaxpr.invars, ins):
      env[v] = a

    def read(a):
      return a if _is_lit(a) else env[a]

    for eqn in jaxpr.eqns:
      eins = [read(a) for a in eqn.invars]
      name = eqn.primitive.name
      sub = _CALLS.get(name)
      if sub is not None and sub in eqn.params:
        inner = eqn.params[sub]
        if isinstance(inner, jcore.ClosedJaxpr):
          catoms = [self.add_const(c) for c in inner.consts]
          outs = self.inline(inner.jaxpr, eins, catoms)
        else:
          outs = self.inline(inner, eins)
      elif name == "scan" and int(eqn.params["length"]) > 0 and any(
          self.is_pdep(a) for a in eins):
        outs = self._unroll_scan(eqn, eins)
      else:
        outs = self.emit(eqn, eins)
      for v, a in zip(eqn.outvars, outs):
        if not _is_drop(v):
          env[v] = a
    return [read(a) for a in jaxpr.outvars]

  def _helper(self, key, fn, avals):
    if key not in self._helpers:
      self._helpers[key] = jax.make_jaxpr(fn)(*avals)
    return self._helpers[key]

  def _index(self, x, i: int):
    aval = x.aval
    closed = self._helper(("index", aval.shape, aval.dtype, i), lambda a: a[i],
                          [jax.ShapeDtypeStruct(aval.shape, aval.dtype)])
    catoms = [self.add_const(c) for c in closed.consts]
    (out,) = self.inline(closed.jaxpr, [x], catoms)
    if self.is_pdep(x):
      self.regions[out] = (x, i)
    return out

  def _stack(self, atoms):
    avals = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in atoms]
    closed = self._helper(("stack", len(atoms), avals[0].shape, avals[0].dtype),
                          lambda *a: jnp.stack(a), avals)
    catoms = [self.add_const(c) for c in closed.consts]
    (out,) = self.inline(closed.jaxpr, list(atoms), catoms)
    return out

  def _unroll_scan(self, eqn, ins):
    p = eqn.params
    nc, ncarry, length = int(p["num_consts"]), int(p["num_carry"]), int(p["length"])
    body = p["jaxpr"]
    bconsts = [self.add_const(c) for c in body.consts]
    consts, carry, xs = ins[:nc], list(ins[nc:nc + ncarry]), ins[nc + ncarry:]
    per_iter: list[list[Any] | None] = [None] * length
    order = range(length - 1, -1, -1) if p.get("reverse", False) else range(length)
    for i in order:
      x_i = [self._index(x, i) for x in xs]
      outs = self.inline(body.jaxpr, list(consts) + carry + x_i, bconsts)
      carry = outs[:ncarry]
      per_iter[i] = outs[ncarry:]
    ny = len(eqn.outvars) - ncarry
    ys = [self._stack([per_iter[i][j] for i in range(length)]) for j in range(ny)]
    return carry + ys


# ----------------------------------------------------------------------------
# Sites and their layouts.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """How a weight (or one slice of a stacked weight) is contracted.

  Attributes:
    leaf_shape: the params leaf's shape.
    region: indices along `fixed` of the slice the matmul reads (`()`: the
      whole leaf; `(3,)`: layer 3 of a stacked `[L, ...]` or `[..., L]` leaf).
    contract: the slice's contraction axes, ascending (its input axes).
    free: the slice's other axes, ascending (its output axes).
    fixed: the leaf's stacking axes, ascending (any position; `()` for a
      whole leaf): the axes the matmul holds at one index.
  """

  leaf_shape: tuple[int, ...]
  region: tuple[int, ...]
  contract: tuple[int, ...]
  free: tuple[int, ...]
  fixed: tuple[int, ...] = ()

  @property
  def shape(self) -> tuple[int, ...]:
    """The slice's shape."""
    return tuple(d for a, d in enumerate(self.leaf_shape) if a not in self.fixed)

  @property
  def index(self) -> tuple:
    """Indexes the leaf to this slice (`leaf[layout.index]`, `.at[layout.index]`)."""
    out: list[Any] = [slice(None)] * len(self.leaf_shape)
    for a, i in zip(self.fixed, self.region):
      out[a] = i
    return tuple(out) if self.fixed else ()

  @property
  def k(self) -> int:
    return int(math.prod(self.shape[a] for a in self.contract))

  @property
  def n(self) -> int:
    return int(math.prod(self.shape[a] for a in self.free))

  def _perm(self):
    return tuple(self.contract) + tuple(self.free)

  def to_matrix(self, w: jax.Array) -> jax.Array:
    """The slice `w` (shape `self.shape`) as a `[K, N]` matrix."""
    return jnp.transpose(jnp.asarray(w), self._perm()).reshape(self.k, self.n)

  def from_matrix(self, m: jax.Array) -> jax.Array:
    """Inverse of `to_matrix`."""
    sizes = [self.shape[a] for a in self._perm()]
    inv = np.argsort(self._perm())
    return jnp.transpose(jnp.asarray(m).reshape(sizes), inv)

  def k_vector_to_leaf(self, v: jax.Array) -> jax.Array:
    """A `[K]` vector (one value per input feature) broadcastable against the slice:
    the contraction axes hold it, every other axis has size 1."""
    shape = [self.shape[a] if a in self.contract else 1 for a in range(len(self.shape))]
    return jnp.asarray(v).reshape([self.shape[a] for a in self.contract]).reshape(shape)

  def leaf_vector_to_k(self, s: jax.Array) -> jax.Array:
    """Inverse of `k_vector_to_leaf`: `[K]` in the layout's K order."""
    s = jnp.asarray(s)
    if s.size != self.k:
      raise ValueError(f"a per-input scale of {s.size} values does not match K={self.k}")
    return jnp.transpose(s.reshape([self.shape[a] if a in self.contract else 1
                                    for a in range(len(self.shape))]), self._perm()).reshape(-1)


@dataclasses.dataclass
class Site:
  """One matmul that reads a params leaf.

  Attributes:
    eqn_index: position in the flat program.
    kind: "dot_general" or "conv_general_dilated".
    path: the leaf's path.
    leaf: the leaf's position among the flattened params.
    w_pos: which operand is the weight (0 or 1).
    x_contract: the input operand's contracted dimensions, paired with the
      weight operand's contraction dimensions in `w_contract`.
    layout: the weight's `Layout` (None until analysed; `error` says why not).
    k_src: feature gather from operand order to the layout's K order (None: identity).
    source: index of the input source (shared statistics) in the capture.
    group: index of the group (shared root value).
  """

  eqn_index: int
  kind: str
  path: str
  leaf: int
  w_pos: int
  w_contract: tuple[int, ...]
  x_contract: tuple[int, ...]
  w_chain: tuple[int, ...]
  layout: Layout | None = None
  k_src: np.ndarray | None = None
  error: str | None = None
  source: int = -1
  group: int = -1
  x_var: Any = None
  x_chain: tuple[int, ...] = ()
  # Sliced sites (experts): the weight operand's batch / group dimensions, the input
  # operand's batch dimensions, the group sizes of a ragged_dot, and the region of
  # the leaf each slice reads (in the order of the batch dimensions).
  w_batch: tuple[int, ...] = ()
  x_batch: tuple[int, ...] = ()
  gs_var: Any = None
  regions: list[tuple[int, ...]] | None = None


@dataclasses.dataclass
class _Source:
  """An input value whose statistics several sites share."""

  root: Any  # the group's root var
  chain: tuple[int, ...]  # eqn indices from root to the site's input operand
  x_var: Any
  x_contract: tuple[int, ...]
  k_src: np.ndarray | None
  k: int
  kind: str
  conv: dict | None
  group: int
  x_batch: tuple[int, ...] = ()
  gs_var: Any = None
  n_slices: int = 0  # > 0: statistics per slice (expert) with a leading axis

  @property
  def sliced(self) -> bool:
    return self.n_slices > 0


def _const_eval(flat: _Flat, prod: dict, var, cache: dict):
  """Concrete value of a var that depends on no batch and no params (else None)."""
  if _is_lit(var):
    return var.val
  if var in cache:
    return cache[var]
  if var in flat.pdep:
    return None
  if var in flat._const_index:
    val = flat.consts[flat._const_index[var]]
  elif var not in prod:
    return None
  else:
    eqn = flat.eqns[prod[var]]
    ins = []
    for a in eqn.invars:
      v = _const_eval(flat, prod, a, cache)
      if v is None:
        cache[var] = None
        return None
      ins.append(v)
    outs = eqn.primitive.bind(*ins, **eqn.params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    for o, ov in zip(eqn.outvars, outs):
      cache[o] = ov
    val = cache[var]
  cache[var] = val
  return val


class Capture:
  """The traced program of `fn(params, batch)` and the matmul sites it contains.

  Built by `trace`. `sites` lists every matmul whose weight operand is a
  params leaf; `summary()` prints them. `leaf_paths[i]` is the path of the
  i-th flattened params leaf.
  """

  def __init__(self, fn, params, batch):
    self.fn = fn
    self.treedef = jax.tree_util.tree_structure(params)
    flat_p, _ = jax.tree_util.tree_flatten_with_path(params)
    self.leaf_paths = [rules_lib.path_str(p) for p, _ in flat_p]
    p_leaves = [x for _, x in flat_p]
    self.n_params = len(p_leaves)
    b_leaves, self.batch_treedef = jax.tree_util.tree_flatten(batch)
    self.batch_avals = [jax.ShapeDtypeStruct(np.shape(b), jnp.result_type(b)) for b in b_leaves]
    for i, x in enumerate(p_leaves):
      if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"params leaf {self.leaf_paths[i]!r} is a {type(x).__name__}, not an array")
    p_avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in p_leaves]
    self.leaf_avals = p_avals

    treedef, btreedef = self.treedef, self.batch_treedef

    def flat_fn(pl, bl):
      return fn(jax.tree_util.tree_unflatten(treedef, pl),
                jax.tree_util.tree_unflatten(btreedef, bl))

    closed = jax.make_jaxpr(flat_fn)(p_avals, self.batch_avals)
    flat = _Flat()
    invars = [jcore.Var(v.aval) for v in closed.jaxpr.invars]
    catoms = [flat.add_const(c) for c in closed.consts]
    flat.pdep.update(invars[:self.n_params])
    flat.outvars = flat.inline(closed.jaxpr, invars, catoms)
    flat._const_index = {v: i for i, v in enumerate(flat.constvars)}
    self.flat = flat
    self.invars = invars
    self.param_vars = invars[:self.n_params]
    self.batch_vars = invars[self.n_params:]
    self.batch_set = set(self.batch_vars)
    self.batch_index = {v: i for i, v in enumerate(self.batch_vars)}
    self._analyse()

  # --------------------------------------------------------------------------
  def _analyse(self):
    flat = self.flat
    eqns = flat.eqns
    prod: dict[Any, int] = {}
    for i, e in enumerate(eqns):
      for o in e.outvars:
        if not _is_drop(o):
          prod[o] = i
    self.prod = prod
    bdep = set(self.batch_vars)
    for e in eqns:
      if any((not _is_lit(a)) and a in bdep for a in e.invars):
        bdep.update(o for o in e.outvars if not _is_drop(o))
    self.bdep = bdep
    leaf_of = {v: i for i, v in enumerate(self.param_vars)}
    self.leaf_of = leaf_of
    cache: dict = {}
    self._const_cache = cache
    # origin: var -> (leaf index, chain of eqn indices) for pure layout views of one leaf.
    origin: dict[Any, tuple[int, tuple[int, ...]]] = {v: (i, ()) for v, i in leaf_of.items()}
    for i, e in enumerate(eqns):
      name = e.primitive.name
      if name not in _SAME and name not in _MOVE:
        continue
      data = e.invars[0]
      if _is_lit(data) or data not in origin or len(e.outvars) != 1:
        continue
      if any(_const_eval(flat, prod, a, cache) is None for a in e.invars[1:]):
        continue
      leaf, chain = origin[data]
      origin[e.outvars[0]] = (leaf, chain + (i,))
    self.origin = origin
    sites: list[Site] = []
    self.computed_uses: dict[int, list[int]] = {}  # leaf -> matmul eqns with a computed weight
    for i, e in enumerate(eqns):
      if e.primitive.name not in _MATMULS:
        continue
      a, b = e.invars[0], e.invars[1]
      batch_a = (not _is_lit(a)) and a in bdep
      batch_b = (not _is_lit(b)) and b in bdep
      for w_pos, w, x_batch in ((1, b, batch_a), (0, a, batch_b)):
        if not x_batch or _is_lit(w) or w in bdep:
          continue
        if e.primitive.name in ("conv_general_dilated", "ragged_dot_general") and w_pos != 1:
          continue
        if w in origin:
          sites.append(self._site(i, e, w_pos, *origin[w]))
        elif w in flat.pdep:
          for leaf in self._leaves_of(w):
            self.computed_uses.setdefault(leaf, []).append(i)
        break
    self.sites = sites
    self._group_sites()
    self.index_uses = self._index_uses()

  def _index_uses(self) -> list[tuple[int, int, int]]:
    """`(batch leaf, params leaf, rows)` for every gather of a params leaf (an
    embedding lookup) whose indices come straight from a batch leaf."""
    out = []
    for e in self.flat.eqns:
      if e.primitive.name != "gather" or len(e.invars) < 2:
        continue
      op, idx = e.invars[0], e.invars[1]
      if _is_lit(op) or _is_lit(idx) or op not in self.origin or self.origin[op][1]:
        continue
      dims = tuple(e.params["dimension_numbers"].start_index_map)
      src = self._batch_source(idx)
      if src is None or len(dims) != 1:
        continue
      leaf = self.origin[op][0]
      out.append((src, leaf, int(self.leaf_avals[leaf].shape[dims[0]])))
    return out

  def _batch_source(self, var) -> int | None:
    found, seen, stack = set(), set(), [var]
    while stack:
      v = stack.pop()
      if _is_lit(v) or v in seen:
        continue
      seen.add(v)
      if v in self.batch_index:
        found.add(self.batch_index[v])
      elif v in self.bdep:
        e = self.flat.eqns[self.prod[v]]
        if e.primitive.name not in _INDEX_OPS:
          return None
        stack.extend(e.invars)
    return found.pop() if len(found) == 1 else None

  def _leaves_of(self, var) -> set[int]:
    out, stack, seen = set(), [var], set()
    while stack:
      v = stack.pop()
      if _is_lit(v) or v in seen:
        continue
      seen.add(v)
      if v in self.leaf_of:
        out.add(self.leaf_of[v])
      elif v in self.prod:
        stack.extend(self.flat.eqns[self.prod[v]].invars)
    return out

  def _site(self, i, e, w_pos, leaf, chain) -> Site:
    path = self.leaf_paths[leaf]
    kind = e.primitive.name
    conv = None
    if kind == "dot_general":
      (lc, rc), (lb, rb) = e.params["dimension_numbers"]
      w_contract = tuple(rc if w_pos == 1 else lc)
      x_contract = tuple(lc if w_pos == 1 else rc)
      site = Site(i, kind, path, leaf, w_pos, w_contract, x_contract, chain)
      # Batch dimensions shared with the input (experts of a dispatched MoE layer,
      # einsum("ecd,edf->ecf")): each slice is its own weight with its own inputs.
      site.w_batch = tuple(rb if w_pos == 1 else lb)
      site.x_batch = tuple(lb if w_pos == 1 else rb)
      return site
    if kind == "ragged_dot_general":
      rd = e.params["ragged_dot_dimension_numbers"]
      (lc, rc), (lb, rb) = rd.dot_dimension_numbers
      site = Site(i, kind, path, leaf, w_pos, tuple(rc), tuple(lc), chain)
      site.w_batch = tuple(rd.rhs_group_dimensions)
      site.gs_var = e.invars[2]
      x_aval = e.invars[0].aval
      if (lb or rb or len(x_aval.shape) != 2 or tuple(rd.lhs_ragged_dimensions) != (0,)
          or len(site.w_batch) != 1 or e.params.get("group_offset") is not None):
        site.error = (f"{path}: a ragged_dot_general other than jax.lax.ragged_dot's "
                      "(rows [m, k] grouped along m, weight [groups, k, n], no batch "
                      "dimensions, no group offset) is not supported")
      return site
    dn = e.params["dimension_numbers"]
    w_contract = (dn.rhs_spec[1],) + tuple(dn.rhs_spec[2:])
    site = Site(i, kind, path, leaf, w_pos, w_contract, (dn.lhs_spec[1],), chain)
    if int(e.params.get("feature_group_count", 1)) != 1 or int(
        e.params.get("batch_group_count", 1)) != 1:
      site.error = (f"{path} is a grouped / depthwise convolution (feature_group_count > 1): "
                    "not supported by calibrated methods; skip it with a rule")
    return site

  def _group_sites(self):
    eqns = self.flat.eqns
    groups: dict[Any, int] = {}
    sources: dict[tuple, int] = {}
    self.sources: list[_Source] = []
    self.group_roots: list[Any] = []
    self.group_sites: list[list[int]] = []
    for si, s in enumerate(self.sites):
      e = eqns[s.eqn_index]
      x = e.invars[1 - s.w_pos]
      chain: list[int] = []
      root = x
      while (not _is_lit(root)) and root in self.prod:
        pe = eqns[self.prod[root]]
        if pe.primitive.name not in _ROOT_OPS or len(pe.outvars) != 1:
          break
        src = pe.invars[0]
        if _is_lit(src) or src not in self.bdep:
          break
        chain.append(self.prod[root])
        root = src
      chain.reverse()
      if root not in groups:
        groups[root] = len(self.group_roots)
        self.group_roots.append(root)
        self.group_sites.append([])
      s.group = groups[root]
      self.group_sites[s.group].append(si)
      s.x_var = x
      s.x_chain = tuple(chain)

  # --------------------------------------------------------------------------
  def layout_of(self, site: Site) -> Layout | None:
    """Analyses (once) which leaf elements the site's weight operand reads."""
    if site.layout is not None or site.error is not None:
      return site.layout
    flat = self.flat
    shape = tuple(self.leaf_avals[site.leaf].shape)
    size = int(math.prod(shape))
    if size >= 2 ** 31:
      site.error = f"{site.path} has {size} elements, too many to map (int32 indices)"
      return None
    idx = jnp.arange(size, dtype=jnp.int32).reshape(shape)
    for ci in site.w_chain:
      e = flat.eqns[ci]
      if e.primitive.name in _SAME:
        continue
      rest = [_const_eval(flat, self.prod, a, self._const_cache) for a in e.invars[1:]]
      idx = e.primitive.bind(idx, *rest, **e.params)
    m_op = np.asarray(idx)
    if not site.w_batch:
      return self._slice_layout(site, m_op, site.w_contract, shape)
    # A sliced site (experts): analyse slice 0, then find the region of every slice.
    nb = len(site.w_batch)
    mb = np.moveaxis(m_op, site.w_batch, tuple(range(nb)))
    rest = [d for d in range(m_op.ndim) if d not in site.w_batch]
    lay = self._slice_layout(site, mb[(0,) * nb], tuple(rest.index(d) for d in site.w_contract),
                             shape)
    if lay is None:
      return None
    coords = np.unravel_index(mb.reshape(mb.shape[:nb] + (-1,)), shape)
    regions = []
    for b in np.ndindex(*mb.shape[:nb]):
      ok = all((coords[a][b] == coords[a][(0,) * nb]).all() for a in range(len(shape))
               if a not in lay.fixed)
      ok = ok and all((coords[a][b] == coords[a][b][0]).all() for a in lay.fixed)
      if not ok:
        site.layout = None
        site.error = (f"{site.path}: slice {b} of its batched matmul reads other elements "
                      "than slice 0 does, shifted along a stacking axis; a contraction the "
                      "capture cannot map")
        return None
      regions.append(tuple(int(coords[a][b][0]) for a in lay.fixed))
    if len(set(regions)) != len(regions):
      site.layout = None
      site.error = (f"{site.path}: several slices of its batched matmul read the same weight "
                    "slice (a weight broadcast over experts); a contraction the capture cannot "
                    "map")
      return None
    site.regions = regions
    return lay

  def _slice_layout(self, site: Site, m_op: np.ndarray, w_contract: tuple[int, ...],
                    shape: tuple[int, ...]) -> Layout | None:
    """The layout of the weight operand `m_op` (leaf element indices), contracted
    along its axes `w_contract`; sets `site.layout` and `site.k_src`, or `site.error`."""
    free_op = tuple(d for d in range(m_op.ndim) if d not in w_contract)
    k_op = int(math.prod(m_op.shape[d] for d in w_contract))
    n_op = int(math.prod(m_op.shape[d] for d in free_op))
    mat = np.transpose(m_op, w_contract + free_op).reshape(k_op, n_op)
    coords = np.unravel_index(mat, shape)
    contract, free, fixed = [], [], []
    for a in range(len(shape)):
      c = coords[a]
      vk = bool((c != c[:1, :]).any())
      vn = bool((c != c[:, :1]).any())
      if vk and vn:
        site.error = (f"{site.path}: axis {a} of the weight feeds both the contraction and the "
                      "output of its matmul; a contraction the capture cannot map")
        return None
      if vk:
        contract.append(a)
      elif vn or shape[a] == 1:
        free.append(a)  # a size-1 axis is an output axis of size 1
      else:
        fixed.append(a)
    region = tuple(int(coords[a][0, 0]) for a in fixed)
    own = [a for a in range(len(shape)) if a not in fixed]  # slice axis -> leaf axis
    slice_shape = tuple(shape[a] for a in own)
    lc = tuple(own.index(a) for a in contract)
    lf = tuple(own.index(a) for a in free)
    k = int(math.prod(slice_shape[a] for a in lc))
    n = int(math.prod(slice_shape[a] for a in lf))
    if k != k_op or n != n_op:
      site.error = (f"{site.path}: the matmul reads {k_op}x{n_op} values of a {k}x{n} slice "
                    "(repeated or partial elements); a contraction the capture cannot map")
      return None
    kleaf = (np.ravel_multi_index([coords[a][:, 0] for a in contract],
                                  [shape[a] for a in contract]) if contract else
             np.zeros(k_op, np.int64))
    if sorted(kleaf.tolist()) != list(range(k)):
      site.error = f"{site.path}: the contraction does not cover the weight's input axes once"
      return None
    site.layout = Layout(shape, region, lc, lf, tuple(fixed))
    if np.array_equal(kleaf, np.arange(k)):
      site.k_src = None
    else:
      src = np.empty(k, np.int64)
      src[kleaf] = np.arange(k)
      site.k_src = src
    return site.layout

  def summary(self) -> str:
    """One line per site: path, layer slice, contraction, group."""
    lines = [f"{len(self.sites)} matmul sites in {len(self.group_roots)} input groups "
             f"({len(self.flat.eqns)} equations)"]
    for s in self.sites:
      lay = s.layout
      desc = (f"K={lay.k} N={lay.n}" + (f" slice {lay.region} of axes {lay.fixed}"
                                          if lay.region else "")
              if lay is not None else (s.error or "not analysed"))
      lines.append(f"  group {s.group:3d}  {s.kind:20s} {s.path}  {desc}")
    return "\n".join(lines)


def trace(fn: Callable[[Any, Any], Any], params: Any, batch: Any) -> Capture:
  """Traces `fn(params, batch)` once and finds its matmul sites (see module docstring)."""
  return Capture(fn, params, batch)


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class InputStats:
  """Statistics of a weight's matmul input, in the weight's K order.

  `count`: rows (tokens, or conv output positions) seen; `xtx`: `sum x x^T`
  `[K, K]` float32; `sum_abs` / `sum_sq`: per-feature sums; `lo` / `hi`:
  per-feature min / max; `sample`: a bounded, evenly strided sample of rows
  `[S, K]`. Fields a method did not ask for are None.
  """

  count: float
  xtx: np.ndarray | jax.Array | None = None
  sum_abs: jax.Array | None = None
  sum_sq: jax.Array | None = None
  lo: jax.Array | None = None
  hi: jax.Array | None = None
  sample: jax.Array | None = None

  def hessian(self) -> jax.Array:
    """GPTQ's `H = 2 X^T X / n`."""
    if self.xtx is None:
      raise ValueError("the Hessian was not collected (the method did not ask for 'hessian')")
    return 2.0 * jnp.asarray(self.xtx) / max(self.count, 1.0)

  @property
  def absmean(self) -> jax.Array:
    return jnp.asarray(self.sum_abs) / max(self.count, 1.0)

  @property
  def sqmean(self) -> jax.Array:
    return jnp.asarray(self.sum_sq) / max(self.count, 1.0)

  @property
  def absmax(self) -> jax.Array:
    return jnp.maximum(jnp.abs(jnp.asarray(self.lo)), jnp.abs(jnp.asarray(self.hi)))

  def act_stat(self, scale: jax.Array | None = None):
    """As an `activations.ActStat` (optionally of the input divided by `scale`)."""
    from quantjax.methods import activations as act_lib
    if self.lo is None:
      raise ValueError("activation ranges were not collected (the method did not ask for 'range')")
    lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
    am = jnp.asarray(self.sum_abs) / max(self.count, 1.0) if self.sum_abs is not None else \
        jnp.zeros_like(lo)
    sample = jnp.zeros((0, lo.shape[0]), jnp.float32) if self.sample is None else \
        jnp.asarray(self.sample)
    if scale is not None:
      s = jnp.asarray(scale, jnp.float32)
      lo, hi, am, sample = lo / s, hi / s, am / s, sample / s[None, :]
    return act_lib.ActStat(lo=lo, hi=hi, absmean=am, count=jnp.asarray(self.count, jnp.float32),
                           sample=sample)

  def take(self, slot: int) -> "InputStats":
    """Slice `slot` of statistics collected per slice (experts; leading axis)."""
    pick = lambda a: None if a is None else a[slot]  # noqa: E731
    return InputStats(count=float(np.asarray(self.count)[slot]), xtx=pick(self.xtx),
                      sum_abs=pick(self.sum_abs), sum_sq=pick(self.sum_sq), lo=pick(self.lo),
                      hi=pick(self.hi))

  @staticmethod
  def merge(stats: Sequence["InputStats"]) -> "InputStats":
    """Statistics of several matmuls that read one weight (summed / min / max / joined)."""
    if len(stats) == 1:
      return stats[0]

    def red(name, fn):
      vals = [getattr(s, name) for s in stats]
      return None if any(v is None for v in vals) else fn(vals)
    add = lambda vs: sum(jnp.asarray(v) for v in vs[1:]) + jnp.asarray(vs[0])  # noqa: E731
    return InputStats(
        count=float(sum(s.count for s in stats)), xtx=red("xtx", add), sum_abs=red("sum_abs", add),
        sum_sq=red("sum_sq", add),
        lo=red("lo", lambda vs: jnp.min(jnp.stack(vs), 0)),
        hi=red("hi", lambda vs: jnp.max(jnp.stack(vs), 0)),
        sample=red("sample", lambda vs: jnp.concatenate(vs, 0)))


def _stat_init(k: int, needs: frozenset, n_slices: int = 0) -> dict[str, jax.Array]:
  if n_slices:  # one set of statistics per slice (expert), stacked
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n_slices,) + a.shape),
                        _stat_init(k, needs))
  acc = {"count": jnp.zeros((), jnp.float32)}
  if "hessian" in needs:
    acc["xtx"] = jnp.zeros((k, k), jnp.float32)
  if "absmean" in needs:
    acc["sum_abs"] = jnp.zeros((k,), jnp.float32)
  if "sqmean" in needs:
    acc["sum_sq"] = jnp.zeros((k,), jnp.float32)
  if "range" in needs:
    acc["lo"] = jnp.full((k,), jnp.inf, jnp.float32)
    acc["hi"] = jnp.full((k,), -jnp.inf, jnp.float32)
  return acc


def _stat_update(acc: dict, f: jax.Array, needs: frozenset, n_sample: int):
  """Adds feature rows `f` `[T, K]`; returns (acc, sample rows, non-finite count)."""
  f = f.astype(jnp.float32)
  out = dict(acc)
  out["count"] = acc["count"] + jnp.asarray(f.shape[0], jnp.float32)
  bad = jnp.sum(~jnp.isfinite(f)).astype(jnp.int32)
  if "xtx" in acc:
    out["xtx"] = acc["xtx"] + jnp.einsum("ni,nj->ij", f, f, precision=jax.lax.Precision.HIGHEST)
  if "sum_abs" in acc:
    out["sum_abs"] = acc["sum_abs"] + jnp.sum(jnp.abs(f), 0)
  if "sum_sq" in acc:
    out["sum_sq"] = acc["sum_sq"] + jnp.sum(f * f, 0)
  if "lo" in acc:
    out["lo"] = jnp.minimum(acc["lo"], jnp.min(f, 0))
    out["hi"] = jnp.maximum(acc["hi"], jnp.max(f, 0))
  sample = None
  if n_sample > 0:
    stride = max(1, f.shape[0] // n_sample)
    sample = f[::stride][:n_sample]
  return out, sample, bad


def _stat_update_sliced(acc: dict, f: jax.Array, w: jax.Array, needs: frozenset):
  """Adds the rows of each slice: `f` `[S, T, K]` (or `[T, K]` shared by every slice, a
  ragged_dot's rows), `w` `[S, T]` 0/1: the rows each slice reads (the tokens routed to
  an expert). Returns (acc, None, non-finite count)."""
  f = f.astype(jnp.float32)
  w = w.astype(jnp.float32)
  shared = f.ndim == 2
  out = dict(acc)
  out["count"] = acc["count"] + jnp.sum(w, -1)
  bad = jnp.sum(~jnp.isfinite(f)).astype(jnp.int32)
  hi_p = jax.lax.Precision.HIGHEST
  if "xtx" in acc:
    out["xtx"] = acc["xtx"] + (
        jnp.einsum("ti,st,tj->sij", f, w, f, precision=hi_p) if shared else
        jnp.einsum("sti,st,stj->sij", f, w, f, precision=hi_p))
  af = jnp.abs(f)
  if "sum_abs" in acc:
    out["sum_abs"] = acc["sum_abs"] + (jnp.einsum("ti,st->si", af, w) if shared else
                                       jnp.einsum("sti,st->si", af, w))
  if "sum_sq" in acc:
    out["sum_sq"] = acc["sum_sq"] + (jnp.einsum("ti,st->si", f * f, w) if shared else
                                     jnp.einsum("sti,st->si", f * f, w))
  if "lo" in acc:
    fb = jnp.broadcast_to(f, w.shape + f.shape[-1:])
    on = (w > 0)[..., None]
    out["lo"] = jnp.minimum(acc["lo"], jnp.min(jnp.where(on, fb, jnp.inf), 1))
    out["hi"] = jnp.maximum(acc["hi"], jnp.max(jnp.where(on, fb, -jnp.inf), 1))
  return out, None, bad


def _slice_rows(f: jax.Array, gs: jax.Array | None) -> jax.Array:
  """`[S, T]` 0/1: which rows of a sliced source's features each slice reads. A
  ragged_dot's group g reads rows `[sum(gs[:g]), sum(gs[:g+1]))`; a batched matmul's
  slice reads its own rows, of which all-zero ones (empty capacity slots of a
  dispatch) are not counted."""
  if gs is not None:
    ends = jnp.cumsum(gs.astype(jnp.int32))
    starts = ends - gs.astype(jnp.int32)
    r = jnp.arange(f.shape[0])[None, :]
    return ((r >= starts[:, None]) & (r < ends[:, None])).astype(jnp.float32)
  return jnp.any(f != 0, axis=-1).astype(jnp.float32)


def _features(x: jax.Array, src: _Source) -> jax.Array:
  """The input operand `x` as `[T, K]` features in the weight's K order (`[S, T, K]`
  for a batched source: one row set per slice)."""
  if src.x_batch:
    keep = [d for d in range(x.ndim) if d not in src.x_contract and d not in src.x_batch]
    xt = jnp.transpose(x, list(src.x_batch) + keep + list(src.x_contract))
    f = xt.reshape(src.n_slices, -1, src.k)
    if src.k_src is not None:
      f = jnp.take(f, jnp.asarray(src.k_src), axis=2)
    return f
  if src.kind in ("dot_general", "ragged_dot_general"):
    keep = [d for d in range(x.ndim) if d not in src.x_contract]
    f = jnp.transpose(x, keep + list(src.x_contract)).reshape(-1, src.k)
  else:
    c = src.conv
    patches = jax.lax.conv_general_dilated_patches(
        x, filter_shape=c["filter_shape"], window_strides=c["window_strides"],
        padding=c["padding"], lhs_dilation=c["lhs_dilation"], rhs_dilation=c["rhs_dilation"],
        dimension_numbers=c["dimension_numbers"], precision=jax.lax.Precision.HIGHEST)
    f = jnp.moveaxis(patches, c["dimension_numbers"].out_spec[1], -1).reshape(-1, src.k)
  if src.k_src is not None:
    f = jnp.take(f, jnp.asarray(src.k_src), axis=1)
  return f


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
    from quantjax.numerics.formats import resolve_format
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
    from quantjax.numerics.formats import resolve_format
    fmt = resolve_format(fmt)
    if fmt.is_cast:
      return fmt
    self.leaf_format(fmt)  # the same checks
    return fmt.replace(channel_axis=-1, group_axis=0)

  def qarray_from_matrix(self, qm: Any) -> Any:
    """A QArray of the `[K, N]` matrix (in `matrix_format`) as one of this weight's
    layout (in `leaf_format`), the same codes and scales."""
    from quantjax.numerics.qarray import QArray
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


# ----------------------------------------------------------------------------
# Segments.
# ----------------------------------------------------------------------------

def _splice(out_eqns: list, fn: Callable, ins: Sequence[Any], const_in: list,
            const_vals: list) -> list[Any]:
  """Traces `fn(*ins)` and appends its equations (renamed) to `out_eqns`.

  Constants of the trace become new segment inputs (`const_in`, `const_vals`).
  """
  avals = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in ins]
  closed = jax.make_jaxpr(fn)(*avals)
  env = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    nv = jcore.Var(jax.typeof(c))
    const_in.append(nv)
    const_vals.append(c)
    env[v] = nv
  for v, a in zip(closed.jaxpr.invars, ins):
    env[v] = a

  def read(a):
    return a if _is_lit(a) else env[a]
  for e in closed.jaxpr.eqns:
    outs = [_Flat.fresh(v) for v in e.outvars]
    out_eqns.append(e.replace(invars=[read(a) for a in e.invars], outvars=outs))
    for v, o in zip(e.outvars, outs):
      if not _is_drop(v):
        env[v] = o
  return [read(a) for a in closed.jaxpr.outvars]


class _Transform:
  """How a site's input is changed to reproduce a quantized leaf's activation quantization.

  The site keeps multiplying by the leaf's effective float weight (`deq / s`),
  so the input becomes `s * fq(x / s)`.
  """

  def __init__(self, kind: str, fmt: Any, s_k: jax.Array | None, scale: jax.Array | None,
               zp: jax.Array | None):
    self.kind, self.fmt, self.s_k, self.scale, self.zp = kind, fmt, s_k, scale, zp

  def key(self):
    return (self.kind, self.fmt, self.s_k is not None,
            None if self.scale is None else tuple(self.scale.shape),
            None if self.zp is None else (tuple(self.zp.shape), str(self.zp.dtype)))

  def data(self) -> list[jax.Array]:
    return [a for a in (self.s_k, self.scale, self.zp) if a is not None]

  def apply(self, x2: jax.Array, data: list[jax.Array]) -> jax.Array:
    """`x2` `[T, K]` (operand order)."""
    from quantjax import ops
    from quantjax.numerics import qarray as qarray_lib
    it = iter(data)
    s = next(it) if self.s_k is not None else None
    xf = x2.astype(jnp.float32)
    if s is not None:
      xf = xf / s[None, :]
    if self.kind == "dynamic":
      q = ops.quantize_activation(xf, self.fmt)
      xf = q.dequantize(jnp.float32).reshape(xf.shape)
    else:
      scale = next(it)
      zp = next(it) if self.zp is not None else None
      xf = qarray_lib.quantize_with_scale(xf, self.fmt, scale, zp).dequantize(jnp.float32)
    if s is not None:
      xf = xf * s[None, :]
    return xf.astype(x2.dtype)


def _site_transform(leaf_value: Any, layout: Layout, site: Site) -> _Transform | None:
  """The input transform a quantized leaf part implies at one of its sites (or None)."""
  from quantjax.methods import activations as act_lib
  from quantjax.numerics.qarray import ActQuantized, InputScaled
  s_k = None
  w = leaf_value
  if isinstance(w, InputScaled):
    s_k = layout.leaf_vector_to_k(w.scale)
    w = w.weight
  if not isinstance(w, ActQuantized):
    return None
  if site.kind != "dot_general":
    raise ValueError(f"{site.path}: activation quantization of a convolution's input is not "
                     "supported")
  if s_k is not None and site.k_src is not None:
    s_k = jnp.take(s_k, jnp.argsort(jnp.asarray(site.k_src)))  # to operand order
  elif s_k is not None:
    s_k = jnp.asarray(s_k)
  if isinstance(w, act_lib.StaticActQuantized):
    fmt = w.input_format
    scale = jnp.asarray(w.act_scale)
    zp = None if w.act_zero_point is None else jnp.asarray(w.act_zero_point)
    if scale.size > 1:
      if site.k_src is not None:
        inv = jnp.argsort(jnp.asarray(site.k_src))
        scale = jnp.take(scale.reshape(-1), inv).reshape(scale.shape)
        zp = None if zp is None else jnp.take(zp.reshape(-1), inv).reshape(zp.shape)
    return _Transform("static", fmt, None if s_k is None else s_k.astype(jnp.float32), scale, zp)
  from quantjax.numerics.formats import resolve_format
  return _Transform("dynamic", resolve_format(w.act_format),
                    None if s_k is None else s_k.astype(jnp.float32), None, None)


def _apply_transform_to_operand(t: _Transform, x, x_contract, data):
  keep = [d for d in range(x.ndim) if d not in x_contract]
  perm = keep + list(x_contract)
  xt = jnp.transpose(x, perm)
  lead = xt.shape[:len(keep)]
  x2 = xt.reshape(int(math.prod(lead)) if lead else 1, -1)
  y = t.apply(x2, data).reshape(xt.shape)
  return jnp.transpose(y, np.argsort(perm))


def _params_key(eqns) -> tuple:
  """Identities of constants hidden inside equation params (bodies of opaque
  `cond` / `scan` / `while`): equal printed jaxprs with other constants must not
  share a compiled segment."""
  out = []
  for e in eqns:
    for v in e.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jcore.ClosedJaxpr) and sub.consts:
          out.append(tuple(id(c) for c in sub.consts))
  return tuple(out)


@dataclasses.dataclass
class _Segment:
  fn: Any
  env_in: list[Any]
  env_out: list[Any]
  weights_in: list[tuple[int, tuple[int, ...] | None]]  # (leaf, region or None for whole)
  const_vals: list[Any]
  transform_data: list[Any]
  sources: list[int]
  acc_names: list[list[str]]
  n_sample: int


class _Runner:
  """Builds the compiled segments of a capture (cached by structure)."""

  def __init__(self, cap: Capture, virtual_uses: dict[Any, int],
               compiled: dict[Any, Any] | None = None):
    self.cap = cap
    self.last_use: dict[Any, int] = {}
    for i, e in enumerate(cap.flat.eqns):
      for a in e.invars:
        if not _is_lit(a):
          self.last_use[a] = i
    for v, pos in virtual_uses.items():
      self.last_use[v] = max(self.last_use.get(v, -1), pos)
    self.cache: dict[Any, Any] = {}
    # Compiled segments by structure; shared between calls when the caller passes one
    # (identical layers calibrated one call at a time compile once).
    self.compiled: dict[Any, Any] = {} if compiled is None else compiled
    self.compiles = 0

  def _order(self, v):
    cap = self.cap
    if v in cap.batch_set:
      return (-1, cap.batch_index[v])
    e = cap.flat.eqns[cap.prod[v]]
    return (cap.prod[v], e.outvars.index(v))

  def _static(self, var, needed: set, weights: dict, consts: dict) -> None:
    """Collects the static sub-DAG producing `var`; leaves, layer slices of
    leaves and constants become segment inputs."""
    cap, flat = self.cap, self.cap.flat
    stack = [var]
    while stack:
      v = stack.pop()
      if _is_lit(v) or v in needed or v in weights or v in consts:
        continue
      if v in cap.leaf_of:
        weights[v] = (cap.leaf_of[v], None)
      elif v in flat._const_index:
        consts[v] = flat._const_index[v]
      elif v in flat.regions and (not _is_lit(flat.regions[v][0])) and \
          flat.regions[v][0] in cap.leaf_of:
        src, i = flat.regions[v]
        weights[v] = (cap.leaf_of[src], (i,))
      elif v not in flat.pdep and flat.eqns[cap.prod[v]].primitive.name not in _CHEAP:
        # A value of no batch and no params (RoPE tables, masks): computed once and
        # passed in, instead of recomputed by every segment of every layer.
        consts[v] = self._folded(v)
      else:
        needed.add(v)
        stack.extend(flat.eqns[cap.prod[v]].invars)

  def _folded(self, v):
    key = ("folded", v)
    if key not in self.cache:
      self.cache[key] = jnp.asarray(_const_eval(self.cap.flat, self.cap.prod, v,
                                                self.cap._const_cache))
    return self.cache[key]

  def build(self, lo: int, hi: int, sources: list[int], needs: frozenset, n_sample: int,
            transforms: Mapping[int, _Transform]) -> _Segment:
    cap, flat = self.cap, self.cap.flat
    eqns, bdep = flat.eqns, cap.bdep
    live_out = sorted({v for v, u in self.last_use.items()
                       if v in bdep and u >= hi and (v in cap.batch_set or cap.prod[v] < hi)},
                      key=self._order)
    needed = set(live_out) | {cap.sources[si].root for si in sources}
    needed |= {cap.sources[si].gs_var for si in sources
               if cap.sources[si].gs_var is not None and cap.sources[si].gs_var in bdep}
    include = []
    for i in range(hi - 1, lo - 1, -1):
      outs = [o for o in eqns[i].outvars if not _is_drop(o)]
      if any(o in needed for o in outs) and any(o in bdep for o in outs):
        include.append(i)
        needed.update(a for a in eqns[i].invars if not _is_lit(a))
    include.reverse()
    chains = [ci for si in sources for ci in cap.sources[si].chain]
    env_in = sorted({v for v in needed if v in bdep and (v in cap.batch_set or cap.prod[v] < lo)},
                    key=self._order)
    st_needed: set = set()
    weights: dict[Any, tuple[int, Any]] = {}
    consts: dict[Any, int] = {}
    for i in include + chains:
      for a in (eqns[i].invars if i in include else eqns[i].invars[1:]):
        if not _is_lit(a) and a not in bdep:
          self._static(a, st_needed, weights, consts)
    for si in sources:
      gs = cap.sources[si].gs_var
      if gs is not None and not _is_lit(gs) and gs not in bdep:
        self._static(gs, st_needed, weights, consts)
    w_vars = sorted(weights, key=lambda v: (weights[v][0], weights[v][1] or ()))
    c_vars = sorted(consts, key=lambda v: (0, consts[v]) if isinstance(consts[v], int) else
                    (1, cap.prod[v]))
    seg_eqns = [eqns[i] for i in sorted({cap.prod[v] for v in st_needed})]
    const_in = list(c_vars)
    const_vals = [flat.consts[consts[v]] if isinstance(consts[v], int) else consts[v]
                  for v in c_vars]
    data_in: list[Any] = []
    data_vals: list[Any] = []
    tkeys = []
    site_at = {cap.sites[si].eqn_index: si for si in transforms}
    for i in include:
      e = eqns[i]
      si = site_at.get(i)
      if si is None:
        seg_eqns.append(e)
        continue
      t, site = transforms[si], cap.sites[si]
      dvars = [jcore.Var(jax.typeof(d)) for d in t.data()]
      data_in.extend(dvars)
      data_vals.extend(t.data())
      tkeys.append((i - lo, t.key()))
      x = e.invars[1 - site.w_pos]

      def tf(xx, *dd, _t=t, _c=site.x_contract):
        return _apply_transform_to_operand(_t, xx, _c, list(dd))
      (x2,) = _splice(seg_eqns, tf, [x] + dvars, const_in, const_vals)
      ins = list(e.invars)
      ins[1 - site.w_pos] = x2
      seg_eqns.append(e.replace(invars=ins))
    acc_in, acc_out, bad_out, sample_out, acc_names = [], [], [], [], []
    for si in sources:
      src = cap.sources[si]
      acc0 = _stat_init(src.k, needs, src.n_slices)
      names = sorted(acc0)
      acc_names.append(names)
      a_in = [jcore.Var(jax.typeof(acc0[n])) for n in names]
      acc_in.extend(a_in)
      x = src.root
      for ci in src.chain:
        ce = eqns[ci]
        nv = _Flat.fresh(ce.outvars[0])
        seg_eqns.append(ce.replace(invars=[x] + list(ce.invars[1:]), outvars=[nv]))
        x = nv

      extra = [src.gs_var] if src.gs_var is not None else []

      def upd(xv, *rest, _src=src, _names=names, _ng=len(extra)):
        acc = dict(zip(_names, rest[_ng:]))
        f = _features(xv, _src)
        if _src.sliced:
          gs = rest[0] if _ng else None
          new, sample, bad = _stat_update_sliced(acc, f, _slice_rows(f, gs), needs)
        else:
          new, sample, bad = _stat_update(acc, f, needs, n_sample)
        return tuple([new[n] for n in _names] + [bad] + ([sample] if sample is not None else []))
      outs = _splice(seg_eqns, upd, [x] + extra + a_in, const_in, const_vals)
      acc_out.extend(outs[:len(names)])
      bad_out.append(outs[len(names)])
      if n_sample:
        sample_out.append(outs[len(names) + 1])
    invars = env_in + w_vars + const_in + data_in + acc_in
    outvars = live_out + acc_out + bad_out + sample_out
    effects = frozenset().union(*[e.effects for e in seg_eqns]) if seg_eqns else frozenset()
    dbg = DebugInfo("quantjax calibration segment", f"equations {lo}:{hi}",
                    tuple(f"in{i}" for i in range(len(invars))),
                    tuple(f"out{i}" for i in range(len(outvars))))
    jaxpr = jcore.Jaxpr([], invars, outvars, seg_eqns, effects, dbg)
    key = (str(jaxpr), _params_key(seg_eqns), tuple(tkeys))
    fn = self.compiled.get(key)
    if fn is None:
      fn = _scan_over_batches(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, [])), len(env_in),
                              len(invars) - len(env_in) - len(acc_in), len(acc_in),
                              len(live_out))
      self.compiled[key] = fn
      self.compiles += 1
    return _Segment(fn=fn, env_in=env_in, env_out=live_out,
                    weights_in=[weights[v] for v in w_vars], const_vals=const_vals,
                    transform_data=data_vals, sources=list(sources), acc_names=acc_names,
                    n_sample=n_sample)


def _scan_over_batches(raw: Callable, n_env: int, n_static: int, n_acc: int, n_env_out: int):
  """One compiled call per segment for all batches: a `lax.scan` over the stacked
  environments `[n_batches, ...]`, the statistics carried across batches.

  Against one call per batch this allocates the segment's temporaries once
  (XLA reuses the loop body's buffers), which on CPU saves the page faults of
  fresh buffers in every call (measured: 160 MB of faults per attention call).
  """
  def run(env, static, accs):
    n = env[0].shape[0] if env else 1

    def body(acc, env_b):
      outs = raw(*env_b, *static, *acc)
      return list(outs[n_env_out:n_env_out + n_acc]), (list(outs[:n_env_out]),
                                                        list(outs[n_env_out + n_acc:]))
    accs, (env_out, rest) = jax.lax.scan(body, list(accs), list(env), length=n)
    return env_out, accs, rest
  del n_env, n_static
  return jax.jit(run, donate_argnums=(2,))


def _run_segment(seg: _Segment, state: "_State", env: list[Any], env_vars: list[Any],
                 accs: list[list[Any]], batch0: int, cap: Capture,
                 weights: list[Any] | None = None):
  """Runs `seg` on the stacked environments `[n_batches, ...]`.

  Returns (new stacked environment, accumulators, samples per source).
  """
  if weights is None:
    weights = [state.weight_input(li, reg) for li, reg in seg.weights_in]
  pos = {v: i for i, v in enumerate(env_vars)}
  flat_acc = [x for a in accs for x in a]
  env_out, flat_acc, rest = seg.fn([env[pos[v]] for v in seg.env_in],
                                   [*weights, *seg.const_vals, *seg.transform_data], flat_acc)
  ns = len(seg.sources)
  o = 0
  accs = []
  for names in seg.acc_names:
    accs.append(list(flat_acc[o:o + len(names)]))
    o += len(names)
  bads = rest[:ns]
  samples = [[r.reshape(-1, r.shape[-1])] for r in rest[ns:]] if seg.n_sample else \
      [[] for _ in seg.sources]
  for j, si in enumerate(seg.sources):
    counts = np.asarray(bads[j]).reshape(-1)
    if counts.any():
      b = int(np.argmax(counts > 0))
      names = sorted({s.path for s in cap.sites if s.source == si})
      raise ValueError(
          f"calibration batch {batch0 + b}: the input of {', '.join(names[:3])} holds "
          f"{int(counts[b])} NaN/Inf value(s) ({int((counts > 0).sum())} of {len(counts)} "
          "batches affected); check the batch and the layers before it (token ids beyond the "
          "vocabulary, overflowing activations)")
  return list(env_out), accs, samples


class _DiskStack:
  """A stacked `[n, ...]` array held in a file, one record per calibration batch.

  Records are read and written with positioned I/O, not memory-mapped: the data
  lives in the page cache (reclaimable), never in this process's resident memory.
  """

  def __init__(self, spill: "_Spill", shape: Sequence[int], dtype: Any):
    fd, self.path = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=spill.directory)
    self.fd: int | None = fd
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    self.rec = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
    spill.stacks.append(self)

  def put(self, b: int, x: Any) -> None:
    a = np.ascontiguousarray(np.asarray(x), self.dtype).reshape(-1).view(np.uint8)
    view, off = memoryview(a), b * self.rec
    try:
      while view.nbytes:
        n = os.pwrite(self.fd, view, off)
        view, off = view[n:], off + n
    except OSError as e:
      raise OSError(e.errno, f"writing calibration activations (batch {b}) to {self.path}: "
                    f"{e.strerror}") from None

  def get(self, b: int) -> np.ndarray:
    """Batch `b` as `[1, ...]`."""
    out = np.empty((1,) + self.shape, self.dtype)
    view, off = memoryview(out.reshape(-1).view(np.uint8)), b * self.rec
    while view.nbytes:
      n = os.preadv(self.fd, [view], off)
      if n <= 0:
        raise OSError(f"{self.path}: calibration activations of batch {b} are cut short")
      view, off = view[n:], off + n
    return out

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass


@dataclasses.dataclass
class _Spill:
  """Where `calibrate(activation_limit=...)` keeps activations above the limit."""
  limit: int
  directory: str
  made_dir: bool
  stacks: list = dataclasses.field(default_factory=list)
  spilled_bytes: int = 0

  @staticmethod
  def open(limit: int | None, directory: Any) -> "_Spill | None":
    if limit is None:
      return None
    if int(limit) < 0:
      raise ValueError(f"activation_limit must be a number of bytes >= 0, got {limit!r}")
    if directory is None:
      return _Spill(int(limit), tempfile.mkdtemp(prefix="quantjax-activations-"), True)
    directory = os.fspath(directory)
    made = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    return _Spill(int(limit), directory, made)

  def close(self) -> None:
    """Deletes the files this spill made (nothing else), and its directory if it made it."""
    for s in self.stacks:
      s.close()
    self.stacks.clear()
    if self.made_dir:
      try:
        os.rmdir(self.directory)
      except OSError:
        pass


def _env_bytes(n: int, avals: Sequence[Any]) -> int:
  return n * sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                 for a in avals)


def _env_batch(x: Any, b: int) -> Any:
  return x.get(b) if isinstance(x, _DiskStack) else x[b:b + 1]


def _run_batched(seg: _Segment, state: "_State", envs: list[Any], env_vars: list[Any],
                 accs: list[list[Any]], n: int, cap: Capture, spill: _Spill):
  """`_run_segment` one batch at a time: inputs read per batch (from memory or disk),
  outputs kept on disk when their stack exceeds the spill limit. Same equations, same
  accumulation order as the stacked call."""
  weights = [state.weight_input(li, reg) for li, reg in seg.weights_in]
  avals = [v.aval for v in seg.env_out]
  to_disk = _env_bytes(n, avals) > spill.limit
  outs: list[Any] = ([_DiskStack(spill, a.shape, a.dtype) for a in avals] if to_disk
                     else [[] for _ in avals])
  samples: list[list[Any]] = [[] for _ in seg.sources]
  for b in range(n):
    env_b, accs, smp = _run_segment(seg, state, [_env_batch(x, b) for x in envs], env_vars,
                                    accs, b, cap, weights)
    for j, o in enumerate(env_b):
      if to_disk:
        outs[j].put(b, o[0])
      else:
        outs[j].append(o)
    for j in range(len(seg.sources)):
      samples[j].extend(smp[j])
    del env_b
  if to_disk:
    spill.spilled_bytes += _env_bytes(n, avals)
  else:
    outs = [jnp.concatenate(o) for o in outs]
  for x in envs:  # the inputs are done with (a value carried on was copied into outs)
    if isinstance(x, _DiskStack):
      x.close()
  return outs, accs, samples


def _from_process_0(tree: Any) -> Any:
  """`tree` as process 0 has it, on every jax.distributed process (bitwise: the leaves
  travel as raw bytes in one broadcast; every process must pass the same structure)."""
  from jax.experimental import multihost_utils
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if not leaves:
    return tree
  arrays = [np.ascontiguousarray(np.asarray(x)) for x in leaves]
  raw = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays])
  words = np.zeros((-(-raw.size // 4),), np.uint32)
  words.view(np.uint8)[:raw.size] = raw
  got = np.asarray(multihost_utils.broadcast_one_to_all(words)).astype(np.uint32)
  raw = got.view(np.uint8)[:raw.size]
  out, o = [], 0
  for a in arrays:
    out.append(jnp.asarray(raw[o:o + a.nbytes].view(a.dtype).reshape(a.shape)))
    o += a.nbytes
  return jax.tree_util.tree_unflatten(treedef, out)


def _finalize_stats(acc_names, acc, samples, max_samples) -> InputStats:
  a = dict(zip(acc_names, acc))
  count = np.asarray(a["count"])
  st = InputStats(count=float(count) if count.ndim == 0 else count, xtx=a.get("xtx"),
                  sum_abs=a.get("sum_abs"),
                  sum_sq=a.get("sum_sq"), lo=a.get("lo"), hi=a.get("hi"))
  if samples:
    st.sample = jnp.concatenate(samples, 0)[:max_samples]
  return st


# ----------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class CalibrationResult:
  """What `calibrate` returns.

  Attributes:
    params: the params tree with the method's leaves in place.
    report: the `RuleReport` of the rules over the tree.
    parts: the `Part`s the method changed (statistics dropped).
    info: the method's records (AWQ errors, pruning masks, ...) and timings:
      `stats_seconds` (the forward segments with their statistics),
      `quant_seconds` (the method), `compiles`, `groups`, `mode`, `seconds`.
  """

  params: Any
  report: rules_lib.RuleReport
  parts: list[Part]
  info: dict[str, Any]


def _check_batches(cap: Capture, batches: list[Any]) -> None:
  for i, b in enumerate(batches):
    leaves, td = jax.tree_util.tree_flatten(b)
    if td != cap.batch_treedef:
      raise ValueError(f"calibration batch {i} has structure {td}, batch 0 has "
                       f"{cap.batch_treedef}; every batch must have the same structure")
    for j, (leaf, aval) in enumerate(zip(leaves, cap.batch_avals)):
      if tuple(np.shape(leaf)) != tuple(aval.shape) or jnp.result_type(leaf) != aval.dtype:
        raise ValueError(
            f"calibration batch {i} (leaf {j}) has shape {tuple(np.shape(leaf))} "
            f"{jnp.result_type(leaf)}, batch 0 has {tuple(aval.shape)} {aval.dtype}; "
            "calibration batches must all have one shape (the program is traced once): "
            "pad, drop or re-batch the odd one")


def _check_indices(cap: Capture, batches: list[Any]) -> None:
  """Ids that index a params leaf (token ids into an embedding) lie inside it."""
  for j, leaf, rows in getattr(cap, "index_uses", ()):
    for i, b in enumerate(batches):
      ids = np.asarray(jax.tree_util.tree_leaves(b)[j])
      if not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        continue
      bad = (ids >= rows) | (ids < -rows)
      if bad.any():
        at = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"calibration batch {i}: {int(bad.sum())} ids lie outside [0, {rows}) (values in "
            f"[{int(ids.min())}, {int(ids.max())}]; first {int(ids[at])} at index {at}) but "
            f"they index {cap.leaf_paths[leaf]}, which has {rows} rows: token ids beyond the "
            "vocabulary")


def _last_reads(cap: Capture) -> dict[int, int]:
  """For each params leaf, the index of the last batch-dependent equation that reads a
  value computed from it alone (the leaf, a view, a slice, a cast): after a segment ending
  before that index no later segment needs the leaf."""
  flat = cap.flat
  leaves_of: dict[Any, frozenset] = {v: frozenset((i,)) for v, i in cap.leaf_of.items()}
  last: dict[int, int] = {}
  for i, e in enumerate(flat.eqns):
    ins: frozenset = frozenset()
    for a in e.invars:
      if not _is_lit(a) and a in leaves_of:
        ins = ins | leaves_of[a]
    if not ins:
      continue
    if any(not _is_drop(o) and o in cap.bdep for o in e.outvars):
      for li in ins:
        last[li] = i
    else:  # a params-only value: carries its leaves to whatever reads it
      for o in e.outvars:
        if not _is_drop(o):
          leaves_of[o] = ins
  return last


def _starved_parts(parts: Sequence[Part], min_tokens: int, starved: str, method: Any,
                   record: dict) -> dict:
  """Round-to-nearest results for the parts (slices of batched / ragged matmuls: experts)
  that fewer than `min_tokens` calibration rows reached; see `calibrate`."""
  few = [p for p in parts if p.slots and p.stats is not None and p.stats.count < min_tokens]
  if not few:
    return {}
  names = ", ".join(f"{p.name} ({int(p.stats.count)} rows)" for p in few[:8])
  more = f" and {len(few) - 8} more" if len(few) > 8 else ""
  what = (f"{len(few)} expert slice(s) received fewer than {min_tokens} calibration rows: "
          f"{names}{more}")
  if starved == "error" or not isinstance(few[0].rule, rules_lib.QuantRule):
    raise ValueError(what + (" (starved='error'; calibrate with more or other data, lower "
                             "min_tokens, or pass starved='rtn')" if starved == "error" else
                             f"; {type(method).__name__} prunes and has no data-free "
                             "fallback: calibrate with more or other data or lower "
                             "min_tokens"))
  warnings.warn(what + "; they are quantized round-to-nearest from their own weights "
                "(starved='rtn')", stacklevel=4)
  from quantjax.numerics import qarray as qarray_lib
  record.setdefault("starved", {}).update({p.name: float(p.stats.count) for p in few})
  return {p.key: qarray_lib.quantize(p.value, p.leaf_format(p.rule.format),
                                     calibration=p.rule.calibration, name=p.name) for p in few}


def _site_slices(cap: Capture, sis: Sequence[int]):
  """`(site, slot, layout)` for every slice the sites `sis` read: one per site, or one per
  slice (expert) of a batched / ragged matmul, with its slot among the site's slices."""
  for si in sis:
    s = cap.sites[si]
    lay = cap.layout_of(s)
    if lay is None:
      raise ValueError(f"cannot calibrate {s.path}: {s.error}")
    if s.regions is None:
      yield si, None, lay
    else:
      for slot, region in enumerate(s.regions):
        yield si, slot, dataclasses.replace(lay, region=region)


def _region_get(value, layout: Layout):
  return value[layout.index] if layout.region else value


class _State:
  """Current float leaf values (what the forward computes with) and finished results."""

  def __init__(self, p_leaves: list[Any]):
    self.leaves = list(p_leaves)
    self.results: dict[tuple[int, tuple], Any] = {}
    self.stack_axes: dict[int, tuple[int, ...]] = {}  # leaf -> its slices' fixed axes

  def weight_input(self, leaf: int, region):
    v = self.leaves[leaf]
    return v if region is None else v[region]

  def set_part(self, leaf: int, layout: Layout, result: Any, effective: jax.Array):
    """Records `result` and puts `effective` (in the dtype the forward is to see) in place."""
    self.results[(leaf, layout.region)] = result
    self.stack_axes[leaf] = layout.fixed
    eff = jnp.asarray(effective)
    if not layout.region:
      self.leaves[leaf] = eff
      return
    cur = jnp.asarray(self.leaves[leaf])
    self.leaves[leaf] = cur.astype(eff.dtype).at[layout.index].set(eff)


def _donate(p_leaves: list[Any], leaf: int) -> None:
  """Frees the caller's array of a replaced leaf (`calibrate(donate=True)`), unless the
  same array is another leaf too (tied weights) or was freed already."""
  x = p_leaves[leaf]
  if (isinstance(x, jax.Array) and not x.is_deleted()
      and sum(y is x for y in p_leaves) == 1):
    x.delete()


def effective_weight(result: Any, dtype: Any) -> jax.Array:
  """The float weight a method's result stands for (what a stock model computes with)."""
  from quantjax import transforms
  return jnp.asarray(transforms.dequantize_leaf(result, dtype)).astype(dtype)


def _conv_params(cap: Capture, s: Site) -> dict | None:
  if s.kind != "conv_general_dilated":
    return None
  e = cap.flat.eqns[s.eqn_index]
  w_aval = e.invars[1].aval
  dn = e.params["dimension_numbers"]
  return {"dimension_numbers": dn,
          "filter_shape": tuple(w_aval.shape[d] for d in dn.rhs_spec[2:]),
          "window_strides": tuple(e.params["window_strides"]),
          "padding": tuple(tuple(p) for p in e.params["padding"]),
          "lhs_dilation": tuple(e.params["lhs_dilation"]),
          "rhs_dilation": tuple(e.params["rhs_dilation"])}


def calibrate(fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any],
              rules: Sequence[Any], method: Any, *, mode: str = "sequential",
              strict: bool = False, max_samples: int = 2048, mesh: Any = None,
              data_axis: str = "data", progress: bool = True,
              capture: Capture | None = None,
              segment_cache: dict | None = None, donate: bool = False,
              activation_limit: int | None = None, activation_dir: Any = None,
              stand_in_dtype: Any = None, min_tokens: int = 16,
              starved: str = "rtn") -> CalibrationResult:
  """Runs a calibrated `method` on the weights `rules` select, on any model.

  Args:
    fn: the model's forward, `fn(params, batch)` (see `nnx_apply`,
      `linen_apply`); its output is not used.
    params: the params pytree `fn` takes (NNX State, linen variables, dicts).
    batches: calibration batches, each a pytree `fn` accepts, all of one shape.
    rules: `QuantRule`s (quantizers) or `PruneRule`s (pruners), first match
      wins; `skip=True` rules protect leaves.
    method: a method object (`methods.GPTQ`, `AWQ`, `SmoothQuant`, `RTN`,
      `Importance`, `sparsity.Wanda`, `SparseGPT`, ...): it declares `needs`
      (statistics, from `STAT_KINDS`) and `rule_type`, and
      `apply(parts, record)` returns `{part.key: new value}` for the `Part`s
      that are ready. Statistics no later group reads are referenced only by
      the parts during `apply`: a method may drop a large one once it has
      used it (`GPTQ` sets `part.stats.xtx = None` after copying it).
    mode: "sequential" (the inputs of each group come from the model with
      the groups before it already quantized, activation quantization
      included) or "one_pass" (every statistic from the float model).
    strict: raise when a rule matches no leaf, a leaf matches no rule, or a
      selected weight is read by no matmul (otherwise warned).
    max_samples: input rows kept per input for methods that sample.
    mesh, data_axis: split every batch's leading axis over `data_axis` of a
      `jax.sharding.Mesh`; the statistics are reduced across it by XLA. The
      mesh may span the processes of `jax.distributed` (every process calls
      `calibrate` with global batches, e.g. from
      `jax.make_array_from_process_local_data`): the method runs on each
      process on the same reduced statistics and process 0's results are
      sent to all (`quantjax.streaming` uses this).
    progress: a progress bar over groups.
    capture: a `trace(fn, params, batch)` made earlier, to reuse.
    segment_cache: a dict kept by the caller across calls: compiled segments
      are looked up and stored there by structure, so calling `calibrate` once
      per layer of identical layers compiles each segment once (used by
      `quantjax.streaming`). None: a cache for this call only.
    donate: the caller gives up the selected weights: each one's buffer is
      deleted (`jax.Array.delete`) as soon as its result replaces it, so a
      weight and the float stand-in the later segments compute with are never
      both held (`quantjax.streaming` passes True; at the Llama-3-8B shape
      that is 0.6 GB of a layer). Those leaves of the `params` passed in are
      then unusable; the others are untouched.
    activation_limit: bytes of calibration activations held in memory (None:
      no limit). A stack of activations over all batches (the batches
      themselves, or the values a segment hands to the next) larger than this
      is kept in files in `activation_dir` (positioned reads and writes, not
      memory maps, so it never counts as resident memory), and the segments
      then run one batch at a time: memory holds one batch's activations, the
      statistics and the weights. The equations and the order of accumulation
      are the stacked call's. `batches` may then be a lazy `Sequence` (read
      when indexed), so the caller holds none of them either. Not with `mesh`.
    activation_dir: where those files go (default: a fresh temporary
      directory). Only the files this call makes are deleted, when it returns.
    stand_in_dtype: dtype of the float stand-ins that replace finished weights
      in the later groups' forward (default: each leaf's own dtype). For a
      forward that casts its weights up before use (BF16 leaves computed in
      float32), float32 keeps the dequantized values exact, as a float32 copy
      of the model would: `quantjax.streaming` holds a layer's BF16 weights
      as BF16 this way and gets the float32 model's result bit for bit.
    min_tokens, starved: a slice of a batched or ragged matmul (an expert of
      a mixture-of-experts layer) that fewer than `min_tokens` calibration
      rows reach is *starved*: its statistics say too little. It is named in
      a warning and in `info["starved"]` (name -> rows), and `starved`
      decides: "rtn" quantizes it round-to-nearest from its own weights (the
      data-free fallback; pruning methods have none and raise), "error"
      raises naming it. Weights every row reaches are never starved.

  Returns:
    `CalibrationResult(params, report, parts, info)`.

  Raises:
    ValueError: no matmul reads a params leaf; a selected weight's
      contraction cannot be mapped or it is read with two layouts;
      calibration batches of different shapes; NaN/Inf in an input (naming
      the weight and the batch); strict-mode violations.
  """
  if mode not in ("sequential", "one_pass"):
    raise ValueError(f"mode must be 'sequential' or 'one_pass', got {mode!r}")
  if starved not in ("rtn", "error"):
    raise ValueError(f"starved must be 'rtn' or 'error', got {starved!r}")
  if not isinstance(batches, collections.abc.Sequence):
    batches = list(batches)
  if not len(batches):
    raise ValueError("calibrate() got no calibration batches")
  if activation_limit is not None and mesh is not None:
    raise ValueError("activation_limit is not supported with a mesh (each device already "
                     "holds only its rows of the batches); pass one or the other")
  rules = tuple(rules)
  rule_type = getattr(method, "rule_type", None)
  for r in rules:
    if rule_type is not None and not isinstance(r, rule_type):
      raise TypeError(f"{type(method).__name__} takes {rule_type.__name__}s, got a "
                      f"{type(r).__name__} ({r.module_path!r})")
  t_start = time.perf_counter()
  cap = capture if capture is not None else trace(fn, params, batches[0])
  _check_batches(cap, batches)
  _check_indices(cap, batches)
  if not cap.sites:
    raise ValueError(
        "the forward function performs no matmul whose operand is a params leaf "
        f"({len(cap.flat.eqns)} equations traced); calibrated methods need dot_general / "
        "einsum / conv on weights passed in `params` (not closed over, not only inside "
        "lax.cond / while_loop bodies)")
  report = rules_lib.match_rules(params, rules)
  rules_lib.check_report(report, strict, f"calibrate({type(method).__name__})")
  targets: dict[int, Any] = {}
  for li, path in enumerate(cap.leaf_paths):
    idx = report.assignments.get(path)
    if idx is not None and not rules[idx].skip and jnp.issubdtype(cap.leaf_avals[li].dtype,
                                                                   jnp.floating):
      targets[li] = rules[idx]
  p_leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(params)]
  sites_of_leaf: dict[int, list[int]] = {}
  for si, s in enumerate(cap.sites):
    if s.leaf in targets:
      sites_of_leaf.setdefault(s.leaf, []).append(si)
  unseen = [cap.leaf_paths[li] for li in targets if li not in sites_of_leaf]
  if unseen:
    computed = sorted(cap.leaf_paths[li] for li in cap.computed_uses if li in targets)
    msg = (f"{len(unseen)} selected weight(s) are read by no matmul of the forward function: "
           + ", ".join(unseen[:6]) + (" ..." if len(unseen) > 6 else "")
           + (f" ({', '.join(computed[:4])} reach their matmul through computation, not "
              "layout ops)" if computed else "") + "; they are left as they are")
    if strict:
      raise ValueError(msg + " (strict=True)")
    warnings.warn(msg, stacklevel=2)
  parts: dict[tuple[int, tuple], Part] = {}
  for li, sis in sites_of_leaf.items():
    other = None  # the leaf's first part: every slice of a leaf must share its layout
    for si, slot, lay in _site_slices(cap, sis):
      s = cap.sites[si]
      key = (li, lay.region)
      part = parts.get(key)
      if part is None:
        if other is not None and (other.layout.fixed, other.layout.contract,
                                  other.layout.free) != (lay.fixed, lay.contract, lay.free):
          o = other.layout
          raise ValueError(
              f"{s.path}: its slices are read with different layouts ({other.name}: stacking "
              f"axes {o.fixed}, contraction {o.contract}; slice {lay.region}: stacking axes "
              f"{lay.fixed}, contraction {lay.contract}); the slices of one stacked weight "
              "must share one layout")
        part = Part(path=s.path, region=lay.region, rule=targets[li], layout=lay,
                    value=_region_get(p_leaves[li], lay), leaf=li)
        parts[key] = part
        other = other or part
      elif (part.layout.contract, part.layout.free) != (lay.contract, lay.free):
        raise ValueError(
            f"{part.name} is read by two matmuls with different layouts (contraction axes "
            f"{part.layout.contract} vs {lay.contract}); a weight used with two layouts "
            "cannot be calibrated as one matrix")
      part.sites.append(si)
      if slot is not None:
        part.slots[si] = slot
  # Input sources (shared statistics) and groups.
  src_ids: dict[tuple, int] = {}
  cap.sources = []
  for part in parts.values():
    for si in part.sites:
      s = cap.sites[si]
      conv = _conv_params(cap, s)
      skey = (id(s.x_var), s.x_contract, s.kind,
              None if s.k_src is None else s.k_src.tobytes(), repr(conv), s.x_batch,
              None if s.gs_var is None else id(s.gs_var),
              None if s.regions is None else len(s.regions))
      if skey not in src_ids:
        src_ids[skey] = len(cap.sources)
        cap.sources.append(_Source(root=cap.group_roots[s.group], chain=s.x_chain,
                                   x_var=s.x_var, x_contract=s.x_contract, k_src=s.k_src,
                                   k=part.layout.k, kind=s.kind, conv=conv, group=s.group,
                                   x_batch=s.x_batch, gs_var=s.gs_var,
                                   n_slices=0 if s.regions is None else len(s.regions)))
      s.source = src_ids[skey]
    part.source = cap.sites[part.sites[0]].source
    part.group = cap.sites[part.sites[0]].group
  first: dict[int, int] = {}
  for part in parts.values():
    for si in part.sites:
      s = cap.sites[si]
      first[s.group] = min(first.get(s.group, s.eqn_index), s.eqn_index)
  order = sorted(first, key=lambda g: first[g])
  bounds = [first[g] for g in order]
  g_pos = {g: n for n, g in enumerate(order)}
  ready: dict[int, list[tuple]] = {}
  for key, part in parts.items():
    ready.setdefault(max(g_pos[cap.sites[si].group] for si in part.sites), []).append(key)
  pending_of_source: dict[int, int] = {}
  for part in parts.values():
    for si in part.sites:
      pending_of_source[cap.sites[si].source] = pending_of_source.get(cap.sites[si].source, 0) + 1
  sources_of_group: dict[int, list[int]] = {}
  for i, src in enumerate(cap.sources):
    sources_of_group.setdefault(src.group, []).append(i)
  needs = frozenset(getattr(method, "needs", frozenset()))
  bad_needs = needs - set(STAT_KINDS)
  if bad_needs:
    raise ValueError(f"{type(method).__name__} asks for unknown statistics {sorted(bad_needs)}")
  n_sample = max(1, int(max_samples) // len(batches)) if "sample" in needs else 0
  uses = {cap.group_roots[g]: first[g] - 1 for g in order}
  for src in cap.sources:  # a ragged_dot's group sizes stay live until its statistics
    if src.gs_var is not None and not _is_lit(src.gs_var):
      uses[src.gs_var] = max(uses.get(src.gs_var, -1), first[src.group] - 1)
  if "sample" in needs:
    sliced = sorted({cap.sites[si].path for p in parts.values() for si in p.slots})
    if sliced:
      raise ValueError(f"{type(method).__name__} needs sampled input rows, which are not "
                       f"collected per expert; {', '.join(sliced[:4])} are read per slice "
                       "(a batched or ragged matmul): use GPTQ or RTN on them")
  runner = _Runner(cap, uses, segment_cache)
  state = _State(p_leaves)
  put = (lambda b: b)
  # A mesh over the devices of several jax.distributed processes: each holds its rows of
  # every batch, XLA reduces the statistics across processes, and every process then
  # uses process 0's results (bit for bit), so all of them carry the same weights on.
  multi_process = mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    n_dev = mesh.shape[data_axis]
    for aval in cap.batch_avals:
      if aval.shape and aval.shape[0] % n_dev:
        raise ValueError(f"calibration batches of {aval.shape[0]} rows do not split over "
                         f"{data_axis}={n_dev}; pick a batch size that divides evenly")
    # Stacked batches [n_batches, rows, ...]: rows split over the data axis.
    sh = NamedSharding(mesh, PartitionSpec(None, data_axis))
    put = (lambda b: jax.device_put(b, sh) if getattr(b, "ndim", 0) >= 2 else b)
  n_batches = len(batches)
  last_read = _last_reads(cap)
  unfinished: dict[int, int] = {}
  for part in parts.values():
    unfinished[part.leaf] = unfinished.get(part.leaf, 0) + 1

  def release(next_lo: float) -> None:
    """Drops the stand-ins of finished weights that no segment from `next_lo` on reads
    (the largest solve of a layer then runs without the layer's other weights held)."""
    for li, left in unfinished.items():
      if left == 0 and last_read.get(li, -1) < next_lo and state.leaves[li] is not None:
        state.leaves[li] = None
  spill = _Spill.open(activation_limit, activation_dir)
  try:
    if spill is not None and _env_bytes(n_batches, cap.batch_avals) > spill.limit:
      envs: list[Any] = [_DiskStack(spill, a.shape, a.dtype) for a in cap.batch_avals]
      for b in range(n_batches):
        for x, leaf in zip(envs, jax.tree_util.tree_leaves(batches[b])):
          x.put(b, leaf)
      spill.spilled_bytes += _env_bytes(n_batches, cap.batch_avals)
    else:
      per_batch = [jax.tree_util.tree_leaves(b) for b in batches]
      envs = [put(jnp.stack([jnp.asarray(leaves[j]) for leaves in per_batch]))
              for j in range(len(cap.batch_vars))]
      del per_batch
    stats_of_source: dict[int, InputStats] = {}
    transforms: dict[int, _Transform] = {}
    record: dict[str, Any] = {}
    timing = {"stats": 0.0, "quant": 0.0}
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(order), desc=f"{getattr(method, 'label', type(method).__name__)} "
                 f"({mode})", unit="group", leave=False)

    def finish(keys):
      t0 = time.perf_counter()
      todo = []
      for key in keys:
        part = parts[key]
        # In the leaf's own dtype (a stacked leaf holds float32 stand-ins beside its
        # unfinished slices with `stand_in_dtype`; those slices convert back exactly).
        part.value = _region_get(state.leaves[part.leaf], part.layout).astype(
            cap.leaf_avals[part.leaf].dtype)
        part.stats = (InputStats.merge([
            stats_of_source[cap.sites[si].source].take(part.slots[si]) if si in part.slots
            else stats_of_source[cap.sites[si].source] for si in part.sites])
                      if needs else None)
        todo.append(part)
      # Sources this call finishes are let go first: then the parts hold their statistics'
      # only references, and a method may drop them (part.stats.xtx = None) when done.
      in_call: dict[int, int] = {}
      for part in todo:
        for si in part.sites:
          in_call[cap.sites[si].source] = in_call.get(cap.sites[si].source, 0) + 1
      for src, n in in_call.items():
        if pending_of_source[src] == n:
          stats_of_source.pop(src, None)
      fallback = _starved_parts(todo, min_tokens, starved, method, record)
      results = method.apply([p for p in todo if p.key not in fallback], record) \
          if len(fallback) < len(todo) else {}
      results.update(fallback)
      if multi_process:
        results = _from_process_0(results)
      for part in todo:
        unfinished[part.leaf] -= 1
        res = results.get(part.key)
        if res is not None:
          state.set_part(part.leaf, part.layout, res,
                         effective_weight(res, stand_in_dtype or part.value.dtype))
          if donate:
            _donate(p_leaves, part.leaf)
          for si in part.sites:
            t = _site_transform(res, part.layout, cap.sites[si])
            if t is not None:
              if si in part.slots:
                raise ValueError(
                    f"{part.name}: activation quantization or input scales on one slice of "
                    "a batched or ragged matmul (an expert) are not supported; quantize "
                    "the experts' weights only")
              transforms[si] = t
        part.stats = None
        for si in part.sites:
          src = cap.sites[si].source
          pending_of_source[src] -= 1
          if pending_of_source[src] == 0:
            stats_of_source.pop(src, None)
      timing["quant"] += time.perf_counter() - t0

    def init_accs(srcs):
      out = []
      for si in srcs:
        a = _stat_init(cap.sources[si].k, needs, cap.sources[si].n_slices)
        out.append([a[n] for n in sorted(a)])
      return out

    if mode == "sequential":
      lo, env_vars = 0, list(cap.batch_vars)
      for n, g in enumerate(order):
        t0 = time.perf_counter()
        srcs = sources_of_group.get(g, [])
        seg = runner.build(lo, bounds[n], srcs, needs, n_sample, transforms)
        if spill is None or (not any(isinstance(x, _DiskStack) for x in envs)
                             and _env_bytes(n_batches, [v.aval for v in seg.env_out])
                             <= spill.limit):
          envs, accs, samples = _run_segment(seg, state, envs, env_vars, init_accs(srcs), 0, cap)
        else:
          envs, accs, samples = _run_batched(seg, state, envs, env_vars, init_accs(srcs),
                                             n_batches, cap, spill)
        env_vars, lo = seg.env_out, bounds[n]
        for j, si in enumerate(srcs):
          stats_of_source[si] = _finalize_stats(seg.acc_names[j], accs[j], samples[j],
                                                max_samples)
        accs = samples = None  # the statistics live in stats_of_source only
        timing["stats"] += time.perf_counter() - t0
        release(bounds[n])  # later segments run equations from bounds[n] on
        finish(ready.get(n, []))
        if bar is not None:
          bar.update(1)
    else:
      t0 = time.perf_counter()
      segs = []
      lo = 0
      for n, g in enumerate(order):
        srcs = sources_of_group.get(g, [])
        segs.append(runner.build(lo, bounds[n], srcs, needs, n_sample, {}))
        lo = bounds[n]
      accs = [init_accs(seg.sources) for seg in segs]
      samples = [[[] for _ in seg.sources] for seg in segs]
      for b in range(n_batches):
        env, env_vars = [_env_batch(x, b) for x in envs], list(cap.batch_vars)
        for n, seg in enumerate(segs):
          env, accs[n], smp = _run_segment(seg, state, env, env_vars, accs[n], b, cap)
          env_vars = seg.env_out
          for j in range(len(seg.sources)):
            samples[n][j].extend(smp[j])
      for n, seg in enumerate(segs):
        for j, si in enumerate(seg.sources):
          stats_of_source[si] = _finalize_stats(seg.acc_names[j], accs[n][j], samples[n][j],
                                                max_samples)
      timing["stats"] += time.perf_counter() - t0
      for n in range(len(order)):
        release(math.inf)  # every segment has run
        finish(ready.get(n, []))
        if bar is not None:
          bar.update(1)
    if bar is not None:
      bar.close()
    new_params = _assemble(cap, params, state)
    info = {"stats_seconds": timing["stats"], "quant_seconds": timing["quant"],
            "compiles": runner.compiles, "groups": len(order), "mode": mode,
            "seconds": time.perf_counter() - t_start,
            "spilled_bytes": spill.spilled_bytes if spill is not None else 0}
    info.update(record)
    return CalibrationResult(params=new_params, report=report, parts=list(parts.values()),
                             info=info)
  finally:
    if spill is not None:
      spill.close()


def _stack_regions(results: dict[tuple, Any], shape: tuple[int, ...], axes: tuple[int, ...],
                   path: str) -> Any:
  """The per-slice results of a stacked leaf as one value of the leaf's shape:
  QArrays through `stack_qarrays`, arrays (masks) and other pytrees stacked."""
  from quantjax.numerics import qarray as qarray_lib
  first = next(iter(results.values()))
  if isinstance(first, qarray_lib.QArray):
    return qarray_lib.stack_qarrays(results, shape, axes, path)
  counts = [shape[a] for a in axes]
  missing = [i for i in np.ndindex(*counts) if tuple(i) not in results]
  if missing:
    raise ValueError(f"{path}: slices {missing[:5]} of the stacked weight are read by no "
                     "matmul; every layer of a stacked weight must be calibrated")
  items = [results[tuple(i)] for i in np.ndindex(*counts)]
  if axes != tuple(range(len(axes))):
    if not all(isinstance(x, (jax.Array, np.ndarray)) for x in items):
      raise ValueError(f"{path}: {type(first).__name__} results of slices along axes {axes} "
                       "cannot be stacked in place; only leading stacking axes can")
    return jnp.moveaxis(jnp.stack(items).reshape(tuple(counts) + items[0].shape),
                        tuple(range(len(axes))), axes)
  try:
    out = jax.tree.map(lambda *xs: jnp.stack(xs), *items)
    return jax.tree.map(lambda x: x.reshape(tuple(counts) + x.shape[1:]), out)
  except ValueError as e:
    raise ValueError(f"{path}: the per-layer results differ in structure ({e})") from None


def _assemble(cap: Capture, params: Any, state: _State) -> Any:
  values = {(cap.leaf_paths[li], region): v for (li, region), v in state.results.items()}
  axes = {cap.leaf_paths[li]: a for li, a in state.stack_axes.items()}
  return tree_from_parts(params, values, fill=None, keep=True, stack_axes=axes)


def tree_from_parts(params: Any, values: Mapping[tuple[str, tuple], Any], *, fill: Any = None,
                    keep: bool = False,
                    stack_axes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
  """A tree shaped like `params` holding `values` (keyed by `Part.key`).

  Slices of a stacked leaf are stacked back along its stacking axes
  (`stack_axes[path]`, e.g. `{p.path: p.layout.fixed for p in result.parts}`;
  default: the leading axes); other leaves are `fill` (or their own value
  with `keep=True`).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  by_path: dict[str, dict[tuple, Any]] = {}
  for (path, region), v in values.items():
    by_path.setdefault(path, {})[region] = v
  out = []
  for kp, leaf in flat:
    path = rules_lib.path_str(kp)
    res = by_path.get(path)
    if res is None:
      out.append(leaf if keep else fill)
    elif () in res:
      out.append(res[()])
    else:
      depth = len(next(iter(res)))
      axes = tuple((stack_axes or {}).get(path, range(depth)))
      out.append(_stack_regions(res, tuple(np.shape(leaf)), axes, path))
  return jax.tree_util.tree_unflatten(treedef, out)


def collect_stats(fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any],
                  rules: Sequence[Any], needs: Iterable[str] = ("range", "absmean"), *,
                  max_samples: int = 2048, progress: bool = False) -> dict[str, InputStats]:
  """Statistics of the float model's matmul inputs, per selected weight.

  Returns `{part name: InputStats}` (`"layers/0/attn/q_proj/kernel"`, or
  `"stack/kernel[3]"` for slice 3 of a stacked leaf), without changing any weight.
  """
  needs = frozenset(needs)
  bad = needs - set(STAT_KINDS)
  if bad:
    raise ValueError(f"unknown statistics {sorted(bad)}; expected some of {STAT_KINDS}")
  out: dict[str, InputStats] = {}

  class _Collect:
    label = "statistics"
    rule_type = None

    def __init__(self):
      self.needs = needs

    def apply(self, parts, record):
      for p in parts:
        out[p.name] = p.stats
      return {}
  calibrate(fn, params, batches, rules, _Collect(), mode="one_pass", max_samples=max_samples,
            progress=progress, min_tokens=0)
  return out
