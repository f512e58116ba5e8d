"""The driver: `calibrate` and `collect_stats` on any forward function."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax import transforms
from quantjax.methods.rtn import RTN
from quantjax.numerics import qarray as qarray_lib
from quantjax.methods.capture.trace import Capture, Site, Source, is_drop, is_lit, trace
from quantjax.methods.capture.stats import InputStats, STAT_KINDS, finalize_stats, stat_init
from quantjax.methods.capture.parts import Block, Part
from quantjax.methods.capture.spill import DiskStack, Spill
from quantjax.methods.capture.segments import (Runner, SiteTransform, State, env_batch, env_bytes,
                                               region_get, run_batched, run_segment, site_transform)


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
      if not is_lit(a) and a in leaves_of:
        ins = ins | leaves_of[a]
    if not ins:
      continue
    if any(not is_drop(o) and o in cap.bdep for o in e.outvars):
      for li in ins:
        last[li] = i
    else:  # a params-only value: carries its leaves to whatever reads it
      for o in e.outvars:
        if not is_drop(o):
          leaves_of[o] = ins
  return last


def _dependent_outputs(jaxpr: Any, inputs: set[int]) -> list[int]:
  """Indices of `jaxpr`'s outputs that depend on its inputs at positions `inputs`."""
  dep = {v for i, v in enumerate(jaxpr.invars) if i in inputs}
  for e in jaxpr.eqns:
    if any(not is_lit(a) and a in dep for a in e.invars):
      dep.update(o for o in e.outvars if not is_drop(o))
  return [j for j, v in enumerate(jaxpr.outvars) if not is_lit(v) and v in dep]


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
  record.setdefault("starved", {}).update({p.name: float(p.stats.count) for p in few})
  return RTN().apply(few, record)


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


def _donate(p_leaves: list[Any], leaf: int) -> None:
  """Frees the caller's array of a replaced leaf (`MemoryOptions(donate=True)`), unless the
  same array is another leaf too (tied weights) or was freed already."""
  x = p_leaves[leaf]
  if (isinstance(x, jax.Array) and not x.is_deleted()
      and sum(y is x for y in p_leaves) == 1):
    x.delete()


def effective_weight(result: Any, dtype: Any) -> jax.Array:
  """The float weight a method's result stands for (what a stock model computes with)."""
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


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
  """How `calibrate` spends memory; the defaults hold everything and free nothing.
  None of them changes a result bit.

  Attributes:
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
  """

  donate: bool = False
  activation_limit: int | None = None
  activation_dir: Any = None
  stand_in_dtype: Any = None


