"""The perplexity protocol (every quality number in quantjax uses it).

Each evaluation window `[window]` is scored independently: the model sees the
window alone (after a BOS token when the split has one, see
`quantjax.eval.data.Split.model_inputs`) and predicts tokens 1..window-1 from
their prefixes. Perplexity
is `exp(mean NLL)` over all `eval_windows * (window - 1)` predicted tokens;
logits and the log-softmax are float32, the mean is accumulated in float64.
See `quantjax.eval.data` for the corpus and the split.

The model is any `forward(params, tokens [B, T]) -> logits [B, T, vocab]`:
quantjax's own models (`models.llama.forward_fn(config)`), a user's model, or
`nll_fn` for a model outside JAX (e.g. transformers) scored the same way. The
scoring function is jitted once per evaluation (parameter structure and batch
shape); windows are batched (`batch_size`, default 8) and a short last batch
is padded with copies whose scores are dropped.

**Beyond perplexity** (llama.cpp's `--kl-divergence` statistics): a reference
run (normally FP32) keeps, per predicted token, its `top_k` log-probabilities
and token ids (`Baseline`, a few MB instead of the full `[tokens, vocab]`
logits). Every later evaluation with `baseline=` reports

* `kl_mean` / `kl_p99`: the KL divergence `KL(P_ref || P)` per token, over
  the reference's top-k tokens plus one bucket holding the rest of the
  probability mass on both sides. Merging tokens can only lower a KL
  divergence (log-sum inequality), so this is a lower bound of the full KL,
  exact when the reference puts all its mass on its top k; the record keeps
  the mean reference mass outside the top k (`kl_rest_mass`) so the gap is
  visible (about 2% of the mass at k=64 for SmolLM2-135M on the protocol);
* `top1_agreement`: the share of positions where both pick the same most
  likely token (exact; a tie for this model's maximum counts as agreement).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.eval import data as data_lib

__all__ = ["Baseline", "environment", "evaluate", "evaluate_logits", "kl_summary",
           "token_nll", "token_stats"]


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """jax/jaxlib versions and the device, for result records."""
  import jaxlib
  dev = jax.devices()[0]
  return {
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(jaxlib, "__version__", "unknown"),
      "backend": jax.default_backend(),
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
      "device_count": jax.device_count(),
      "cpu": _cpu_name(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
  }


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token NLL `[B, T-1]` (float32) from logits `[B, T, V]` and tokens `[B, T]`."""
  return _nll_from_shifted(logits[:, :-1], tokens[:, 1:])


