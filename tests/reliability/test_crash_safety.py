"""Crash-safe writes: a writer killed between any two filesystem steps leaves the old or
the new directory, found by `resolve` / `restore_params`; the next write cleans up.
Nothing that is not ours is ever replaced; damage is detected and named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from quantjax.io import atomic
from quantjax.io import checkpoint
from tests.reliability import crash_writer

WRITER = os.path.join(os.path.dirname(__file__), "crash_writer.py")

# Every step of a commit at which the writer can die, and which copy must survive
# (with an older copy in place). "old": the previous one; "new": the one being written.
STEPS_EXCHANGE = {"leftovers_cleaned": "old", "tmp_created": "old", "contents_written": "old",
                  "commit_written": "old", "exchanged": "new", "renamed_for_removal": "new",
                  "old_removed": "new"}
STEPS_RENAME = {"leftovers_cleaned": "old", "tmp_created": "old", "contents_written": "old",
                "commit_written": "old", "renamed_old_aside": "new",
                "renamed_new_into_place": "new", "renamed_for_removal": "new",
                "old_removed": "new"}


def _run(mode: str, path, label: str, step: str = "-", exchange: bool = True,
         timeout: float = 300) -> bool:
  """Runs the writer; True when it finished, False when it was killed at `step`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, WRITER, mode, str(path), label, step,
                      "1" if exchange else "0"], capture_output=True, text=True, timeout=timeout,
                     env=env)
  if p.returncode == 0:
    assert "DONE" in p.stdout
    return True
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  return False


def _read_dir(d: str) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(d):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), d)
      if rel not in (atomic.COMMIT_RECORD, atomic._WRITING):
        with open(os.path.join(root, name), "rb") as f:
          out[rel] = f.read()
  return out


def _label_of_dir(path) -> str | None:
  found = atomic.resolve(path)
  if found is None:
    return None
  atomic.verify_dir(found)
  files = _read_dir(found)
  for label in ("old", "new", "third"):
    if files == crash_writer.dir_files(label):
      return label
  raise AssertionError(f"{found} holds neither old nor new: {sorted(files)}")


def _leftovers(path) -> list[str]:
  parent, base = os.path.split(os.path.abspath(path))
  return sorted(n for n in os.listdir(parent) if n != base)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_dir_commit_survives_a_kill_at_every_step(tmp_path, exchange):
  steps = STEPS_EXCHANGE if exchange else STEPS_RENAME
  if exchange and not _exchange_supported(tmp_path):
    # Linux (>= 3.15, glibc >= 2.28) always has it: the exchange path must be tested there.
    assert not sys.platform.startswith("linux"), "renameat2(RENAME_EXCHANGE) failed on Linux"
    pytest.skip(f"renameat2(RENAME_EXCHANGE) does not exist on {sys.platform}; the two-rename "
                "commit path is tested instead")
  for step, survivor in steps.items():
    d = tmp_path / step
    d.mkdir()
    path = d / "out"
    assert _run("dir", path, "old")
    assert _label_of_dir(path) == "old"
    assert not _run("dir", path, "new", step, exchange), step
    assert _label_of_dir(path) == survivor, step
    # The next write succeeds and leaves nothing else behind.
    assert _run("dir", path, "third", exchange=exchange)
    assert _label_of_dir(path) == "third", step
    assert _leftovers(path) == [], (step, _leftovers(path))


def test_dir_commit_fresh_path_and_double_crash(tmp_path):
  # No previous copy: before the commit record nothing exists; after it, the new one
  # (a complete copy beside a missing path counts: it is found and moved into place)
  for step, survivor in (("contents_written", None), ("commit_written", "new"),
                         ("renamed_new_into_place", "new")):
    path = tmp_path / f"fresh-{step}"
    assert not _run("dir", path, "new", step)
    assert _label_of_dir(path) == survivor
  # Killed between the two renames, then killed again while recovering: still "new".
  path = tmp_path / "double" / "out"
  path.parent.mkdir()
  assert _run("dir", path, "old", exchange=False)
  assert not _run("dir", path, "new", "renamed_old_aside", exchange=False)
  assert not os.path.exists(path) and _label_of_dir(path) == "new"
  assert not _run("dir", path, "third", "leftovers_cleaned", exchange=False)
  assert os.path.isdir(path) and _label_of_dir(path) == "new"
  # killed while removing the replaced copy: the new one ("third") is in place
  assert not _run("dir", path, "third", "renamed_for_removal", exchange=False)
  assert _label_of_dir(path) == "third" and len(_leftovers(path)) == 1
  assert _run("dir", path, "third", exchange=False)
  assert _label_of_dir(path) == "third" and _leftovers(path) == []


