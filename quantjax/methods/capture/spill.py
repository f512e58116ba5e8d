"""Activations on disk: stacks of per-batch values above a size limit, in files."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Sequence

import numpy as np


class DiskStack:
  """A stacked `[n, ...]` array held in a file, one record per calibration batch.

  Records are read and written with positioned I/O, not memory-mapped: the data
  lives in the page cache (reclaimable), never in this process's resident memory.
  """

  def __init__(self, spill: "Spill", shape: Sequence[int], dtype: Any):
    fd, self.path = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=spill.directory)
    self.fd: int | None = fd
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    self.rec = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
    spill.stacks.append(self)

  def put(self, b: int, x: Any) -> None:
    a = np.ascontiguousarray(np.asarray(x), self.dtype).reshape(-1).view(np.uint8)
    view, off = memoryview(a), b * self.rec
    try:
      while view.nbytes:
        n = os.pwrite(self.fd, view, off)
        view, off = view[n:], off + n
    except OSError as e:
      raise OSError(e.errno, f"writing calibration activations (batch {b}) to {self.path}: "
                    f"{e.strerror}") from None

  def get(self, b: int) -> np.ndarray:
    """Batch `b` as `[1, ...]`."""
    out = np.empty((1,) + self.shape, self.dtype)
    view, off = memoryview(out.reshape(-1).view(np.uint8)), b * self.rec
    while view.nbytes:
      n = os.preadv(self.fd, [view], off)
      if n <= 0:
        raise OSError(f"{self.path}: calibration activations of batch {b} are cut short")
      view, off = view[n:], off + n
    return out

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass


@dataclasses.dataclass
class Spill:
  """Where `calibrate(activation_limit=...)` keeps activations above the limit."""
  limit: int
  directory: str
  made_dir: bool
  stacks: list = dataclasses.field(default_factory=list)
  spilled_bytes: int = 0

  @staticmethod
  def open(limit: int | None, directory: Any) -> "Spill | None":
    if limit is None:
      return None
    if int(limit) < 0:
      raise ValueError(f"activation_limit must be a number of bytes >= 0, got {limit!r}")
    if directory is None:
      return Spill(int(limit), tempfile.mkdtemp(prefix="quantjax-activations-"), True)
    directory = os.fspath(directory)
    made = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    return Spill(int(limit), directory, made)

  def close(self) -> None:
    """Deletes the files this spill made (nothing else), and its directory if it made it."""
    for s in self.stacks:
      s.close()
    self.stacks.clear()
    if self.made_dir:
      try:
        os.rmdir(self.directory)
      except OSError:
        pass
