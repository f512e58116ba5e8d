"""Chooses how `ops.qdot` computes a matmul with a `QArray` weight.

Paths: `"xla"` (dequantize then `dot_general`, or the int8 x int8 XLA dot for
W8A8; works on every backend, and is the reference), `"kernel"` (a Pallas
kernel, native lowering), `"interpret"` (the same kernel in Pallas interpret
mode, for CPU tests), `"cpu"` (the C++ CPU kernel of `cpu_matmul`, called
through XLA's FFI) and `"auto"` (the default).

On CPU, `auto` takes the CPU kernel for matmuls with few rows (decode; up to
`cpu_matmul.MAX_ROWS`) when it accepts the weight's format and layout and has
been built, and the XLA path otherwise (with a debug log saying why; set
`QUANTJAX_CPU_KERNEL=0` to keep XLA everywhere). On GPU/TPU it takes a kernel when one
accepts the operands *and* kernels are enabled for auto dispatch: the
kernels match their references in interpret mode and their Triton / Mosaic
lowerings are checked in CI, but they have not yet been run on a GPU or TPU
from this repository, so `auto` keeps XLA until `QUANTJAX_AUTO_KERNELS=1`
(or `set_auto_kernels(True)`). `matmul_path("kernel")` forces them.

Forcing `kernel`/`interpret` for operands no kernel accepts is a clear error;
under `auto`, such a weight goes to XLA and the reason is logged at debug
level.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Any, Callable, Iterator

from quantjax.kernels import cpu_matmul, int4_matmul, int8_matmul, w8a8_matmul

__all__ = ["matmul_path", "current_path", "register_kernel", "quantized_matmul",
           "quantized_matmul_w8a8", "set_auto_kernels", "auto_uses_kernels", "route", "routed", "routed_jit"]

_PATHS = ("auto", "xla", "kernel", "interpret", "cpu")
_state = threading.local()
_log = logging.getLogger(__name__)

# (name, can_use(x, w, contract_axis) -> bool, run(x, w, contract_axis, interpret) -> Array)
_KERNELS: list[tuple[str, Callable[..., bool], Callable[..., Any]]] = []
_auto_override: bool | None = None


def current_path() -> str:
  return getattr(_state, "path", "auto")


@contextlib.contextmanager
def matmul_path(path: str) -> Iterator[None]:
  """Forces how `qdot` runs inside the block: auto, xla, kernel, interpret or cpu."""
  if path not in _PATHS:
    raise ValueError(f"unknown matmul path {path!r}; expected one of {_PATHS}")
  old = current_path()
  _state.path = path
  try:
    yield
  finally:
    _state.path = old


def set_auto_kernels(enabled: bool | None) -> None:
  """Lets `auto` use kernels on GPU/TPU (True), never (False) or per the env var (None)."""
  global _auto_override
  _auto_override = enabled


def auto_uses_kernels() -> bool:
  import jax
  if jax.default_backend() not in ("gpu", "tpu"):
    return False
  traced = getattr(_state, "auto", None)  # set by `routed` while a routed_jit function traces
  if traced is not None:
    return traced
  if _auto_override is not None:
    return _auto_override
  return os.environ.get("QUANTJAX_AUTO_KERNELS", "0").lower() in ("1", "true", "yes")


def route() -> tuple[str, bool]:
  """The current choice (path, whether auto uses kernels) as a hashable value."""
  return current_path(), auto_uses_kernels()


@contextlib.contextmanager
def routed(r: tuple[str, bool]) -> Iterator[None]:
  """Re-enters a `route()` value (in this thread), e.g. while a jitted function traces."""
  old = getattr(_state, "auto", None)
  _state.auto = r[1]
  try:
    with matmul_path(r[0]):
      yield
  finally:
    _state.auto = old


def routed_jit(fn: Callable | None = None, *, static_argnums=(), donate_argnums=()):
  """`jax.jit` for functions that reach `qdot`, re-traced when the matmul path changes.

  `jit` caches traces by argument, not by this module's state, so a plain
  `jax.jit` keeps whichever path it traced first. This one passes `route()`
  as an extra static argument and traces under it. `.lower(*args)` works as
  on a jitted function.
  """
  if fn is None:
    return functools.partial(routed_jit, static_argnums=static_argnums,
                             donate_argnums=donate_argnums)
  import jax

  def shift(nums):
    return tuple(i + 1 for i in ((nums,) if isinstance(nums, int) else nums))

  def traced(r, *args):
    with routed(r):
      return fn(*args)

  jitted = jax.jit(traced, static_argnums=(0,) + shift(static_argnums),
                   donate_argnums=shift(donate_argnums))

  @functools.wraps(fn)
  def call(*args):
    return jitted(route(), *args)

  call.lower = lambda *args: jitted.lower(route(), *args)
  return call


def _kernel_path() -> str | None:
  """"kernel" / "interpret" when this call should try a kernel, else None (XLA)."""
  path = current_path()
  if path in ("xla", "cpu") or (path == "auto" and not auto_uses_kernels()):
    return None
  return "interpret" if path == "interpret" else "kernel"


def register_kernel(name: str, can_use: Callable[..., bool], run: Callable[..., Any]) -> None:
  """Adds a weight-only kernel that `qdot` may dispatch to (tried in registration order)."""
  _KERNELS.append((name, can_use, run))


def _describe(x, w) -> str:
  return (f"weight {getattr(w, 'fmt', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}, "
          f"x {getattr(x, 'dtype', '?')} {tuple(getattr(x, 'shape', ()))}")


def _cpu_backend() -> bool:
  import jax
  return jax.default_backend() == "cpu"


def _cpu_kernel(x, w, contract_axis: int, forced: bool):
  """The CPU kernel's result, or None (XLA path) with a debug log saying why."""
  p, reason = cpu_matmul.plan(x, w, contract_axis, max_rows=None if forced else
                              cpu_matmul.MAX_ROWS)
  if p is not None and not forced and not cpu_matmul.enabled():
    p, reason = None, "QUANTJAX_CPU_KERNEL is off"
  if p is not None and not cpu_matmul.available():
    p, reason = None, f"the CPU kernel is not available ({cpu_matmul.load_error()})"
  if p is None:
    if forced:
      raise ValueError(f"matmul path 'cpu' forced but the CPU kernel does not accept "
                       f"{_describe(x, w)} (contract_axis={contract_axis}): {reason}")
    _log.debug("qdot: CPU kernel declines %s (contract_axis=%d): %s; XLA path",
               _describe(x, w), contract_axis, reason)
    return None
  _log.debug("qdot: cpu_matmul for %s (contract_axis=%d)", _describe(x, w), contract_axis)
  return cpu_matmul.cpu_matmul(x, w, contract_axis, max_rows=None)