def _exchange_supported(tmp_path) -> bool:
  a, b = tmp_path / "xa", tmp_path / "xb"
  a.mkdir()
  b.mkdir()
  try:
    return atomic._exchange(str(a), str(b))
  finally:
    a.rmdir()
    b.rmdir()


# ----------------------------------------------------------------------------
# Checkpoints (orbax inside): representative steps and kills at random moments.


def _restored_label(path) -> str | None:
  if not checkpoint.exists(path):
    return None
  tree = checkpoint.restore_params(path)
  label = tree["label"]
  want = crash_writer.crash_tree(label)
  np.testing.assert_array_equal(np.asarray(tree["b"]), np.asarray(want["b"]))
  np.testing.assert_array_equal(np.asarray(tree["w"].qvalue), np.asarray(want["w"].qvalue))
  np.testing.assert_array_equal(np.asarray(tree["w"].scale), np.asarray(want["w"].scale))
  return label


def test_checkpoint_save_survives_kills(tmp_path):
  path = tmp_path / "ckpt"
  assert _run("ckpt", path, "old")
  for step, exchange, survivor in (("contents_written", True, "old"),
                                   ("renamed_old_aside", False, "new"),
                                   ("old_removed", True, "new")):
    assert not _run("ckpt", path, "new", step, exchange)
    assert _restored_label(path) == survivor, step
    assert _run("ckpt", path, "old")  # back to old for the next case; cleans up
    assert _restored_label(path) == "old" and _leftovers(path) == []
  # Killed at arbitrary moments of the save (inside orbax included).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for delay in (0.0, 0.3, 0.8):
    proc = subprocess.Popen([sys.executable, WRITER, "ckpt", str(path), "new", "-", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while time.time() - t0 < 120 and not any(".tmp-" in n for n in _leftovers(path)):
      if proc.poll() is not None:
        break
      time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _restored_label(path) in ("old", "new"), delay
  assert _run("ckpt", path, "third")
  assert _restored_label(path) == "third" and _leftovers(path) == []


# ----------------------------------------------------------------------------
# Never replace what is not ours.


def _tree():
  return crash_writer.crash_tree("x")


def test_save_refuses_what_is_not_a_checkpoint(tmp_path):
  tree = _tree()
  # a directory of the user's files
  d = tmp_path / "mine"
  d.mkdir()
  (d / "notes.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not a checkpoint quantjax wrote"):
    checkpoint.save_params(d, tree)
  assert (d / "notes.txt").read_text() == "precious" and sorted(os.listdir(d)) == ["notes.txt"]
  # a regular file
  f = tmp_path / "file.bin"
  f.write_bytes(b"data")
  with pytest.raises(FileExistsError, match="not a directory"):
    checkpoint.save_params(f, tree)
  assert f.read_bytes() == b"data"
  # a symlink to a directory
  link = tmp_path / "link"
  os.symlink(d, link)
  with pytest.raises(FileExistsError, match="symlink"):
    checkpoint.save_params(link, tree)
  # a checkpoint the user added a file to
  c = tmp_path / "ckpt"
  checkpoint.save_params(c, tree)
  (c / "README").write_text("mine")
  with pytest.raises(FileExistsError, match="added after it was written"):
    checkpoint.save_params(c, tree)
  assert (c / "README").read_text() == "mine"
  # overwrite=False
  c2 = tmp_path / "ckpt2"
  checkpoint.save_params(c2, tree)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoint.save_params(c2, tree, overwrite=False)
  # an empty directory is fine
  e = tmp_path / "empty"
  e.mkdir()
  checkpoint.save_params(e, tree)
  assert checkpoint.restore_params(e)["label"] == "x"
  # nothing was left beside any of them
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt2", "empty", "file.bin", "link", "mine"]


def test_restore_names_damaged_files(tmp_path):
  tree = _tree()
  path = tmp_path / "c"

  def fresh():
    import shutil
    if path.exists():
      shutil.rmtree(path)
    checkpoint.save_params(path, tree)
    return json.loads((path / atomic.COMMIT_RECORD).read_text())["files"]

  def data_files(files):
    return sorted(f for f in files if "/d/" in f)

  n = len(data_files(fresh()))
  assert n >= 2
  # a flipped byte in every array data file is caught, and the file is named
  # (orbax may split the arrays into a different number of data files per save)
  for i in range(n):
    files = data_files(fresh())
    rel = files[i % len(files)]
    p = path / rel
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=rel.split("/")[-1]):
      checkpoint.restore_params(path)
  # an edited manifest (bits 8 -> 4, still valid JSON)
  fresh()
  m = path / "quantjax_manifest.json"
  m.write_text(m.read_text().replace('"bits": 4', '"bits": 8'))
  with pytest.raises(ValueError, match="quantjax_manifest.json"):
    checkpoint.restore_params(path)
  # truncated orbax metadata
  fresh()
  meta = path / "arrays" / "_METADATA"
  meta.write_bytes(meta.read_bytes()[:10])
  with pytest.raises(ValueError, match="_METADATA.*truncated"):
    checkpoint.restore_params(path)
  # an edited commit record
  fresh()
  rec = path / atomic.COMMIT_RECORD
  rec.write_text(rec.read_text().replace('"kind": "checkpoint"', '"kind": "checkpoinT"'))
  with pytest.raises(ValueError, match="modified after it was written"):
    checkpoint.restore_params(path)
  # a deleted array file
  os.unlink(path / data_files(fresh())[0])
  with pytest.raises(ValueError, match="is missing"):
    checkpoint.restore_params(path)
  # arrays that come back with other values than saved (an orbax misread) are named
  fresh()
  man = json.loads(m.read_text())
  flat = {k: np.array(v) for k, v in _flat_arrays(path).items()}
  k = sorted(flat)[0]
  flat[k].reshape(-1)[0] += 1
  with pytest.raises(ValueError, match="differs from what was saved"):
    checkpoint._verify_arrays(man, flat, str(m))


def _flat_arrays(path):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(path, "arrays"))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, mask):
  from quantjax.io import gguf as gio
  from tests.io.test_gguf import TINY, tiny_params
  old = os.umask(mask)
  try:
    c = tmp_path / "c"
    checkpoint.save_params(c, _tree())
    g = tmp_path / "m.gguf"
    gio.export_gguf(g, TINY, tiny_params())
    with atomic.atomic_write(tmp_path / "t.json", "w") as f:
      f.write("{}")
  finally:
    os.umask(old)
  assert os.stat(c).st_mode & 0o777 == 0o777 & ~mask
  assert os.stat(c / "quantjax_manifest.json").st_mode & 0o777 == 0o666 & ~mask
  assert os.stat(g).st_mode & 0o777 == 0o666 & ~mask
  assert os.stat(tmp_path / "t.json").st_mode & 0o777 == 0o666 & ~mask


