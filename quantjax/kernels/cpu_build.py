"""Builds quantjax's CPU matmul kernel (`kernels/cpu/qmatmul.cc`) from source.

    python -m quantjax.kernels.cpu_build            # build (or find) the library
    python -m quantjax.kernels.cpu_build --force    # rebuild

The kernel is an XLA FFI handler in C++. It compiles against the FFI headers
that ship inside `jaxlib` (`jax.ffi.include_dir()`) with the system C++
compiler (`$CXX`, else `c++`), for the machine it runs on (`-march=native`;
override with `QUANTJAX_CPU_KERNEL_FLAGS`). `make install` builds it; if it
is missing at first use, `cpu_matmul` builds it then (a few seconds to a
minute, once). The library goes to a cache directory
(`quantjax.cache.cache_dir()`: `$QUANTJAX_CACHE`, else
`$XDG_CACHE_HOME/quantjax`, else `~/.cache/quantjax`) under a name that hashes the source, the flags, the
compiler and the jaxlib version, so an upgrade rebuilds and concurrent
builds never see each other's half-written files (each writes a temporary
file and renames it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

from quantjax import cache as cache_lib

__all__ = ["SOURCE", "BuildError", "cache_dir", "compiler", "flags", "library_path", "build"]

SOURCE = pathlib.Path(__file__).resolve().parent / "cpu" / "qmatmul.cc"


class BuildError(RuntimeError):
  """The kernel could not be compiled (the message holds the command and its output)."""


def cache_dir() -> pathlib.Path:
  """Where built kernels go: quantjax's one cache directory."""
  return pathlib.Path(cache_lib.cache_dir())


def compiler() -> str:
  """The C++ compiler: `$CXX`, else `c++`; BuildError when there is none."""
  cxx = os.environ.get("CXX") or "c++"
  found = shutil.which(cxx)
  if not found:
    raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX to one)")
  return found


def flags() -> list[str]:
  arch = os.environ.get("QUANTJAX_CPU_KERNEL_FLAGS")
  arch_flags = shlex.split(arch) if arch is not None else ["-march=native"]
  return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w", *arch_flags]


def _include_dir() -> str:
  import jax
  return jax.ffi.include_dir()


def _fingerprint(cxx: str) -> str:
  import jaxlib
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    version = ""
  h = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(flags()).encode(), version.encode(),
               getattr(jaxlib, "__version__", "").encode(), platform.machine().encode()):
    h.update(part)
    h.update(b"\0")
  return h.hexdigest()[:16]


def library_path() -> pathlib.Path:
  """Where the library for this source, compiler, flags and jaxlib lives (built or not)."""
  return cache_dir() / f"qmatmul-{_fingerprint(compiler())}.so"


def build(*, force: bool = False, verbose: bool = False) -> pathlib.Path:
  """Compiles the kernel unless an up-to-date library exists; returns its path."""
  cxx = compiler()
  out = cache_dir() / f"qmatmul-{_fingerprint(cxx)}.so"
  if out.exists() and not force:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *flags(), f"-I{_include_dir()}", str(SOURCE), "-o", tmp]
  if verbose:
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
      raise BuildError(f"compiling the quantjax CPU kernel failed (exit {res.returncode}):\n"
                       f"{' '.join(cmd)}\n{res.stderr[-4000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
  args = parser.parse_args(argv)
  path = build(force=args.force, verbose=True)
  print(path)


if __name__ == "__main__":
  main()