def quantized_matmul(x, w, *, contract_axis: int = 0, precision: Any = None):
  """Runs a registered kernel if the path allows one; None means: take the XLA path."""
  del precision
  path = current_path()
  if path == "cpu" or (path == "auto" and _cpu_backend() and not auto_uses_kernels()):
    return _cpu_kernel(x, w, contract_axis, forced=path == "cpu")
  kpath = _kernel_path()
  if kpath is None:
    return None
  for name, can_use, run in _KERNELS:
    if can_use(x, w, contract_axis):
      _log.debug("qdot: %s for %s", name, _describe(x, w))
      return run(x, w, contract_axis, interpret=kpath == "interpret")
  if path in ("kernel", "interpret"):
    raise ValueError(f"matmul path {path!r} forced but no kernel accepts {_describe(x, w)} "
                     f"(contract_axis={contract_axis})")
  _log.debug("qdot: no kernel for %s (contract_axis=%d); XLA path", _describe(x, w), contract_axis)
  return None


def quantized_matmul_w8a8(xq, w, *, out_dtype):
  """The W8A8 kernel on per-token int8 activations `xq`, if the path allows; else None.

  On CPU with few rows, the CPU kernel computes the same product: the int8
  activations times their per-token scales are exact float inputs to its
  float32 accumulation over the int8 weight codes.
  """
  path = current_path()
  if path == "cpu" or (path == "auto" and _cpu_backend() and not auto_uses_kernels()):
    import jax.numpy as jnp
    p, reason = cpu_matmul.plan(xq, w, 0)
    if p is None and path == "auto":
      _log.debug("qdot: CPU kernel declines W8A8 %s: %s; XLA int8 x int8 dot", _describe(xq, w),
                 reason)
      return None
    out = _cpu_kernel(xq.dequantize(jnp.float32), w, 0, forced=path == "cpu")
    return None if out is None else out.astype(out_dtype)
  kpath = _kernel_path()
  if kpath is None:
    return None
  path = current_path()
  if w8a8_matmul.can_use_w8a8_matmul(xq, w):
    return w8a8_matmul.w8a8_matmul(xq, w, interpret=kpath == "interpret", out_dtype=out_dtype)
  if path in ("kernel", "interpret"):
    raise ValueError(f"matmul path {path!r} forced but the W8A8 kernel does not accept "
                     f"{_describe(xq, w)}")
  _log.debug("qdot: no W8A8 kernel for %s; XLA path", _describe(xq, w))
  return None


def _register_builtin() -> None:
  register_kernel("int4_matmul", int4_matmul.can_use_int4_matmul,
                  lambda x, w, axis, interpret: int4_matmul.int4_matmul(x, w, interpret=interpret))
  register_kernel("int8_matmul", int8_matmul.can_use_int8_matmul,
                  lambda x, w, axis, interpret: int8_matmul.int8_matmul(x, w, interpret=interpret))


_register_builtin()