def test_legacy_checkpoints_still_restore_and_can_be_replaced(tmp_path):
  """A version-1 checkpoint (no commit record) written the old way."""
  import orbax.checkpoint as ocp
  path = tmp_path / "legacy"
  path.mkdir()
  ocp.PyTreeCheckpointer().save(str(path / "arrays"), {"a": np.arange(4.0, dtype=np.float32)})
  (path / "quantjax_manifest.json").write_text(json.dumps(
      {"version": 1, "tree": {"__dict__": {"a": {"__array__": "/a"}}, "int_keys": []},
       "is_nnx_state": False}).replace('"/a"', '"a"'))
  # orbax key "a" maps to path "a"
  r = checkpoint.restore_params(path)
  np.testing.assert_array_equal(np.asarray(r["a"]), np.arange(4.0))
  checkpoint.save_params(path, {"b": np.ones(2, np.float32)})
  assert set(checkpoint.restore_params(path)) == {"b"}


def test_atomic_write_names_the_path_on_a_full_disk(tmp_path):
  """A write that fails midway (file size limit: EFBIG, as a full disk gives ENOSPC)
  raises an OSError naming the file and leaves nothing behind."""
  code = f"""
import os, resource, signal, sys
sys.path.insert(0, {repr(os.getcwd())})
from tests.reliability.crash_writer import load_atomic
atomic = load_atomic()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
  with atomic.atomic_write({repr(str(tmp_path / 'big.bin'))}) as f:
    f.write(b"x" * 100000)
except OSError as e:
  print("ERR", e)
"""
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert "ERR" in p.stdout and str(tmp_path / "big.bin") in p.stdout, p.stdout + p.stderr
  assert os.listdir(tmp_path) == []


def test_a_concurrent_writer_does_not_remove_a_live_temporary(tmp_path):
  path = tmp_path / "out"
  with atomic.atomic_dir(path) as tmp_a:
    (open(os.path.join(tmp_a, "f"), "w")).write("a")
    with atomic.atomic_dir(path) as tmp_b:  # its clean-up step sees tmp_a in use
      (open(os.path.join(tmp_b, "f"), "w")).write("b")
    assert os.path.isdir(tmp_a)
    assert (path / "f").read_text() == "b"
  assert (path / "f").read_text() == "a"  # the last commit wins
  atomic.verify_dir(path)
  assert _leftovers(path) == []