def calibrate(fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any],
              rules: Sequence[Any], method: Any, *, mode: str = "sequential",
              strict: bool = False, max_samples: int = 2048, mesh: Any = None,
              data_axis: str = "data", progress: bool = True,
              capture: Capture | None = None,
              segment_cache: dict | None = None, memory: MemoryOptions | None = None,
              min_tokens: int = 16, starved: str = "rtn") -> CalibrationResult:
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
      A method with `wants_block = True` (SignRound) is handed each group's
      `Block` (`part.block`): the program from the group to the next group
      boundary, its quantized-prefix inputs and the float model's values
      there; sequential mode only, activations in memory.
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
    memory: how memory is spent (`MemoryOptions`: donated weights, activations
      on disk above a limit, the stand-ins' dtype); None: everything in memory,
      nothing donated.
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
  wants_block = bool(getattr(method, "wants_block", False))
  if wants_block and mode != "sequential":
    raise ValueError(f"{type(method).__name__} fits each group to the float model's values "
                     "downstream of it through the quantized prefix: it needs "
                     f"mode='sequential', not {mode!r}")
  if starved not in ("rtn", "error"):
    raise ValueError(f"starved must be 'rtn' or 'error', got {starved!r}")
  if not isinstance(batches, collections.abc.Sequence):
    batches = list(batches)
  if not len(batches):
    raise ValueError("calibrate() got no calibration batches")
  memory = memory or MemoryOptions()
  if memory.activation_limit is not None and mesh is not None:
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
                    value=region_get(p_leaves[li], lay), leaf=li)
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
        cap.sources.append(Source(root=cap.group_roots[s.group], chain=s.x_chain,
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
  if wants_block:
    # The program's outputs are live to its end, so that a block ending in one (an
    # untied head: its logits) has them as its objective. Other methods never run the
    # equations that only outputs need (the logits).
    for v in cap.flat.outvars:
      if not is_lit(v):
        uses[v] = max(uses.get(v, -1), len(cap.flat.eqns))
  for src in cap.sources:  # a ragged_dot's group sizes stay live until its statistics
    if src.gs_var is not None and not is_lit(src.gs_var):
      uses[src.gs_var] = max(uses.get(src.gs_var, -1), first[src.group] - 1)
  if "sample" in needs:
    sliced = sorted({cap.sites[si].path for p in parts.values() for si in p.slots})
    if sliced:
      raise ValueError(f"{type(method).__name__} needs sampled input rows, which are not "
                       f"collected per expert; {', '.join(sliced[:4])} are read per slice "
                       "(a batched or ragged matmul): use GPTQ or RTN on them")
  runner = Runner(cap, uses, segment_cache)
  state = State(p_leaves)
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
  spill = Spill.open(memory.activation_limit, memory.activation_dir)
  try:
    if spill is not None and env_bytes(n_batches, cap.batch_avals) > spill.limit:
      envs: list[Any] = [DiskStack(spill, a.shape, a.dtype) for a in cap.batch_avals]
      for b in range(n_batches):
        for x, leaf in zip(envs, jax.tree_util.tree_leaves(batches[b])):
          x.put(b, leaf)
      spill.spilled_bytes += env_bytes(n_batches, cap.batch_avals)
    else:
      per_batch = [jax.tree_util.tree_leaves(b) for b in batches]
      envs = [put(jnp.stack([jnp.asarray(leaves[j]) for leaves in per_batch]))
              for j in range(len(cap.batch_vars))]
      del per_batch
    stats_of_source: dict[int, InputStats] = {}
    transforms: dict[int, SiteTransform] = {}
    record: dict[str, Any] = {}
    timing = {"stats": 0.0, "quant": 0.0}
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(order), desc=f"{getattr(method, 'label', type(method).__name__)} "
                 f"({mode})", unit="group", leave=False)

    def finish(keys, block=None):
      t0 = time.perf_counter()
      todo = []
      for key in keys:
        part = parts[key]
        part.block = block
        # In the leaf's own dtype (a stacked leaf holds float32 stand-ins beside its
        # unfinished slices with `stand_in_dtype`; those slices convert back exactly).
        part.value = region_get(state.leaves[part.leaf], part.layout).astype(
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
                         effective_weight(res, memory.stand_in_dtype or part.value.dtype))
          if memory.donate:
            _donate(p_leaves, part.leaf)
          for si in part.sites:
            t = site_transform(res, part.layout, cap.sites[si])
            if t is not None:
              if si in part.slots:
                raise ValueError(
                    f"{part.name}: activation quantization or input scales on one slice of "
                    "a batched or ragged matmul (an expert) are not supported; quantize "
                    "the experts' weights only")
              transforms[si] = t
        part.stats = None
        part.block = None
        for si in part.sites:
          src = cap.sites[si].source
          pending_of_source[src] -= 1
          if pending_of_source[src] == 0:
            stats_of_source.pop(src, None)
      timing["quant"] += time.perf_counter() - t0

    def init_accs(srcs):
      out = []
      for si in srcs:
        a = stat_init(cap.sources[si].k, needs, cap.sources[si].n_slices)
        out.append([a[n] for n in sorted(a)])
      return out

    def block_and_advance(n: int, keys: list, fenv: dict) -> tuple[Block | None, dict | None]:
      """The block objective of group n's ready parts, and the float model's live values
      at the next boundary (`fenv`: the float model's live values at bounds[n])."""
      t0 = time.perf_counter()
      todo = [parts[k] for k in keys]
      nxt = bounds[n + 1] if n + 1 < len(order) else None
      hi = max([nxt or 0] + [cap.sites[si].eqn_index + 1 for p in todo for si in p.sites
                             if cap.sites[si].eqn_index >= bounds[n]])
      block, new_fenv = None, None

      def run_float(seg):
        w = [state.weight_input(li, reg) for li, reg in seg.weights_in]
        out, _, _ = seg.fn([fenv[v] for v in seg.env_in],
                           [*w, *seg.const_vals, *seg.transform_data], [])
        return list(out)
      if todo:
        seg = runner.build(bounds[n], hi, [], frozenset(), 0, {})
        f_out = run_float(seg)
        slot: dict[tuple, int] = {}
        for p in todo:
          want = (p.leaf, tuple(p.layout.region) if p.layout.region else None)
          at = [i for i, (li, reg) in enumerate(seg.weights_in)
                if (li, tuple(reg) if reg else None) == want]
          if not at or p.slots:
            raise ValueError(
                f"{p.name}: {type(method).__name__}'s block objective needs the weight as a "
                "segment input of its group's span; "
                + ("one slice of a batched or ragged matmul (an expert) is not one: use GPTQ "
                   "or RTN on experts" if p.slots else
                   "it is read before its group (by matmuls in several groups)"))
          slot[p.key] = at[0]
        n_env = len(seg.env_in)
        outputs = _dependent_outputs(seg.jaxpr, {n_env + i for i in slot.values()})
        pos = {v: i for i, v in enumerate(env_vars)}
        block = Block(
            name=", ".join(p.name for p in todo), fn=seg.raw,
            env=[envs[pos[v]] for v in seg.env_in],
            weights=[state.weight_input(li, reg) for li, reg in seg.weights_in],
            consts=[*seg.const_vals, *seg.transform_data], slot=slot,
            outputs=tuple(outputs), targets=[f_out[j] for j in outputs])
        if nxt is not None and hi == nxt:
          new_fenv = dict(zip(seg.env_out, f_out))
      if nxt is not None and new_fenv is None:
        seg = runner.build(bounds[n], nxt, [], frozenset(), 0, {})
        new_fenv = dict(zip(seg.env_out, run_float(seg)))
      timing["stats"] += time.perf_counter() - t0
      return block, new_fenv

    if mode == "sequential":
      lo, env_vars = 0, list(cap.batch_vars)
      fenv: dict | None = None
      for n, g in enumerate(order):
        t0 = time.perf_counter()
        srcs = sources_of_group.get(g, [])
        seg = runner.build(lo, bounds[n], srcs, needs, n_sample, transforms)
        if spill is None or (not any(isinstance(x, DiskStack) for x in envs)
                             and env_bytes(n_batches, [v.aval for v in seg.env_out])
                             <= spill.limit):
          envs, accs, samples = run_segment(seg, state, envs, env_vars, init_accs(srcs), 0, cap)
        else:
          envs, accs, samples = run_batched(seg, state, envs, env_vars, init_accs(srcs),
                                             n_batches, cap, spill)
        env_vars, lo = seg.env_out, bounds[n]
        for j, si in enumerate(srcs):
          stats_of_source[si] = finalize_stats(seg.acc_names[j], accs[j], samples[j],
                                                max_samples)
        accs = samples = None  # the statistics live in stats_of_source only
        timing["stats"] += time.perf_counter() - t0
        release(bounds[n])  # later segments run equations from bounds[n] on
        block = None
        if wants_block:
          if any(isinstance(x, DiskStack) for x in envs):
            raise ValueError(f"{type(method).__name__}'s block objective needs the "
                             "calibration activations in memory; raise "
                             "MemoryOptions.activation_limit or use fewer batches")
          if fenv is None:  # before the first group the float and quantized models agree
            fenv = dict(zip(env_vars, envs))
          block, fenv = block_and_advance(n, ready.get(n, []), fenv)
        finish(ready.get(n, []), block)
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
        env, env_vars = [env_batch(x, b) for x in envs], list(cap.batch_vars)
        for n, seg in enumerate(segs):
          env, accs[n], smp = run_segment(seg, state, env, env_vars, accs[n], b, cap)
          env_vars = seg.env_out
          for j in range(len(seg.sources)):
            samples[n][j].extend(smp[j])
      for n, seg in enumerate(segs):
        for j, si in enumerate(seg.sources):
          stats_of_source[si] = finalize_stats(seg.acc_names[j], accs[n][j], samples[n][j],
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


def _assemble(cap: Capture, params: Any, state: State) -> Any:
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
