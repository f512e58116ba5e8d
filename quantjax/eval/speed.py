"""Latency and throughput of any model: prefill and decode tokens/s, timing helpers.

Every figure is measured after a warm-up call; compile time is reported
separately (`compile_s`, from `jit(...).lower(...).compile()`). Timings
block on the result (`block_until_ready`). Report them beside a baseline
measured in the same run (`experiments/bench_decode.py`; evaluation tokens/s
come with every perplexity record).
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Timer", "time_fn", "prefill_decode", "quantize_time", "bench_prompts", "rss_bytes",
           "peak_rss_bytes", "reset_peak_rss", "trim_heap"]


class Timer:
  """`with Timer() as t: ...; t.seconds`."""

  def __enter__(self):
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._t0


def _block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                      x)


def time_fn(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
  """Median / min seconds of `fn()` after `warmup` calls (results are blocked on)."""
  for _ in range(warmup):
    _block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "repeats": repeats}


def quantize_time(fn: Callable[[], Any]) -> tuple[Any, float]:
  """Runs a quantization `fn()` and returns (result, wall seconds incl. device sync)."""
  t0 = time.perf_counter()
  out = _block(fn())
  return out, time.perf_counter() - t0


def _proc_status(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
  except OSError:
    return None
  return int(m.group(1)) * 1024 if m else None


def trim_heap() -> None:
  """Returns freed heap pages to the OS (glibc `malloc_trim`; nothing elsewhere), so
  resident memory shows what is alive, not what was freed (measured: a SmolLM2 worker
  held 1,477 MB after quantizing to q4_0, 751 MB after the trim)."""
  import ctypes
  import ctypes.util
  name = ctypes.util.find_library("c")
  try:
    ctypes.CDLL(name).malloc_trim(0)
  except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
    pass


def rss_bytes() -> int | None:
  """Resident memory of this process now (Linux `VmRSS`; None elsewhere)."""
  return _proc_status("VmRSS")


def peak_rss_bytes() -> int | None:
  """Peak resident memory since start or the last `reset_peak_rss()` (Linux `VmHWM`)."""
  return _proc_status("VmHWM")


def reset_peak_rss() -> bool:
  """Resets the peak to the current resident memory (Linux >= 4.0); False if it cannot."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return False
  return True


