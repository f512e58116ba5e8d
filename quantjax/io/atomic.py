"""Crash-safe writes: files and directories that are old or new, never neither, never garbage.

`atomic_write(path)` writes a file under a temporary name in the same
directory and renames it into place; `atomic_dir(path)` does the same for a
directory (a checkpoint, a stage's outputs), with a commit protocol:

1. Leftovers of an earlier interrupted write to `path` are resolved first:
   if `path` is missing but a complete new or old copy survives beside it,
   that copy is moved back into place (the newest complete one); then the
   leftovers are removed. Only names this module creates
   (`.<name>.tmp-<hex>`, `.<name>.old-<hex>`, `.<name>.del-<hex>`) holding
   its own markers are ever deleted.
2. The caller writes into a fresh `.<name>.tmp-<hex>` directory (created with
   the process umask, like any `mkdir`).
3. Every file is hashed (XXH3-128) and flushed to disk, and a commit record
   `.quantjax-commit.json` listing each file's size and hash, itself hashed
   (SHA-256), is written last: a directory is complete exactly when it holds
   a valid commit record.
4. The complete directory replaces `path`: an atomic exchange
   (`renameat2(RENAME_EXCHANGE)`, Linux) when `path` exists, else a rename;
   where exchange is unavailable, `path` is renamed aside to `.old-` first
   and the new copy renamed into place, and a crash between the two renames
   leaves both complete copies beside the missing `path`, which `resolve`
   finds (step 1 repairs it on the next write).
5. The old copy is renamed to `.del-` and removed.

One writer per path at a time is the intended use; a second, concurrent
writer never deletes the first one's temporary directory (its marker file is
locked while it writes), and the last commit wins.

An existing `path` is replaced only if it is ours: a directory with a commit
record whose files are all listed in it (nothing the user added), a legacy
quantjax checkpoint, or an empty directory. A regular file, a symlink or any
other directory is refused with an error naming it.

`verify_dir(path)` re-hashes a committed directory and names the first file
that is missing, truncated, or changed, or a commit record that was edited.

References:
  The rename-into-place idiom: POSIX `rename(2)` atomicity; the exchange:
  Linux `renameat2(2)` (`RENAME_EXCHANGE`, Linux 3.15). XXH3: Collet, xxHash
  (github.com/Cyan4973/xxHash), a non-cryptographic hash for detecting damage.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from typing import Any, Callable, Iterator

__all__ = [
    "COMMIT_RECORD",
    "CommitError",
    "atomic_dir",
    "atomic_write",
    "check_dir_target",
    "file_sha256",
    "is_committed",
    "named_os_error",
    "resolve",
    "unlink_quiet",
    "verify_dir",
]

COMMIT_RECORD = ".quantjax-commit.json"
_WRITING = ".quantjax-writing"
_FORMAT = "quantjax-dir"
_VERSION = 1
HASH = "xxh3_128"  # file checksums (XXH3, 128 bits: ~5 GB/s); the record itself: SHA-256

# Test hook: called with the name of each step of a directory commit (see
# tests/reliability), so a test can kill the writer between any two steps.
_FAULT_HOOK: Callable[[str], None] | None = None
# Set False to force the portable two-rename commit (tests run both).
USE_EXCHANGE = True


class CommitError(ValueError):
  """A committed directory that fails its checks (missing, changed or edited files)."""


def _fault(step: str) -> None:
  if _FAULT_HOOK is not None:
    _FAULT_HOOK(step)


def named_os_error(e: OSError, what: str) -> OSError:
  """`e` with `what` (naming the path) in its message; errno kept."""
  err = OSError(e.errno, f"{what}: {e.strerror or e}") if e.errno else OSError(f"{what}: {e}")
  return err


# ----------------------------------------------------------------------------
# Files.


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _reserve(directory: str, prefix: str, suffix: str = "") -> str:
  """Creates an empty file with a fresh name (mode 0666 less the umask)."""
  for _ in range(100):
    name = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
    try:
      fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
      continue
    os.close(fd)
    return name
  raise FileExistsError(f"cannot create a temporary file in {directory}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None
                 ) -> Iterator[Any]:
  """Opens a temporary file beside `path`; on success it replaces `path` atomically.

  The file gets the mode a plain `open(path, "w")` would (0666 less the
  umask). On any error the temporary file is removed, `path` is untouched,
  and an `OSError` (disk full, ...) names `path`.
  """
  path = os.path.abspath(os.fspath(path))
  d = os.path.dirname(path)
  os.makedirs(d, exist_ok=True)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; refusing to replace it with a file")
  tmp = _reserve(d, f".{os.path.basename(path)}.tmp-")
  try:
    with open(tmp, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)
  except OSError as e:
    unlink_quiet(tmp)
    raise named_os_error(e, f"cannot write {path}") from e
  except BaseException:
    unlink_quiet(tmp)
    raise


def temp_path(path: str | os.PathLike) -> str:
  """A reserved temporary file beside `path` (for writers that open by name);
  `commit_file(tmp, path)` moves it into place."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return _reserve(os.path.dirname(path), f".{os.path.basename(path)}.tmp-")


