"""A writer that kills itself (SIGKILL) at a named step of a commit, for the crash tests.

    python crash_writer.py dir  <path> <label> <step|-> <exchange 0|1>
    python crash_writer.py ckpt <path> <label> <step|-> <exchange 0|1>

`dir` loads `quantjax/io/atomic.py` alone (no jax import: a fast process) and
writes a directory whose files say `label`; `ckpt` saves the checkpoint tree
`crash_tree(label)` with `quantjax.io.checkpoint.save_params`. Prints "DONE"
when the write finished without being killed.
"""

import importlib.util
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def load_atomic():
  spec = importlib.util.spec_from_file_location(
      "_atomic_standalone", os.path.join(ROOT, "quantjax", "io", "atomic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def dir_files(label: str) -> dict[str, bytes]:
  """What a `dir` write of `label` holds: a few files, one in a subdirectory."""
  return {"a.txt": f"a {label}\n".encode(), "sub/b.bin": (label * 1000).encode(),
          "c.json": f'{{"label": "{label}"}}\n'.encode()}


def crash_tree(label: str):
  import numpy as np

  import quantjax as qj
  seed = sum(map(ord, label))
  rng = np.random.default_rng(seed)
  params = {"w": rng.standard_normal((64, 32)).astype(np.float32),
            "b": rng.standard_normal((32,)).astype(np.float32),
            "label": label}
  return qj.quantize_params(params, [qj.QuantRule(module_path="w", format="int4_g32")])


def main() -> None:
  mode, path, label, step, exchange = sys.argv[1:6]
  if mode == "dir":
    atomic = load_atomic()
  else:
    sys.path.insert(0, ROOT)
    from quantjax.io import atomic
  atomic.USE_EXCHANGE = exchange == "1"

  def hook(s: str) -> None:
    if s == step:
      os.kill(os.getpid(), signal.SIGKILL)

  atomic._FAULT_HOOK = hook
  if mode == "dir":
    with atomic.atomic_dir(path, kind="test output") as tmp:
      for rel, data in dir_files(label).items():
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        with open(os.path.join(tmp, rel), "wb") as f:
          f.write(data)
  else:
    from quantjax.io import checkpoint
    checkpoint.save_params(path, crash_tree(label))
  print("DONE", flush=True)


if __name__ == "__main__":
  main()
