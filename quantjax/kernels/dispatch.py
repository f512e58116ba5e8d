"""Chooses how `ops.qdot` computes a matmul with a `QArray` weight.

Paths: `"xla"` (dequantize then `dot_general`, the reference, works on every
backend), `"kernel"` (the Pallas kernel, native lowering) and `"interpret"`
(the same kernel in Pallas interpret mode, for CPU tests). `"auto"` (the
default) takes the XLA path: the kernels are verified against their
references in interpret mode, but their GPU/TPU lowering has not been run on
hardware from this repository yet, so they are opt-in via
`matmul_path("kernel")` until it has. Forcing a path no kernel supports is a
clear error.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

_PATHS = ("auto", "xla", "kernel", "interpret")
_state = threading.local()

# Registered kernels: (can_use(x, w, contract_axis) -> bool, run(x, w, contract_axis, interpret) -> Array).
_KERNELS: list[tuple[str, Callable[..., bool], Callable[..., Any]]] = []


# Flip once the kernels' native lowering is verified on GPU/TPU (see module doc).
_AUTO_USES_KERNELS = False


def current_path() -> str:
  return getattr(_state, "path", "auto")


@contextlib.contextmanager
def matmul_path(path: str) -> Iterator[None]:
  """Forces how `qdot` runs inside the block: auto, xla, kernel or interpret."""
  if path not in _PATHS:
    raise ValueError(f"unknown matmul path {path!r}; expected one of {_PATHS}")
  old = current_path()
  _state.path = path
  try:
    yield
  finally:
    _state.path = old


def register_kernel(name: str, can_use: Callable[..., bool], run: Callable[..., Any]) -> None:
  """Adds a kernel that `qdot` may dispatch to."""
  _KERNELS.append((name, can_use, run))


def quantized_matmul(x, w, *, contract_axis: int = 0, precision: Any = None):
  """Runs a registered kernel if the path allows one; returns None for the XLA path."""
  del precision
  path = current_path()
  if path == "xla":
    return None
  import jax
  on_accel = jax.default_backend() in ("gpu", "tpu")
  for name, can_use, run in _KERNELS:
    if not can_use(x, w, contract_axis):
      continue
    if path == "interpret":
      return run(x, w, contract_axis, interpret=True)
    if path == "kernel" or (path == "auto" and on_accel and _AUTO_USES_KERNELS):
      return run(x, w, contract_axis, interpret=False)
  if path in ("kernel", "interpret"):
    raise ValueError(
        f"matmul path {path!r} forced but no registered kernel accepts weight format "
        f"{getattr(w, 'fmt', None)} with shape {getattr(w, 'shape', None)}")
  return None


def _register_builtin() -> None:
  from quantjax.kernels import wq_matmul

  def run(x, w, contract_axis, interpret):
    return wq_matmul.wq_matmul(x, w, interpret=interpret)

  register_kernel("wq_matmul", wq_matmul.can_use_wq_matmul, run)


_register_builtin()