def _nll_from_shifted(logits: jax.Array, targets: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - tgt


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A reference model's top-k next-token distribution on the evaluation windows.

  Attributes:
    top_idx: int32 `[windows, window - 1, k]` token ids, most likely first.
    top_lp: float32 `[windows, window - 1, k]` their log-probabilities.
    perplexity: the reference's perplexity on the same windows.
    windows_sha256: hash of the token ids it was computed on (checked on use).
  """

  top_idx: np.ndarray
  top_lp: np.ndarray
  perplexity: float
  windows_sha256: str

  @property
  def k(self) -> int:
    return int(self.top_idx.shape[-1])

  def save(self, path: str | os.PathLike) -> None:
    """Writes an `.npz` atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
      np.savez(tmp, top_idx=self.top_idx, top_lp=self.top_lp,
               perplexity=np.float64(self.perplexity),
               windows_sha256=np.array(self.windows_sha256))
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Baseline":
    try:
      with np.load(os.fspath(path)) as z:
        return cls(top_idx=z["top_idx"], top_lp=z["top_lp"], perplexity=float(z["perplexity"]),
                   windows_sha256=str(z["windows_sha256"]))
    except (OSError, KeyError, ValueError) as e:
      raise ValueError(f"reference distribution file {path} cannot be read ({e}); delete it to "
                       "recompute it") from None


def windows_sha256(windows: np.ndarray) -> str:
  import hashlib
  w = np.ascontiguousarray(np.asarray(windows, np.int32))
  return hashlib.sha256(w.tobytes() + str(w.shape).encode()).hexdigest()


def _scorer(forward: Callable[[Any, jax.Array], jax.Array], collect_k: int, with_base: bool,
            skip: int = 0):
  """`(params, tokens, base_idx, base_lp) -> dict` of per-token statistics; the first
  `skip` predictions (the one made from a BOS token) are not scored."""

  def score(params, tokens, base_idx, base_lp):
    logits = forward(params, tokens)[:, skip:-1]
    return _stats(logits, tokens[:, skip + 1:], collect_k, base_idx if with_base else None,
                  base_lp)
  return score


def _stats(logits: jax.Array, targets: jax.Array, collect_k: int = 0,
           base_idx: jax.Array | None = None, base_lp: jax.Array | None = None) -> dict:
  """Per-position statistics of float32 logits `[..., V]` against `targets [...]`: `nll`;
  with `collect_k` the top-k log-probabilities and ids; with a reference top-k
  `(base_idx, base_lp)` the KL divergence (top-k plus one bucket for the rest), the top-1
  agreement and the reference's mass outside its top k. One definition for every
  runtime (JAX models, and logits from llama.cpp or transformers via `token_stats`)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  out = {"nll": lse - tgt}
  if collect_k:
    vals, idx = jax.lax.top_k(logits, collect_k)
    out["top_lp"] = vals - lse[..., None]
    out["top_idx"] = idx.astype(jnp.int32)
  if base_idx is not None:
    q = jnp.take_along_axis(logits, base_idx, axis=-1) - lse[..., None]
    p = jnp.exp(base_lp)
    p_rest = jnp.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = jnp.clip(1.0 - jnp.exp(q).sum(-1), 1e-12, 1.0)
    rest = jnp.where(p_rest > 1e-9,
                     p_rest * (jnp.log(jnp.maximum(p_rest, 1e-30)) - jnp.log(q_rest)), 0.0)
    out["kl"] = jnp.maximum((p * (base_lp - q)).sum(-1) + rest, 0.0)
    out["rest"] = p_rest
    # The reference's most likely token is (one of) this model's most likely: a max and
    # a compare, where an argmax over the vocabulary cost 6x a max on CPU.
    top = jnp.take_along_axis(logits, base_idx[..., :1], axis=-1)[..., 0]
    out["top1"] = top >= jnp.max(logits, axis=-1)
  return out


_stats_jit = jax.jit(_stats, static_argnames=("collect_k",))


def evaluate(forward: Callable[[Any, jax.Array], jax.Array] | None, params: Any,
             split: data_lib.Split, *, batch_size: int = 8, progress: bool = True,
             model_name: str = "unknown", dtype: str = "float32",
             nll_fn: Callable[[np.ndarray], Any] | None = None,
             baseline: Baseline | None = None, collect_top_k: int = 0,
             max_logits_bytes: float = 2e9, desc: str = "perplexity") -> dict[str, Any]:
  """Scores `split.eval_windows` and returns a result record.

  Args:
    forward: `forward(params, tokens [B, T]) -> logits [B, T, V]`; any JAX
      model (ignored when `nll_fn` is given).
    params: its params (arrays or QArrays; any pytree `forward` takes).
    split: from `quantjax.eval.data.load_split`.
    batch_size: windows per forward pass.
    progress: show a tqdm bar over windows.
    model_name: recorded as `model`.
    dtype: the activation dtype, recorded.
    nll_fn: instead of `forward`, a `tokens [B, T] -> NLL [B, T-1]` callable
      scoring another runtime (e.g. transformers) by the same protocol.
    baseline: a reference distribution (`Baseline`) on the same windows: adds
      `kl_mean`, `kl_p99`, `top1_agreement` and `kl_rest_mass`.
    collect_top_k: keep this model's top-k distribution; the record then holds
      a `Baseline` under the key `"baseline"` (pop it before writing JSON).
    max_logits_bytes: fewer windows per batch when a batch's float32 logits
      would exceed this (Gemma's 262,144-token vocabulary: 3 windows of 512).
    desc: progress-bar label.

  Returns:
    A dict with `perplexity`, `nll`, `per_window_nll`, the protocol fields of
    `split.record()`, `dtype`, environment fields and wall times
    (`compile_s`, `eval_s`, `eval_tokens_per_s`).
  """
  windows = np.asarray(split.model_inputs(), np.int32)  # BOS in front when the split has one
  skip = split.skip
  n, t = windows.shape
  bs = max(1, min(batch_size, n))
  if nll_fn is None and forward is not None:
    # Float32 logits of a whole batch are materialised: cap them (large vocabularies).
    vocab = jax.eval_shape(forward, params, jax.ShapeDtypeStruct((1, t), jnp.int32)).shape[-1]
    bs = max(1, min(bs, int(max_logits_bytes // (t * vocab * 4))))
  if baseline is not None:
    if baseline.windows_sha256 != windows_sha256(windows):
      raise ValueError("the reference distribution was computed on other token windows than "
                       f"this split ({split.corpus}, {n} x {t}); recompute it")
  if nll_fn is not None and (baseline is not None or collect_top_k):
    raise ValueError("KL statistics need a JAX forward (logits), not an nll_fn")

  t0 = time.perf_counter()
  k = baseline.k if baseline is not None else 1
  if nll_fn is None:
    if forward is None:
      raise ValueError("evaluate needs a forward function or an nll_fn")
    jitted = jax.jit(_scorer(forward, int(collect_top_k), baseline is not None, skip))
    dummy_idx = jnp.zeros((bs, t - 1 - skip, k), jnp.int32)
    dummy_lp = jnp.zeros((bs, t - 1 - skip, k), jnp.float32)
    compiled = jitted.lower(params, jnp.zeros((bs, t), jnp.int32), dummy_idx, dummy_lp).compile()

    def run(batch, sl):
      if baseline is not None:
        bi, bl = baseline.top_idx[sl], baseline.top_lp[sl]
        if bi.shape[0] < bs:
          bi = np.concatenate([bi, np.repeat(bi[-1:], bs - bi.shape[0], 0)])
          bl = np.concatenate([bl, np.repeat(bl[-1:], bs - bl.shape[0], 0)])
      else:
        bi, bl = dummy_idx, dummy_lp
      return compiled(params, jnp.asarray(batch), jnp.asarray(bi), jnp.asarray(bl))
  else:
    def run(batch, sl):
      return {"nll": np.asarray(nll_fn(batch))[:, skip:]}
  compile_s = time.perf_counter() - t0

  parts: dict[str, list[np.ndarray]] = {}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc=desc, unit="win", leave=False)
  t1 = time.perf_counter()
  for i in range(0, n, bs):
    batch = windows[i:i + bs]
    real = batch.shape[0]
    if real < bs:
      batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, 0)])
    out = run(batch, slice(i, i + real))
    for key, v in out.items():
      parts.setdefault(key, []).append(np.asarray(v)[:real])
    if bar is not None:
      bar.update(real)
  eval_s = time.perf_counter() - t1
  if bar is not None:
    bar.close()
  nll = np.concatenate(parts["nll"]).astype(np.float64)
  mean = float(nll.mean())
  rec: dict[str, Any] = {
      "model": model_name,
      "perplexity": math.exp(mean),
      "nll": mean,
      "scored_tokens": int(nll.size),
      "per_window_nll": nll.mean(axis=1).tolist(),
      "dtype": dtype,
      "batch_size": int(bs),
      "compile_s": compile_s,
      "eval_s": eval_s,
      "eval_tokens_per_s": n * t / eval_s if eval_s > 0 else float("nan"),
  }
  if baseline is not None:
    kl = np.concatenate(parts["kl"]).astype(np.float64)
    rec.update({
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "top1_agreement": float(np.concatenate(parts["top1"]).mean()),
        "kl_rest_mass": float(np.concatenate(parts["rest"]).mean()),
        "kl_top_k": int(baseline.k),
        "reference_perplexity": baseline.perplexity,
    })
  if collect_top_k:
    rec["baseline"] = Baseline(top_idx=np.concatenate(parts["top_idx"]),
                               top_lp=np.concatenate(parts["top_lp"]).astype(np.float32),
                               perplexity=rec["perplexity"],
                               windows_sha256=windows_sha256(windows))
  rec.update(split.record())
  rec.update(environment())
  return rec


def token_stats(logits: np.ndarray, targets: np.ndarray, base_idx: np.ndarray | None = None,
                base_lp: np.ndarray | None = None):
  """Per-position `(nll, kl, top1 agree, reference mass outside its top k)` (numpy) from
  float32 logits `[T, V]` of a runtime outside JAX (llama.cpp, transformers), computed by
  the same jitted definition `evaluate` uses for JAX models (`_stats`: float32
  log-sum-exp, multi-threaded; a 262,144-token vocabulary made a numpy version the
  slowest part of scoring a GGUF); `kl` etc. are None without a reference
  `(base_idx, base_lp) [T, k]`."""
  x = np.asarray(logits, np.float32)
  t = np.asarray(targets, np.int32)
  if base_idx is None:
    r = _stats_jit(x, t)
    return np.asarray(r["nll"], np.float64), None, None, None
  r = _stats_jit(x, t, base_idx=np.asarray(base_idx, np.int32),
                 base_lp=np.asarray(base_lp, np.float32))
  return (np.asarray(r["nll"], np.float64), np.asarray(r["kl"], np.float64),
          np.asarray(r["top1"]), np.asarray(r["rest"], np.float64))


def kl_summary(kls, top1s, rests, k: int) -> dict[str, Any]:
  kl = np.concatenate([np.ravel(x) for x in kls])
  return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
          "top1_agreement": float(np.concatenate([np.ravel(x) for x in top1s]).mean()),
          "kl_rest_mass": float(np.concatenate([np.ravel(x) for x in rests]).mean()),
          "kl_top_k": int(k)}


def evaluate_logits(logits_fn: Callable[[np.ndarray], np.ndarray], split: data_lib.Split, *,
                    baseline: Baseline | None = None, batch_size: int = 8,
                    progress: bool = True, model_name: str = "unknown",
                    desc: str = "perplexity") -> dict[str, Any]:
  """The protocol for a model outside JAX that returns logits (e.g. transformers).

  `logits_fn(tokens [B, T]) -> logits [B, T, V]` (numpy); perplexity, and with
  `baseline` the KL statistics, computed in float64 as `evaluate` defines them.
  """
  windows = np.asarray(split.model_inputs(), np.int32)  # BOS in front when the split has one
  skip = split.skip
  n, t = windows.shape
  if baseline is not None and baseline.top_idx.shape[0] < n:
    raise ValueError(f"the reference distribution covers {baseline.top_idx.shape[0]} windows, "
                     f"not {n}")
  bs = max(1, min(batch_size, n))
  per_window, kls, top1s, rests = [], [], [], []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc=desc, unit="win", leave=False)
  t0 = time.perf_counter()
  for i in range(0, n, bs):
    batch = windows[i:i + bs]
    logits = np.asarray(logits_fn(batch))
    for j in range(batch.shape[0]):
      b = (None, None) if baseline is None else (baseline.top_idx[i + j],
                                                 baseline.top_lp[i + j])
      nll, kl, top1, rest = token_stats(logits[j, skip:-1], batch[j, skip + 1:], *b)
      per_window.append(float(nll.mean()))
      if baseline is not None:
        kls.append(kl)
        top1s.append(top1)
        rests.append(rest)
    if bar is not None:
      bar.update(batch.shape[0])
  eval_s = time.perf_counter() - t0
  if bar is not None:
    bar.close()
  mean = float(np.mean(per_window))
  rec: dict[str, Any] = {"model": model_name, "perplexity": math.exp(mean), "nll": mean,
                         "scored_tokens": int(n * (t - 1 - skip)), "per_window_nll": per_window,
                         "batch_size": int(bs), "eval_s": eval_s,
                         "eval_tokens_per_s": n * t / eval_s if eval_s > 0 else float("nan")}
  if baseline is not None:
    rec.update(kl_summary(kls, top1s, rests, baseline.k), reference_perplexity=baseline.perplexity)
  rec.update(split.record())
  rec.update(environment())
  return rec
