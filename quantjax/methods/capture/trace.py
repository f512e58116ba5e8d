"""The traced program: the flat jaxpr of a forward function, its matmul sites and
their layouts (see the package docstring)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

try:
  from jax.extend.core import DebugInfo, DropVar
except ImportError:  # jax < 0.10 exports neither from jax.extend.core (same classes)
  from jax._src.core import DebugInfo, DropVar

from quantjax import rules as rules_lib
from quantjax.numerics import qarray as qarray_lib


# Call-like primitives whose body is inlined: name -> the param holding the jaxpr.
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Unary ops that leave values unchanged (identity on element indices).
SAME = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
         "pvary", "mesh_cast"}
# Unary data-movement ops (applied to an index array to map elements).
MOVE = {"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "slice",
         "dynamic_slice", "rev"}
# Ops a segment recomputes from their inputs rather than taking a folded constant
# (XLA fuses them into their consumers for free).
CHEAP = {"broadcast_in_dim", "iota", "reshape", "convert_element_type", "squeeze",
          "expand_dims"}
# Value-preserving unary ops walked back from a matmul input to its group's root value.
ROOT_OPS = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
             "reshape", "squeeze", "expand_dims", "transpose", "pvary"}
MATMULS = {"dot_general", "conv_general_dilated", "ragged_dot_general"}
# Ops between a batch of ids and the gather that reads a params leaf with them
# (jnp.take / x[ids] wrap negative ids with lt / add / select_n).
INDEX_OPS = {"convert_element_type", "copy", "broadcast_in_dim", "reshape", "expand_dims",
              "squeeze", "select_n", "lt", "ge", "add", "clamp", "and"}


def is_lit(a) -> bool:
  return isinstance(a, jcore.Literal)


def is_drop(v) -> bool:
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

class Flat:
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
    return DropVar(v.aval) if is_drop(v) else jcore.Var(v.aval)

  def is_pdep(self, a) -> bool:
    return (not is_lit(a)) and a in self.pdep

  def emit(self, eqn, ins):
    outs = [self.fresh(v) for v in eqn.outvars]
    self.eqns.append(eqn.replace(invars=list(ins), outvars=outs))
    if any(self.is_pdep(a) for a in ins):
      self.pdep.update(o for o in outs if not is_drop(o))
    return outs

  def inline(self, jaxpr, ins, const_atoms=()) -> list[Any]:
    env: dict[Any, Any] = {}
    for v, a in zip(jaxpr.constvars, const_atoms):
      env[v] = a
    for v, a in zip(jaxpr.invars, ins):
      env[v] = a

    def read(a):
      return a if is_lit(a) else env[a]

    for eqn in jaxpr.eqns:
      eins = [read(a) for a in eqn.invars]
      name = eqn.primitive.name
      sub = CALLS.get(name)
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
        if not is_drop(v):
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
    if not self.fixed:
      return ()
    return qarray_lib.stack_index(self.region, self.fixed, len(self.leaf_shape))

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
class Source:
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


def const_eval(flat: Flat, prod: dict, var, cache: dict):
  """Concrete value of a var that depends on no batch and no params (else None)."""
  if is_lit(var):
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
      v = const_eval(flat, prod, a, cache)
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
    flat = Flat()
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
        if not is_drop(o):
          prod[o] = i
    self.prod = prod
    bdep = set(self.batch_vars)
    for e in eqns:
      if any((not is_lit(a)) and a in bdep for a in e.invars):
        bdep.update(o for o in e.outvars if not is_drop(o))
    self.bdep = bdep
    leaf_of = {v: i for i, v in enumerate(self.param_vars)}
    self.leaf_of = leaf_of
    cache: dict = {}
    self._const_cache = cache
    # origin: var -> (leaf index, chain of eqn indices) for pure layout views of one leaf.
    origin: dict[Any, tuple[int, tuple[int, ...]]] = {v: (i, ()) for v, i in leaf_of.items()}
    for i, e in enumerate(eqns):
      name = e.primitive.name
      if name not in SAME and name not in MOVE:
        continue
      data = e.invars[0]
      if is_lit(data) or data not in origin or len(e.outvars) != 1:
        continue
      if any(const_eval(flat, prod, a, cache) is None for a in e.invars[1:]):
        continue
      leaf, chain = origin[data]
      origin[e.outvars[0]] = (leaf, chain + (i,))
    self.origin = origin
    sites: list[Site] = []
    self.computed_uses: dict[int, list[int]] = {}  # leaf -> matmul eqns with a computed weight
    for i, e in enumerate(eqns):
      if e.primitive.name not in MATMULS:
        continue
      a, b = e.invars[0], e.invars[1]
      batch_a = (not is_lit(a)) and a in bdep
      batch_b = (not is_lit(b)) and b in bdep
      for w_pos, w, x_batch in ((1, b, batch_a), (0, a, batch_b)):
        if not x_batch or is_lit(w) or w in bdep:
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
      if is_lit(op) or is_lit(idx) or op not in self.origin or self.origin[op][1]:
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
      if is_lit(v) or v in seen:
        continue
      seen.add(v)
      if v in self.batch_index:
        found.add(self.batch_index[v])
      elif v in self.bdep:
        e = self.flat.eqns[self.prod[v]]
        if e.primitive.name not in INDEX_OPS:
          return None
        stack.extend(e.invars)
    return found.pop() if len(found) == 1 else None

  def _leaves_of(self, var) -> set[int]:
    out, stack, seen = set(), [var], set()
    while stack:
      v = stack.pop()
      if is_lit(v) or v in seen:
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
    self.sources: list[Source] = []
    self.group_roots: list[Any] = []
    self.group_sites: list[list[int]] = []
    for si, s in enumerate(self.sites):
      e = eqns[s.eqn_index]
      x = e.invars[1 - s.w_pos]
      chain: list[int] = []
      root = x
      while (not is_lit(root)) and root in self.prod:
        pe = eqns[self.prod[root]]
        if pe.primitive.name not in ROOT_OPS or len(pe.outvars) != 1:
          break
        src = pe.invars[0]
        if is_lit(src) or src not in self.bdep:
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
      if e.primitive.name in SAME:
        continue
      rest = [const_eval(flat, self.prod, a, self._const_cache) for a in e.invars[1:]]
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