def commit_file(tmp: str, path: str | os.PathLike) -> None:
  """fsyncs `tmp` and renames it over `path`."""
  path = os.path.abspath(os.fspath(path))
  fd = os.open(tmp, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path))


def write_checked(path: str | os.PathLike, write: Callable[[str], Any],
                  check: Callable[[str], Any], *, what: str) -> None:
  """A file for writers that open by name: `write(tmp)` writes it at a reserved
  temporary name beside `path` (an OSError is re-raised naming `what` and `path`),
  `check(tmp)` reads it back and raises if it must not be kept, then it takes `path`
  (`commit_file`); the temporary file never stays."""
  path = os.fspath(path)
  tmp = temp_path(path)
  try:
    try:
      write(tmp)
    except OSError as e:
      raise named_os_error(e, f"cannot write {what} {path}") from e
    check(tmp)
    commit_file(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def unlink_quiet(p: str) -> None:
  """Removes the file `p` if it can; never raises OSError."""
  try:
    os.unlink(p)
  except OSError:
    pass


# ----------------------------------------------------------------------------
# Commit records.


def _hash_file(p: str, *, fsync: bool = False) -> tuple[int, str]:
  """(size, XXH3-128 hex digest) of file `p`, read through a memory map (no copies)."""
  import mmap

  import xxhash
  h = xxhash.xxh3_128()
  with open(p, "rb") as f:
    n = os.fstat(f.fileno()).st_size
    if n:
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        h.update(m)
    if fsync:
      os.fsync(f.fileno())
  return n, h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
  """The SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _walk_files(root: str) -> list[str]:
  out = []
  for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(d, name), root)
      if rel in (COMMIT_RECORD, _WRITING):
        continue
      out.append(rel)
  return out


def _record_hash(rec: dict) -> str:
  body = {k: v for k, v in rec.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                        ).hexdigest()


def _write_record(root: str, kind: str, meta: dict | None) -> dict:
  files = {}
  for rel in _walk_files(root):
    p = os.path.join(root, rel)
    if os.path.islink(p):
      raise ValueError(f"{p} is a symlink; committed directories hold plain files only")
    size, digest = _hash_file(p, fsync=True)
    files[rel] = {"size": size, HASH: digest}
  for d, dirs, _ in os.walk(root):
    for name in dirs:
      _fsync_dir(os.path.join(d, name))
  rec = {"format": _FORMAT, "version": _VERSION, "kind": kind, "created": time.time(),
         "files": files, "meta": meta or {}}
  rec["sha256"] = _record_hash(rec)
  tmp = os.path.join(root, COMMIT_RECORD + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(rec, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(root, COMMIT_RECORD))
  _fsync_dir(root)
  return rec


def read_record(path: str | os.PathLike) -> dict:
  """The commit record of a committed directory, its own hash checked.

  Raises:
    FileNotFoundError: no commit record.
    CommitError: a record that is not valid JSON, is truncated, or was edited.
  """
  path = os.fspath(path)
  rp = os.path.join(path, COMMIT_RECORD)
  try:
    with open(rp, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} has no commit record ({COMMIT_RECORD}): it is not a "
                            "directory quantjax committed") from None
  try:
    rec = json.loads(text)
  except json.JSONDecodeError as e:
    raise CommitError(f"commit record {rp} is damaged (not valid JSON: {e})") from None
  if not isinstance(rec, dict) or rec.get("format") != _FORMAT:
    raise CommitError(f"commit record {rp} is not a quantjax commit record")
  if rec.get("version") != _VERSION:
    raise CommitError(f"commit record {rp} has version {rec.get('version')}; this quantjax "
                      f"reads version {_VERSION}")
  if rec.get("sha256") != _record_hash(rec):
    raise CommitError(f"commit record {rp} was modified after it was written (its checksum "
                      "does not match its contents)")
  if not isinstance(rec.get("files"), dict):
    raise CommitError(f"commit record {rp} lists no files")
  return rec


def is_committed(path: str | os.PathLike) -> bool:
  """True when `path` is a directory holding a valid commit record."""
  try:
    read_record(path)
  except (OSError, CommitError):
    return False
  return True


def verify_dir(path: str | os.PathLike, *, hashes: bool = True) -> dict:
  """Checks every file a committed directory lists (size and XXH3-128 checksum).

  Returns the commit record. Raises `CommitError` naming the first file that
  is missing, has another size, or other bytes (or an edited record).
  """
  path = os.fspath(path)
  rec = read_record(path)
  for rel, info in sorted(rec["files"].items()):
    p = os.path.join(path, rel)
    try:
      size = os.path.getsize(p)
    except OSError:
      raise CommitError(f"{p} is missing (listed in {os.path.join(path, COMMIT_RECORD)})"
                        ) from None
    if size != info["size"]:
      raise CommitError(f"{p} has {size} bytes, {info['size']} were written: the file is "
                        f"{'truncated' if size < info['size'] else 'longer than written'}")
    if hashes:
      _, digest = _hash_file(p)
      if digest != info.get(HASH):
        raise CommitError(f"{p} is damaged: its checksum ({HASH}) differs from the one recorded "
                          "when it was written (flipped or overwritten bytes)")
  return rec


# ----------------------------------------------------------------------------
# Directories.


def _names(path: str) -> tuple[str, str]:
  path = os.path.abspath(os.fspath(path))
  return os.path.dirname(path), os.path.basename(path)


def _siblings(path: str) -> list[tuple[str, str]]:
  """Our leftovers beside `path`: `[(kind, full path)]`, kind in tmp/old/del."""
  parent, base = _names(path)
  pat = re.compile(rf"\.{re.escape(base)}\.(tmp|old|del)-[0-9a-f]{{12}}")
  out = []
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return []
  for name in entries:
    m = pat.fullmatch(name)
    full = os.path.join(parent, name)
    if m and os.path.isdir(full) and not os.path.islink(full):
      out.append((m.group(1), full))
  return out


def _in_use(d: str) -> bool:
  """True when a live writer holds the lock on `d`'s writing marker."""
  marker = os.path.join(d, _WRITING)
  try:
    fd = os.open(marker, os.O_RDONLY)
  except OSError:
    return False
  try:
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  except (ImportError, OSError):
    return False
  finally:
    os.close(fd)
  return False


def _ours(d: str, legacy: Callable[[str], bool] | None) -> bool:
  """True when directory `d` holds only what quantjax wrote into it."""
  try:
    entries = set(os.listdir(d))
  except OSError:
    return False
  if not entries:
    return True
  if COMMIT_RECORD in entries:
    try:
      rec = read_record(d)
    except (OSError, CommitError):
      return False
    listed = set(rec["files"])
    return set(_walk_files(d)) <= listed
  if _WRITING in entries:
    return True
  return bool(legacy and legacy(d))


def _foreign(d: str, legacy) -> str:
  try:
    entries = sorted(os.listdir(d))
  except OSError:
    entries = []
  if COMMIT_RECORD in entries:
    try:
      rec = read_record(d)
      extra = sorted(set(_walk_files(d)) - set(rec["files"]))
      return f"files added after it was written: {extra[:5]}"
    except (OSError, CommitError) as e:
      return str(e)
  return f"it holds {entries[:6]}{' ...' if len(entries) > 6 else ''}"


def _remove(d: str) -> None:
  """Removes our directory `d`: renamed to `.del-` first, so a crash midway leaves a
  name that marks it for removal."""
  parent = os.path.dirname(d)
  name = os.path.basename(d)
  if ".del-" not in name:
    base = name.rsplit(".", 1)[0]  # ".<base>" of ".<base>.tmp-<hex>"
    dest = os.path.join(parent, f"{base}.del-{secrets.token_hex(6)}")
    os.rename(d, dest)
    d = dest
    _fault("renamed_for_removal")
  shutil.rmtree(d)


def resolve(path: str | os.PathLike, *, legacy: Callable[[str], bool] | None = None
            ) -> str | None:
  """The committed directory that stands for `path`, or None.

  `path` itself when it holds a commit record (damaged or not: reading it says
  which) or `legacy(path)` holds;
  when `path` is missing after an interrupted commit, the newest complete
  copy left beside it (`.tmp-` new, `.old-` previous). Read-only.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    # A damaged commit record still marks `path` as the copy: reading it reports the damage.
    if os.path.exists(os.path.join(path, COMMIT_RECORD)) or (legacy is not None and legacy(path)):
      return path
    return None
  if os.path.lexists(path):
    return None
  best, best_t = None, -1.0
  for kind, d in _siblings(path):
    if kind == "del":
      continue
    try:
      rec = read_record(d)
    except (OSError, CommitError):
      continue
    t = float(rec.get("created", 0.0))
    if t > best_t:
      best, best_t = d, t
  return best


def _recover(path: str, legacy) -> None:
  """Moves the newest complete leftover back to a missing `path`, removes the rest."""
  if not os.path.lexists(path):
    found = resolve(path, legacy=legacy)
    if found is not None and found != path:
      os.rename(found, path)
      _fsync_dir(os.path.dirname(path))
  for kind, d in _siblings(path):
    if _in_use(d):
      continue  # another process is writing it right now
    if kind == "del" or _ours(d, legacy):
      _remove(d)
  _fault("leftovers_cleaned")


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps paths `a` and `b` (Linux renameat2); False where unsupported."""
  if not USE_EXCHANGE:
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_fdcwd, rename_exchange = -100, 2
  r = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
  if r == 0:
    return True
  e = ctypes.get_errno()
  if e in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(e, f"cannot exchange {a} and {b}: {os.strerror(e)}")


def check_dir_target(path: str, overwrite: bool, legacy, what: str) -> None:
  """Raises FileExistsError unless `atomic_dir` may write `path` (as `atomic_dir` checks it)."""
  if os.path.islink(path):
    raise FileExistsError(f"{path} is a symlink; refusing to replace it with a {what}")
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it with "
                          f"a {what} (nothing was written)")
  if not overwrite:
    raise FileExistsError(f"{what} {path} exists (pass overwrite=True to replace it)")
  if not _ours(path, legacy):
    raise FileExistsError(
        f"{path} exists and is not a {what} quantjax wrote ({_foreign(path, legacy)}); "
        "refusing to replace it: nothing was written. Remove it or choose another path")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True, kind: str = "directory",
               meta: dict | None = None, legacy: Callable[[str], bool] | None = None
               ) -> Iterator[str]:
  """Writes a directory that replaces `path` atomically (see the module docstring).

  Usage::

      with atomic_dir("runs/x/stage3") as tmp:
        write_files_into(tmp)
      # here runs/x/stage3 is the new, complete directory

  Args:
    path: the directory to (re)place.
    overwrite: replace an existing `path` (only one quantjax wrote); False
      makes an existing `path` an error.
    kind: a word for messages and the commit record ("checkpoint", ...).
    meta: JSON-able data kept in the commit record.
    legacy: predicate recognising older quantjax directories without a commit
      record (they may be replaced).

  Yields:
    The temporary directory to write into. On an exception nothing changes
    at `path` and the temporary directory is removed.

  Raises:
    FileExistsError: `path` is a file, a symlink, a directory quantjax did not
      write (or holds files added since), or exists with `overwrite=False`.
    OSError: a write failed (disk full, ...); the message names the path.
  """
  path = os.path.abspath(os.fspath(path))
  parent, base = _names(path)
  os.makedirs(parent, exist_ok=True)
  check_dir_target(path, overwrite, legacy, kind)
  _recover(path, legacy)
  check_dir_target(path, overwrite, legacy, kind)  # a recovered copy is checked like any other
  tmp = os.path.join(parent, f".{base}.tmp-{secrets.token_hex(6)}")
  os.mkdir(tmp)
  lock = None
  try:
    # The marker says "ours"; its lock, held until the end, says "in use" to other writers.
    lock = open(os.path.join(tmp, _WRITING), "w", encoding="utf-8")
    lock.write(f"quantjax is writing {path}\n")
    lock.flush()
    try:
      import fcntl
      fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):
      pass
    _fault("tmp_created")
    yield tmp
    _fault("contents_written")
    _write_record(tmp, kind, meta)
    _fault("commit_written")
    if os.path.lexists(path):
      if _exchange(tmp, path):
        _fault("exchanged")
        _fsync_dir(parent)
        _remove(tmp)  # holds the old copy now
      else:
        old = os.path.join(parent, f".{base}.old-{secrets.token_hex(6)}")
        os.rename(path, old)
        _fault("renamed_old_aside")
        os.rename(tmp, path)
        _fault("renamed_new_into_place")
        _fsync_dir(parent)
        _remove(old)
    else:
      os.rename(tmp, path)
      _fault("renamed_new_into_place")
      _fsync_dir(parent)
    _fault("old_removed")
    unlink_quiet(os.path.join(path, _WRITING))
  except OSError as e:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    raise named_os_error(e, f"cannot write {kind} {path}") from e
  except BaseException:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if lock is not None:
      lock.close()