def bench_prompts(vocab_size: int, batch_sizes: Sequence[int] = (1, 8), prompt_len: int = 128,
                  seed: int = 0) -> list[np.ndarray]:
  """The random prompts `[B, prompt_len]` that `prefill_decode` uses, one per batch size."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, (b, prompt_len)).astype(np.int32) for b in batch_sizes]


def prefill_decode(decoder: tuple[Callable[..., Any], Callable[..., Any]], params: Any, *,
                   vocab_size: int, batch_sizes=(1, 8), prompt_len: int = 128,
                   decode_steps: int = 32, repeats: int = 3,
                   prompts: Sequence[np.ndarray] | None = None,
                   peak_rss: bool = False) -> list[dict[str, Any]]:
  """Prefill and decode throughput with a KV cache, per batch size, for any model.

  `decoder` is `(init_cache(batch, max_len), step(params, tokens, cache,
  index))`, where `step` returns `(logits of the last position [B, V], cache)`,
  optionally with a third `decode(params, logits, cache, index, n) -> (tokens
  [B, n], cache)` that runs `n` greedy steps on the device; e.g.
  `quantjax.models.llama.decoder(config)`. With `decode`, `decode_tokens_per_s`
  is its figure (the per-step Python loop's is kept as
  `decode_host_loop_tokens_per_s`, and both must give the same tokens). Random prompt ids are drawn
  below `vocab_size`. Prefill: one `[B, prompt_len]` step into an empty cache. Decode:
  `decode_steps` single-token steps after it (greedy). Returns one record per
  batch size with `prefill_tokens_per_s`, `decode_tokens_per_s`, the per-step
  decode latency, the compile times of both shapes and the greedy tokens of
  the first row (`greedy_tokens_row0`: the prefill's argmax, then each step's).
  `prompts` (`[B, T]` arrays, e.g. from `bench_prompts`) replaces the random
  ones. With `peak_rss`, the process's peak resident memory is reset after
  compiling and read after timing (`peak_rss_bytes`: memory while
  prefilling and decoding step by step, compilers excluded; with `decode`,
  also `decode_peak_rss_bytes`: memory while the device loop decodes, reset
  after its compile; Linux only).
  """
  init_cache, step_fn = decoder[0], decoder[1]
  loop_fn = decoder[2] if len(decoder) > 2 else None
  step = jax.jit(step_fn, donate_argnums=2)
  out = []
  if prompts is None:
    prompts = bench_prompts(vocab_size, batch_sizes, prompt_len)
  for prompt in prompts:
    b, prompt_len = np.asarray(prompt).shape
    max_len = prompt_len + decode_steps + 1
    prompt = jnp.asarray(prompt, jnp.int32)
    one = jnp.zeros((b, 1), jnp.int32)
    cache = init_cache(b, max_len)
    t0 = time.perf_counter()
    pre_c = step.lower(params, prompt, cache, jnp.int32(0)).compile()
    compile_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec_c = step.lower(params, one, cache, jnp.int32(prompt_len)).compile()
    compile_decode = time.perf_counter() - t0
    del cache
    if peak_rss:
      reset_peak_rss()

    def prefill():
      return pre_c(params, prompt, init_cache(b, max_len), jnp.int32(0))

    pre = time_fn(prefill, repeats=repeats)
    logits, cache = _block(prefill())
    first = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    generated = []

    def decode():
      c = jax.tree.map(jnp.copy, cache)
      tok = first
      toks = [tok]
      for i in range(decode_steps):
        logits, c = dec_c(params, tok, c, jnp.int32(prompt_len + i))
        tok = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
        toks.append(tok)
      generated[:] = toks
      return tok

    dec = time_fn(decode, repeats=repeats)
    host_tokens = [int(np.asarray(t)[0, 0]) for t in generated]
    dec_loop = None
    peak = peak_rss_bytes() if peak_rss else None  # prefill and per-step decode
    decode_peak = None
    if loop_fn is not None:
      # The same greedy steps in one jitted device loop (no Python per token).
      t0 = time.perf_counter()
      toks, _ = loop_fn(params, logits, jax.tree.map(jnp.copy, cache), prompt_len,
                        decode_steps + 1)
      _block(toks)
      compile_loop = time.perf_counter() - t0

      def decode_loop():
        return loop_fn(params, logits, jax.tree.map(jnp.copy, cache), prompt_len,
                       decode_steps + 1)[0]

      if peak_rss:  # the loop's compile is done: from here on, decoding only
        reset_peak_rss()
      dec_loop = time_fn(decode_loop, repeats=repeats)
      if peak_rss:
        decode_peak = peak_rss_bytes()
      loop_tokens = [int(v) for v in np.asarray(decode_loop())[0]]
    rec = {
        "batch": b,
        "prompt_len": prompt_len,
        "decode_steps": decode_steps,
        "compile_prefill_s": compile_prefill,
        "compile_decode_s": compile_decode,
        "prefill_s": pre["median_s"],
        "prefill_tokens_per_s": b * prompt_len / pre["median_s"],
        "decode_step_ms": 1e3 * dec["median_s"] / decode_steps,
        "decode_tokens_per_s": b * decode_steps / dec["median_s"],
        "greedy_tokens_row0": host_tokens,
    }
    if dec_loop is not None:
      if loop_tokens != host_tokens:
        raise RuntimeError(f"the device decode loop's greedy tokens {loop_tokens} differ from "
                           f"the per-step loop's {host_tokens}")
      rec.update(decode_host_loop_tokens_per_s=rec["decode_tokens_per_s"],
                 decode_host_loop_step_ms=rec["decode_step_ms"],
                 decode_step_ms=1e3 * dec_loop["median_s"] / decode_steps,
                 decode_tokens_per_s=b * decode_steps / dec_loop["median_s"],
                 compile_decode_loop_s=compile_loop, decode_loop=True)
    if peak_rss:
      rec["peak_rss_bytes"] = peak
      if decode_peak is not None:
        rec["decode_peak_rss_bytes"] = decode_peak
    out.append(rec)
  return out
