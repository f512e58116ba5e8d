"""`compress_streaming`: the layer loop, resume from the manifest, and the commit of
the output."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import methods
from quantjax import rules as rules_lib
from quantjax.eval import speed as speed_lib
from quantjax.io import atomic
from quantjax.io import gguf as gguf_io
from quantjax.io import hf
from quantjax.io import safetensors as st
from quantjax.methods import capture as capture_lib
from quantjax.models import llama
from quantjax.numerics.qarray import ActQuantized, InputScaled
from quantjax.streaming.files import (ACTIVATIONS, Carried, GGUFPlan, GGUF_FLOAT, MANIFEST,
                                      MANIFEST_FORMAT, MANIFEST_VERSION, barrier, check_file_target,
                                      clean_work, embed_rows, fingerprint, get_leaf, hidden_name,
                                      is_ours, local_rows, remove_work, scheme_from, scheme_json,
                                      set_leaf, write_carried, write_json, write_other_shard,
                                      write_shard)
from quantjax.streaming.source import FLOAT_DTYPES, check_source


@dataclasses.dataclass
class StreamResult:
  """What `compress_streaming` returns.

  Attributes:
    path: the output directory.
    layers: one record per decoder layer, in order: `layer`, `seconds`
      (read, calibrate, write, carry), `stats_seconds` / `quant_seconds`
      (the driver's forward statistics / the method), `peak_rss_bytes`
      (Linux VmHWM during that layer, None elsewhere), `spilled_bytes` (the
      driver's activations written to disk, `activation_limit`), `resumed` (True when
      an earlier run finished it and this one reused it; its figures are that
      run's).
    resumed_from: the first layer this call computed (0 for a fresh run,
      `num_layers` when every layer was already done).
    seconds: wall time of this call.
    peak_rss_bytes: the largest peak resident memory of this call's phases.
    output_bytes: total bytes of the output directory's files.
    report: the `hf.ExportReport` (per tensor: how it was stored), or for a
      GGUF output the list of `gguf.TensorExport`.
    info: the method's records merged over layers (e.g. `gptq_loss`), the
      number of `processes` and this process's share of the calibration
      batches (`local_batches`).
  """

  path: str
  layers: list[dict[str, Any]]
  resumed_from: int
  seconds: float
  peak_rss_bytes: int | None
  output_bytes: int
  report: hf.ExportReport
  info: dict[str, Any]


# ----------------------------------------------------------------------------
# The driver.


def compress_streaming(source: str | os.PathLike, output: str | os.PathLike,
                       batches: Iterable[Any], rules: Sequence[Any], method: Any = None, *,
                       dtype: str | None = None, work_dir: str | os.PathLike | None = None,
                       overwrite: bool = False, resume: bool = True, progress: bool = True,
                       keep_work: bool = False, gguf_types: Any = None,
                       tokenizer: Any = "auto", activation_limit: int | None = None,
                       on_layer: Callable[[int, dict], None] | None = None) -> StreamResult:
  """Quantizes a Llama-family Hugging Face directory or GGUF file layer by layer, disk to disk.

  Args:
    source: the float checkpoint (`config.json` + safetensors, sharded or not),
      or a `.gguf` file (read as float32; its vocabulary is the GGUF output's
      tokenizer with `tokenizer="auto"`).
    output: the directory to write (a compressed-tensors Hugging Face model),
      or a `.gguf` file (llama.cpp): each layer is encoded as `export_gguf`
      encodes it (a QArray in a GGUF block format, e.g. GPTQ with format
      "q4_0", goes in code for code) and the file is assembled from the
      finished layers at the end, atomically.
    batches: calibration token batches, each `[B, T]` int, all of one shape.
    rules: `QuantRule`s over the model's params paths (e.g.
      `models.llama.PROJ_KERNELS`); they may select decoder-layer weights only
      (the embedding, final norm and head are copied as stored).
    method: a calibrated method of `quantjax.methods` (`GPTQ()` by default;
      `RTN()` works too); weight-only formats.
    dtype: dtype of the output's float tensors and scales ("bfloat16",
      "float16", "float32"); default the source's.
    work_dir: where finished layers, the carried hidden states and the
      manifest wait until the end (default `.<output name>.stream-work` beside
      the output; it must be on the output's filesystem for the shards to be
      linked, not copied, into place).
    overwrite: replace an existing output (only a directory quantjax
      committed); checked before any work.
    resume: continue a matching interrupted run found in `work_dir`; False
      discards it.
    progress: a tqdm bar over layers (elapsed, estimate to finish).
    keep_work: keep the work directory after success.
    gguf_types: GGUF output: `export_gguf`'s `types` rules (`{regex: GGUF
      type}`); float tensors without a rule are stored in `dtype`.
    tokenizer: GGUF output: where the tokenizer metadata comes from (a
      `.gguf` file or a Hugging Face tokenizer directory); "auto" takes a GGUF
      source's own, or the source directory when it holds `tokenizer.json`,
      else writes none (llama.cpp then refuses the file; quantjax reads it).
    activation_limit: bytes of calibration activations held in memory (None:
      no limit). Above it the hidden states carried between layers stay in
      the work directory (read one batch at a time, the next layer's written
      one batch at a time), and the driver keeps its stacks of activations
      within a layer in files there too (`methods.calibrate`'s
      `activation_limit`): memory then holds one batch's activations. The
      output is the same bytes either way. One process only (across
      processes each already holds only its batches).
    on_layer: called as `on_layer(i, record)` after layer `i` is safely on
      disk (tests interrupt a run here).

  Across processes: called by every process of `jax.distributed` with the
  same arguments (the same calibration tokens), the calibration batches are
  dealt out (process `p` takes batches `p, p + P, ...`; their number must
  divide by the process count P), each process carries only its own
  batches' hidden states, the statistics are summed across processes by XLA
  (`methods.calibrate` on a mesh over every process's devices) and every
  process continues with process 0's quantized layer. Process 0 writes the
  layer shards, the manifest and the output; each process writes its own
  carried hidden states. The work directory must be one all processes see
  (one machine, or a shared filesystem).

  Returns:
    A `StreamResult`.

  Raises:
    HFFormatError, GGUFError: a source that cannot be read as claimed (see
      `check_source`).
    ValueError: rules that select the embedding / head / norms, an activation
      (W8A8) or input-scale (AWQ / SmoothQuant) result, calibration batches of
      different shapes, a work directory holding another run (with resume).
    FileExistsError: `output` exists (without `overwrite`) or is not ours.
    OSError: a failed write (disk full, ...) naming the path; the previous
      output is untouched and finished layers stay in the work directory.
  """
  from flax import nnx

  t_start = time.perf_counter()
  nproc, pid = jax.process_count(), jax.process_index()
  lead = pid == 0  # the process that writes shards, manifest and output
  speed_lib.reset_peak_rss()
  peaks: list[int] = []

  def phase_peak():
    p = speed_lib.peak_rss_bytes()
    if p is not None:
      peaks.append(p)
    # Freed pages go back to the OS before the next phase (glibc keeps them otherwise,
    # in the arenas of the threads that freed them, and each layer's peak then grows).
    gc.collect()
    speed_lib.trim_heap()
    speed_lib.reset_peak_rss()
    return p

  method = methods.GPTQ() if method is None else method
  rules = tuple(rules)
  output = os.path.abspath(os.fspath(output))
  to_gguf = output.endswith(".gguf")
  kind = "GGUF file (streamed)" if to_gguf else "Hugging Face model (streamed)"
  if to_gguf:
    check_file_target(output, overwrite)
  else:
    atomic.check_dir_target(output, overwrite, None, kind)
  src = check_source(source)
  cfg = src.config
  out_dtype = dtype or src.dtype.name
  if out_dtype not in FLOAT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {out_dtype!r}")
  fdt = FLOAT_DTYPES[out_dtype]

  tokens = [np.asarray(b) for b in batches]
  if not tokens:
    raise ValueError("compress_streaming() got no calibration batches")
  for i, b in enumerate(tokens):
    if b.shape != tokens[0].shape or b.ndim != 2 or not np.issubdtype(b.dtype, np.integer):
      raise ValueError(f"calibration batch {i} has shape {b.shape} {b.dtype}; every batch must "
                       f"be [B, T] integer token ids of one shape (batch 0: {tokens[0].shape})")
    if b.size and (b.min() < 0 or b.max() >= cfg.vocab_size):
      raise ValueError(f"calibration batch {i}: token ids in [{b.min()}, {b.max()}] lie outside "
                       f"the vocabulary [0, {cfg.vocab_size})")
  tokens_all = np.stack(tokens).astype(np.int32)  # [nb, B, T]
  nb, bsz, t = tokens_all.shape
  mesh = None
  if nproc > 1:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if nb % nproc:
      raise ValueError(f"{nb} calibration batches do not divide over {nproc} processes; pass a "
                       "multiple of the process count")
    if bsz % jax.local_device_count():
      raise ValueError(f"calibration batches of {bsz} rows do not divide over this process's "
                       f"{jax.local_device_count()} devices")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    row_sharding = NamedSharding(mesh, PartitionSpec("data"))
  local_tokens = tokens_all[pid::nproc]  # this process's batches
  nb_local = local_tokens.shape[0]
  hidden_shape = (nb_local, bsz, t, cfg.hidden_size)
  if activation_limit is not None and int(activation_limit) < 0:
    raise ValueError(f"activation_limit must be a number of bytes >= 0, got {activation_limit!r}")
  if activation_limit is not None and nproc > 1:
    raise ValueError("activation_limit is for one process; across processes each holds only "
                     "its own calibration batches (pass None)")
  # The carried hidden states stay on disk when they exceed the limit.
  on_disk = activation_limit is not None and 4 * int(np.prod(hidden_shape)) > activation_limit

  # Rules over the whole model (abstract leaves): coverage, and nothing outside the layers.
  abstract: dict = {}
  for spec in [s for ls in src.layer_specs for s in ls] + src.other_specs:
    set_leaf(abstract, spec.path, jax.ShapeDtypeStruct(spec.shape, jnp.float32))
  report = rules_lib.match_rules(abstract, rules)
  rules_lib.check_report(report, False, "compress_streaming")
  for spec in src.other_specs:
    idx = report.assignments.get("/".join(map(str, spec.path)))
    if idx is not None and not getattr(rules[idx], "skip", False):
      raise ValueError(
          f"rule {rules[idx].module_path!r} selects {'/'.join(map(str, spec.path))}: streaming "
          "quantizes the decoder layers; the embedding, final norm and head are copied as "
          "stored (add a skip rule before it, or narrow its regex)")

  # The work directory and the manifest.
  parent, base = os.path.dirname(output), os.path.basename(output)
  work = os.path.abspath(os.fspath(work_dir)) if work_dir else os.path.join(
      parent, f".{base}.stream-work")
  fp = fingerprint(src, rules, method, tokens_all, out_dtype)
  gg = None
  if to_gguf:
    gg = GGUFPlan(gguf_io, cfg, gguf_types, GGUF_FLOAT[out_dtype])
    fp["output"] = f"gguf {gguf_types!r}"
  key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  manifest = None
  if not lead:
    barrier("quantjax-stream-start")  # process 0 has checked and prepared the work directory
    with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("key") != key:
      raise ValueError(f"{work}: process 0 prepared a run with other inputs than this process's "
                       "(every process must pass the same arguments)")
  elif os.path.lexists(work):
    if not os.path.isdir(work) or (os.listdir(work) and not is_ours(work)):
      raise FileExistsError(f"work directory {work} exists and is not one compress_streaming "
                            "wrote (no manifest); choose another work_dir or remove it")
    if is_ours(work):
      with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
        old = json.load(f)
      if resume and old.get("key") == key and old.get("version") == MANIFEST_VERSION:
        manifest = old
        clean_work(work)
      elif resume:
        diff = sorted(k for k in fp if old.get("fingerprint", {}).get(k) != fp[k])
        raise ValueError(
            f"work directory {work} holds an interrupted run with other inputs (differs in: "
            f"{', '.join(diff) or 'version'}); pass resume=False to discard it, or another "
            "work_dir")
      else:
        remove_work(work)
  if lead:
    os.makedirs(work, exist_ok=True)
    if manifest is None:
      manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "key": key,
                  "fingerprint": fp, "embed_done": False, "done": [], "layers": {}}
      write_json(os.path.join(work, MANIFEST), manifest)
    if nproc > 1:
      barrier("quantjax-stream-start")

  # Progress.
  n_layers = cfg.num_layers
  start = len(manifest["done"])
  bar = None
  if progress and lead:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_layers, initial=start, desc=f"stream {getattr(method, 'label', 'method')}",
               unit="layer")

  # The embedding, final norm and head: copied as stored (row blocks), one shard.
  meta = {"format": "pt"}
  if lead and not manifest["embed_done"]:
    manifest["embed_records"] = (gg.write_other_shard if gg else write_other_shard)(
        src, os.path.join(work, "embed.safetensors"), fdt, meta)
    manifest["embed_done"] = True
    write_json(os.path.join(work, MANIFEST), manifest)

  # This process's calibration hidden states at the current layer boundary:
  # [nb / P, B, T, d] float32.
  hidden: Any = None
  hpath = os.path.join(work, hidden_name(start, pid, nproc))
  if start == 0 and on_disk:
    write_carried(hpath, hidden_shape,
                   (embed_rows(src, local_tokens[b]) for b in range(nb_local)))
  elif start == 0:
    hidden = embed_rows(src, local_tokens)
  elif not on_disk:
    hidden = np.load(hpath)
    if hidden.shape != hidden_shape:
      raise ValueError(f"{hpath}: carried hidden states of shape {hidden.shape}, expected "
                       f"{hidden_shape}")
  phase_peak()

  # The block's own forward (models.decoder.Block), with the model's RoPE tables and mask.
  gd_fn, _, as_state, _ = llama.block_api
  graph = gd_fn(cfg)
  rows = bsz * nproc  # rows of a (global) calibration batch
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (rows, t))
  cos, sin, mask = llama.block_inputs(cfg, positions, t, causal=True)

  def block_apply(p, x):
    # BF16 / F16 weights are held as stored and cast up here, inside the computation.
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    return nnx.merge(graph, as_state(cfg, p))(x, cos, sin, mask)[0]

  carry = jax.jit(block_apply)
  segment_cache: dict = {}
  info: dict[str, Any] = {"processes": nproc, "local_batches": nb_local}
  layer_records: list[dict] = []
  for i in range(start):
    rec = dict(manifest["layers"][str(i)]["record"])
    rec["resumed"] = True
    layer_records.append(rec)
    for k, v in manifest["layers"][str(i)].get("info", {}).items():
      info.setdefault(k, {}).update(v)

  for i in range(start, n_layers):
    t0 = time.perf_counter()
    specs = src.layer_specs[i]
    layer: dict = {}
    for spec in specs:  # one tensor at a time: the stored copy is dropped once converted
      v = src.stored(spec)
      if v.dtype not in (FLOAT_DTYPES["bfloat16"], FLOAT_DTYPES["float16"]):
        v = np.asarray(v, np.float32)
      set_leaf(layer, spec.path[2:], jnp.asarray(v.T if spec.kind == "linear" else v))
      del v
    src.release()  # a GGUF source's pages of this layer leave the process
    params = {"layers": {i: layer}}

    def fn(p, x, _i=i):
      return block_apply(p["layers"][_i], x)

    if on_disk:  # read by the driver one batch at a time
      batches_i = Carried(os.path.join(work, hidden_name(i, pid, nproc)), hidden_shape)
    elif mesh is None:
      batches_i = [jnp.asarray(hidden[b]) for b in range(nb_local)]
    else:  # global batches: this process's rows, the other processes' rows
      batches_i = [jax.make_array_from_process_local_data(row_sharding, hidden[b])
                   for b in range(nb_local)]
    with warnings.catch_warnings():
      # Rules for other layers match nothing here; coverage was checked on the whole model.
      warnings.simplefilter("ignore")
      # donate: each projection's float32 array is freed once its result replaces it.
      res = capture_lib.calibrate(fn, params, batches_i, rules, method, mode="sequential",
                                  progress=False, segment_cache=segment_cache, mesh=mesh,
                                  memory=capture_lib.MemoryOptions(
                                      donate=True, activation_limit=activation_limit,
                                      activation_dir=os.path.join(work, ACTIVATIONS),
                                      stand_in_dtype=jnp.float32))
    new_layer = res.params["layers"][i]
    # Encode exactly as export_hf does; float leaves (norms, skipped weights) as stored.
    entries, recs, schemes = {}, [], {}
    eff: dict = {}
    for spec in specs:
      leaf = get_leaf(new_layer, spec.path[2:])
      spath = "/".join(map(str, spec.path))
      if isinstance(leaf, (ActQuantized, InputScaled)):
        raise ValueError(f"{spath}: the method returned a {type(leaf).__name__}; streaming "
                         "supports weight-only results (no activation quantization, no "
                         "unfolded input scales)")
      changed = leaf is not get_leaf(layer, spec.path[2:])
      if gg is not None:  # GGUF: the tensor's bytes in the file, as export_gguf encodes them
        raw, rec = gg.encode(spec.path, leaf if changed else np.asarray(leaf, np.float32))
        entries[rec.name] = (raw.dtype, raw.shape, (raw,))
        recs.append(dataclasses.asdict(rec))
        if changed:
          set_leaf(eff, spec.path[2:], capture_lib.effective_weight(leaf, jnp.float32))
        else:
          set_leaf(eff, spec.path[2:], get_leaf(layer, spec.path[2:]))
        continue
      if changed:
        out, scheme, rec = hf.encode_leaf(spec, leaf, fdt)
        set_leaf(eff, spec.path[2:], capture_lib.effective_weight(leaf, jnp.float32))
      else:  # as stored (norms, skipped weights): read again, not kept during the method
        v = src.stored(spec)
        out, scheme, rec = hf.encode_leaf(spec, v.T if spec.kind == "linear" else v, fdt)
        del v
        set_leaf(eff, spec.path[2:], get_leaf(layer, spec.path[2:]))
      for name, arr in out.items():
        entries[name] = (arr.dtype, arr.shape, (arr,))
      recs.append(dataclasses.asdict(rec))
      if scheme is not None:
        schemes[spec.module] = scheme_json(scheme)
    src.release()
    if lead:
      write_shard(os.path.join(work, f"layer-{i:05d}.safetensors"), entries, meta)
    del entries
    # The next layer's inputs: this layer's output with its quantized (effective) weights.
    hname = hidden_name(i + 1, pid, nproc)
    if on_disk:
      write_carried(os.path.join(work, hname), hidden_shape,
                     (np.asarray(carry(eff, jnp.asarray(batches_i[b]))) for b in range(nb_local)))
    else:
      hidden = np.stack([local_rows(carry(eff, batches_i[b])) for b in range(nb_local)])
    timings = {"stats_seconds": float(res.info.get("stats_seconds", 0.0)),
               "quant_seconds": float(res.info.get("quant_seconds", 0.0)),
               "compiles": int(res.info.get("compiles", 0)),
               "spilled_bytes": int(res.info.get("spilled_bytes", 0))}
    layer_info = {k: {n: float(x) for n, x in v.items()} for k, v in res.info.items()
                  if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())}
    for k, v in layer_info.items():
      info.setdefault(k, {}).update(v)
    del batches_i, eff, layer, params, res, new_layer
    if not on_disk:
      with atomic.atomic_write(os.path.join(work, hname)) as f:
        np.save(f, hidden)
    if nproc > 1:
      barrier(f"quantjax-stream-layer-{i}")  # every process's hidden states are on disk
    peak = phase_peak()
    rec = {"layer": i, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak,
           "resumed": False, **timings}
    manifest["layers"][str(i)] = {"record": {k: v for k, v in rec.items() if k != "resumed"},
                                  "records": recs, "schemes": schemes, "info": layer_info}
    manifest["done"].append(i)
    if lead:
      write_json(os.path.join(work, MANIFEST), manifest)
    if nproc > 1:
      barrier(f"quantjax-stream-manifest-{i}")  # the manifest names layer i as done
    atomic.unlink_quiet(os.path.join(work, hidden_name(i, pid, nproc)))  # (none at 0 in memory)
    layer_records.append(rec)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(layer_s=f"{rec['seconds']:.1f}",
                      rss_gb=f"{(peak or 0) / 2**30:.2f}")
    if on_layer is not None:
      on_layer(i, rec)
  if bar is not None:
    bar.close()
  del hidden

  # Finish: link the shards into a fresh directory with index, config and report; commit.
  if nproc > 1:
    barrier("quantjax-stream-layers-done")
    if not lead:  # process 0's manifest (only it holds the embedding's records)
      with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
  if gg is not None:
    report = [gg.record(r) for r in manifest["embed_records"]] + [
        gg.record(r) for i in range(n_layers) for r in manifest["layers"][str(i)]["records"]]
    if lead:
      tok = tokenizer
      if tok == "auto":
        tok = src.tokenizer
      gg.write(output, work, n_layers, tok, getattr(cfg, "name", "") or base)
    return _finish(nproc, lead, keep_work, work, phase_peak, output, layer_records, start,
                   t_start, peaks, report, info)
  n_files = n_layers + 1
  names = [f"model-{k + 1:05d}-of-{n_files:05d}.safetensors" for k in range(n_files)]
  sources = [os.path.join(work, "embed.safetensors")] + [
      os.path.join(work, f"layer-{i:05d}.safetensors") for i in range(n_layers)]
  tensor_recs = [hf.TensorExport(**r) for r in manifest["embed_records"]]
  schemes: dict[str, hf.Scheme] = {}
  weight_map: dict[str, str] = {}
  for r in manifest["embed_records"]:
    weight_map[r["name"]] = names[0]
  for i in range(n_layers):
    entry = manifest["layers"][str(i)]
    for r in entry["records"]:
      tensor_recs.append(hf.TensorExport(**{**r, "shape": tuple(r["shape"])}))
    for m, sj in entry["schemes"].items():
      schemes[m] = scheme_from(sj)
  for k, path in enumerate(sources[1:], start=1):
    for name in st.SafetensorsFile(path).keys():
      weight_map[name] = names[k]
  specs = [s for ls in src.layer_specs for s in ls] + src.other_specs
  linear_modules = [s.module for s in specs if s.kind == "linear"]
  qconfig = hf.quantization_config(schemes, linear_modules) if schemes else None
  notes = hf.fused_notes(schemes, linear_modules)
  cfg_out = {"architectures": [src.arch.hf_class], "model_type": src.arch.model_types[0],
             "_name_or_path": getattr(cfg, "name", "") or base,
             **src.arch.to_hf_config(cfg), "dtype": out_dtype, "torch_dtype": out_dtype}
  if qconfig is not None:
    cfg_out["quantization_config"] = qconfig
  files = sorted(names + [hf.INDEX_FILE, "config.json", "generation_config.json",
                          hf.REPORT_FILE])
  report = hf.ExportReport(path=output, tensors=tensor_recs, notes=notes,
                           quantization_config=qconfig, files=files)
  if lead:
    _commit(output, overwrite, kind, src, sources, names, tensor_recs, weight_map, cfg_out,
            report)
  return _finish(nproc, lead, keep_work, work, phase_peak, output, layer_records, start,
                 t_start, peaks, report, info)


def _finish(nproc, lead, keep_work, work, phase_peak, output, layer_records, start, t_start,
            peaks, report, info) -> StreamResult:
  if nproc > 1:
    barrier("quantjax-stream-committed")
  if lead and not keep_work:
    remove_work(work)
  phase_peak()
  if os.path.isdir(output):
    out_bytes = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
  else:
    out_bytes = os.path.getsize(output)
  return StreamResult(path=output, layers=layer_records, resumed_from=start,
                      seconds=time.perf_counter() - t_start,
                      peak_rss_bytes=max(peaks) if peaks else None, output_bytes=out_bytes,
                      report=report, info=info)


def _commit(output, overwrite, kind, src, sources, names, tensor_recs, weight_map, cfg_out,
            report) -> None:
  """The output directory, atomically: the finished shards linked in, index, config, report."""
  with atomic.atomic_dir(output, overwrite=overwrite, kind=kind,
                         meta={"streamed_from": src.path}) as tmp:
    for path, name in zip(sources, names):
      dest = os.path.join(tmp, name)
      try:
        os.link(path, dest)  # no copy: the work directory keeps its own name until the end
      except OSError:
        shutil.copyfile(path, dest)
    index = {"metadata": {"total_size": int(sum(r.nbytes for r in tensor_recs))},
             "weight_map": weight_map}
    with open(os.path.join(tmp, hf.INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg_out, f, indent=2)
    gen = {k: cfg_out[k] for k in ("bos_token_id", "eos_token_id") if k in cfg_out}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    with open(os.path.join(tmp, hf.REPORT_FILE), "w") as f:
      json.dump(report.to_json(), f, indent=1, default=str)
