"""llama.cpp as an independent runtime: perplexity and greedy decoding of a GGUF file.

Uses the `llama-cpp-python` bindings (pinned in setup.py, built from source
by pip). Perplexity follows quantjax's protocol exactly (`eval.perplexity`):
each window of the split is evaluated alone, with no BOS token added by
llama.cpp (pass `split.model_inputs()` and `skip=split.skip` for a model whose
protocol puts BOS in front), and the NLL of tokens 1..window-1 is averaged in
float64, so a number here and one from the JAX model are the same quantity on
the same token ids.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from quantjax import rules as rules_lib
from quantjax.eval import perplexity as ppl_lib
from quantjax.io import gguf as gguf_io
from quantjax.io.gguf_read import EXTRA_GGML_TYPES
from quantjax.optional import require

__all__ = ["available", "open_model", "perplexity", "greedy", "prefill_decode", "quantize",
           "ggml_quantize_rows", "ggml_quantize_params"]


def available() -> bool:
  """True when `llama_cpp` imports."""
  try:
    import llama_cpp  # noqa: F401
  except Exception:  # pragma: no cover - import errors of a native module vary
    return False
  return True


@contextlib.contextmanager
def open_model(path: str | os.PathLike, *, n_ctx: int = 512, n_threads: int | None = None):
  """A `llama_cpp.Llama` over `path` with logits for every position, closed on exit."""
  Llama = require("llama_cpp", "llamacpp", "llama.cpp evaluation").Llama
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  llm = Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
              n_threads=n_threads or max(1, os.cpu_count() or 1), verbose=False, seed=0)
  try:
    yield llm
  finally:
    llm.close()


def perplexity(path: str | os.PathLike, windows: np.ndarray, *, progress: bool = False,
               n_threads: int | None = None, baseline: Any = None,
               skip: int = 0) -> dict[str, Any]:
  """Perplexity of the GGUF at `path` over `windows` (`[n, window]` token ids).

  `skip` leading predictions of each window are not scored (1 when the
  windows start with the protocol's BOS).

  With `baseline` (`quantjax.eval.perplexity.Baseline` on windows whose first
  `n` are these), also the KL divergence and top-1 agreement against it,
  computed as `eval.perplexity.evaluate` computes them.

  Returns `{"perplexity", "nll", "per_window_nll", "tokens", "seconds",
  "eval_tokens_per_s"}` (+ `kl_mean`, `kl_p99`, `top1_agreement`,
  `kl_rest_mass`, `kl_top_k`).
  """
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[1] < 2 + skip:
    raise ValueError(f"windows must be [n, window >= {2 + skip}] token ids, got shape "
                     f"{windows.shape}")
  n, w = windows.shape
  if baseline is not None and baseline.top_idx.shape[1] != w - 1 - skip:
    raise ValueError(f"the reference distribution is for windows of "
                     f"{baseline.top_idx.shape[1] + 1} tokens, not {w - skip}")
  if baseline is not None and baseline.top_idx.shape[0] < n:
    raise ValueError(f"the reference distribution covers {baseline.top_idx.shape[0]} windows, "
                     f"not {n}")
  total, count = 0.0, 0
  per_window, kls, top1s, rests = [], [], [], []
  t0 = time.perf_counter()
  with open_model(path, n_ctx=w, n_threads=n_threads) as llm:
    it = range(n)
    if progress:
      from tqdm.auto import tqdm
      it = tqdm(it, desc="llama.cpp ppl", unit="win")
    for i in it:
      ids = [int(t) for t in windows[i]]
      llm.reset()
      llm.eval(ids)
      logits = np.asarray(llm.scores[:w], np.float32)
      b = (None, None) if baseline is None else (baseline.top_idx[i], baseline.top_lp[i])
      nll, kl, top1, rest = ppl_lib.token_stats(logits[skip:w - 1], ids[1 + skip:], *b)
      nll_w = float(nll.sum())
      if baseline is not None:
        kls.append(kl)
        top1s.append(top1)
        rests.append(rest)
      total += nll_w
      per_window.append(nll_w / (w - 1 - skip))
      count += w - 1 - skip
  seconds = time.perf_counter() - t0
  nll = total / count
  out = {"perplexity": math.exp(nll), "nll": nll, "per_window_nll": per_window, "tokens": count,
         "seconds": seconds, "eval_tokens_per_s": n * w / seconds if seconds > 0 else None}
  if baseline is not None:
    out.update(ppl_lib.kl_summary(kls, top1s, rests, baseline.k))
  return out


def greedy(path: str | os.PathLike, prompt: Sequence[int], steps: int, *,
           n_ctx: int = 512) -> list[int]:
  """Greedy (argmax) continuation of `prompt` for `steps` tokens, via llama.cpp."""
  ids = [int(t) for t in prompt]
  out: list[int] = []
  with open_model(path, n_ctx=n_ctx) as llm:
    llm.reset()
    llm.eval(ids)
    for _ in range(steps):
      nxt = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])))
      out.append(nxt)
      llm.eval([nxt])
  return out


def prefill_decode(path: str | os.PathLike, prompts: Sequence[np.ndarray], *,
                   decode_steps: int = 32, repeats: int = 3,
                   n_threads: int | None = None) -> list[dict[str, Any]]:
  """llama.cpp's prefill and greedy decode throughput, one record per prompt batch.

  The same measurement as `quantjax.eval.speed.prefill_decode`, through
  llama.cpp's batch API: each prompt batch `[B, T]` is B sequences of one
  context (`n_seq_max=B`); prefill is one `llama_decode` of the B*T prompt
  tokens, decode is `decode_steps` calls of B tokens (one per sequence, the
  argmax of its last logits). The memory is cleared before each repeat; the
  median of `repeats` is reported. Returns dicts with the keys of
  `speed.prefill_decode` (no compile times), plus `greedy_tokens_row0`: the
  first sequence's greedy tokens (the prefill's argmax, then each step's).
  """
  import ctypes
  import logging

  lc = require("llama_cpp", "llamacpp", "llama.cpp evaluation")
  import llama_cpp._logger  # noqa: F401 - installs the log callback that honours this logger
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  threads = n_threads or max(1, os.cpu_count() or 1)
  log = logging.getLogger("llama-cpp-python")
  old_level = log.level
  log.setLevel(logging.ERROR)
  lc.llama_backend_init()
  mparams = lc.llama_model_default_params()
  model = lc.llama_model_load_from_file(path.encode(), mparams)
  if not model:
    raise RuntimeError(f"llama.cpp could not load {path}")
  vocab = lc.llama_model_get_vocab(model)
  n_vocab = lc.llama_vocab_n_tokens(vocab)
  out = []
  try:
    for prompt in prompts:
      prompt = np.asarray(prompt, np.int64)
      if prompt.ndim != 2:
        raise ValueError(f"prompts must be [B, T] token ids, got shape {prompt.shape}")
      b, t = prompt.shape
      cparams = lc.llama_context_default_params()
      cparams.n_ctx = b * (t + decode_steps + 8)
      cparams.n_batch = b * t
      cparams.n_ubatch = min(512, b * t)
      cparams.n_seq_max = b
      cparams.n_threads = threads
      cparams.n_threads_batch = threads
      ctx = lc.llama_init_from_model(model, cparams)
      if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for {path} (batch {b})")
      batch = lc.llama_batch_init(b * t, 0, 1)
      try:
        def fill(tokens, pos, last):
          n = len(tokens)
          batch.n_tokens = n
          for i in range(n):
            batch.token[i] = int(tokens[i])
            batch.pos[i] = int(pos[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = int(i // (n // b))
            batch.logits[i] = int(last[i])

        def decode():
          rc = lc.llama_decode(ctx, batch)
          if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({path}, batch {b})")

        def next_tokens():
          nxt = []
          for i in range(batch.n_tokens):
            if batch.logits[i]:
              ptr = lc.llama_get_logits_ith(ctx, i)
              row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                          shape=(n_vocab,))
              nxt.append(int(np.argmax(row)))
          return nxt

        flat = prompt.reshape(-1)
        pos = np.tile(np.arange(t), b)
        last = np.tile(np.arange(t) == t - 1, b)
        pre_s, dec_s = [], []
        for _ in range(repeats + 1):  # the first round warms up
          lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
          fill(flat, pos, last)
          t0 = time.perf_counter()
          decode()
          lc.llama_synchronize(ctx)
          pre_s.append(time.perf_counter() - t0)
          toks = next_tokens()
          generated = [toks[0]]
          t0 = time.perf_counter()
          for step in range(decode_steps):
            fill(toks, [t + step] * b, [True] * b)
            decode()
            toks = next_tokens()
            generated.append(toks[0])
          dec_s.append(time.perf_counter() - t0)
        pre, dec = float(np.median(pre_s[1:])), float(np.median(dec_s[1:]))
        out.append({"batch": b, "prompt_len": t, "decode_steps": decode_steps,
                    "prefill_s": pre, "prefill_tokens_per_s": b * t / pre,
                    "decode_step_ms": 1e3 * dec / decode_steps,
                    "decode_tokens_per_s": b * decode_steps / dec, "threads": threads,
                    "greedy_tokens_row0": generated})
      finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
  finally:
    lc.llama_model_free(model)
    log.setLevel(old_level)
  return out


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str, *,
             n_threads: int | None = None) -> None:
  """Runs llama.cpp's own quantizer (`llama-quantize`) on `src` into `dst`.

  `ftype` is a llama.cpp file type without its prefix: "Q4_0", "Q4_K_M",
  "Q3_K_M", "Q8_0", ... The output is written to a temporary name and renamed.
  """
  import ctypes

  llama_cpp = require("llama_cpp", "llamacpp", "llama.cpp")
  name = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"
  if not hasattr(llama_cpp, name):
    known = sorted(k[len("LLAMA_FTYPE_MOSTLY_"):] for k in dir(llama_cpp)
                   if k.startswith("LLAMA_FTYPE_MOSTLY_"))
    raise ValueError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(known)}")
  src, dst = os.fspath(src), os.fspath(dst)
  if not os.path.exists(src):
    raise FileNotFoundError(f"GGUF file not found: {src}")
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = getattr(llama_cpp, name)
  params.nthread = n_threads or (os.cpu_count() or 1)
  tmp = dst + ".tmp"
  rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
  if rc != 0 or not os.path.exists(tmp):
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype} (return code {rc})")
  os.replace(tmp, dst)


def ggml_quantize_rows(x: np.ndarray, type_name: str,
                       importance: np.ndarray | None = None) -> np.ndarray:
  """ggml's own row quantizer (`ggml_quantize_chunk`) on float32 rows `[rows, n]`.

  Returns the GGUF bytes `[rows, row bytes]`: the reference quantjax's
  encoders are compared with (`tests/io/test_kquants.py`).
  """
  import ctypes

  llama_cpp = require("llama_cpp", "llamacpp", "llama.cpp")
  lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
  lib = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
  qt, block, type_bytes = _ggml_type(type_name)
  x = np.ascontiguousarray(x, np.float32)
  rows, n = x.shape
  if n % block:
    raise ValueError(f"rows of {n} values do not fill {type_name}'s blocks of {block}")
  out = np.zeros((rows, n // block * type_bytes), np.uint8)
  imp = None
  if importance is not None:
    imp = np.ascontiguousarray(importance, np.float32).reshape(n)
  lib.ggml_quantize_init.argtypes = [ctypes.c_int]
  lib.ggml_quantize_init(int(qt))
  fn = lib.ggml_quantize_chunk
  fn.restype = ctypes.c_size_t
  fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                 ctypes.c_int64, ctypes.c_void_p]
  written = fn(int(qt), x.ctypes.data, out.ctypes.data, 0, rows, n,
               None if imp is None else imp.ctypes.data)
  if written != out.nbytes:
    raise RuntimeError(f"ggml wrote {written} bytes for {type_name}, expected {out.nbytes}")
  return out


def _ggml_type(type_name: str) -> tuple[int, int, int]:
  """(ggml id, values per block, bytes per block) of a ggml type name, including the types
  newer than gguf-py (`EXTRA_GGML_TYPES`: Q2_0)."""
  gguf = require("gguf", "gguf", "GGUF files")
  if type_name in gguf.GGMLQuantizationType.__members__:
    qt = gguf.GGMLQuantizationType[type_name]
    block, type_bytes = gguf.GGML_QUANT_SIZES[qt]
    return int(qt), int(block), int(type_bytes)
  for tid, (name, block, type_bytes) in EXTRA_GGML_TYPES.items():
    if name == type_name:
      return int(tid), int(block), int(type_bytes)
  raise ValueError(f"unknown ggml type {type_name!r}")


def ggml_quantize_params(params: Any, targets: str, type_name: str, *,
                         importance: dict[str, np.ndarray] | None = None,
                         progress: bool = False) -> Any:
  """llama.cpp's own quantizer as a params transform: every 2-D `[in, out]` kernel whose
  path fully matches the regex `targets` is quantized row by row (rows: the output
  channels) by ggml's `ggml_quantize_chunk` into GGUF type `type_name`, with
  `importance[path]` (mean x² per input feature, `methods.importance.input_importance`)
  as its importance vector where given, as `llama-quantize --imatrix` hands it over. The
  leaves come back as QArrays of `io.gguf.block_format(type_name)` holding ggml's codes and
  scales, so a GGUF export writes llama.cpp's bytes unchanged, beside any other tensor
  quantized our way: llama.cpp's quantizer and ours at the same per-tensor types and size.
  """
  import re

  pat = re.compile(targets)
  flat = dict(rules_lib.tree_leaves_with_paths(params))
  done = {}
  paths = [p for p, leaf in flat.items()
           if pat.fullmatch(p) and getattr(leaf, "ndim", 0) == 2]
  if not paths:
    raise ValueError(f"ggml_quantize_params: no 2-D leaf matches {targets!r}")
  it = paths
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(paths, desc=f"llama.cpp {type_name}", unit="tensor")
  for p in it:
    rows = np.ascontiguousarray(np.asarray(flat[p], np.float32).T)  # GGUF's [out, in]
    imp = None if importance is None else importance.get(p)
    if importance is not None and imp is None:
      raise ValueError(f"ggml_quantize_params: no importance vector for {p}")
    raw = ggml_quantize_rows(rows, type_name, imp)
    done[p] = gguf_io.blocks_to_qarray(raw, type_name, 0)
  return rules_lib.map_with_paths(lambda p, leaf: done.get(p, leaf), rules_lib.to_pure(params))
