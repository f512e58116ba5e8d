"""llama.cpp importance-matrix files (`quantjax.io.imatrix`): the GGUF layout llama.cpp's
tools read (checked with gguf-py, independently of our reader), exact means, the legacy
`.dat` layout, named errors, and llama.cpp's own quantizer given the file's importance."""

import ctypes
import os
import re
import struct
import types

import gguf
import numpy as np
import pytest
from flax import nnx

from quantjax import rules as rules_lib
from quantjax.io import gguf as gio
from quantjax.io import imatrix as im
from quantjax.io.gguf_read import GGUFError
from quantjax.methods import importance as importance_lib
from quantjax.models import llama

TINY = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                         tie_embeddings=False, max_position_embeddings=64, name="tiny")
TARGETS = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"


def _means(seed=0):
  """Mean-x² vectors over many magnitudes: zeros, subnormals, large values."""
  rng = np.random.default_rng(seed)
  a = (rng.random(64) ** 4 * 10.0 ** rng.integers(-30, 30, 64)).astype(np.float32)
  a[:3] = [0.0, 1e-44, 3.0e30]
  b = rng.random(128).astype(np.float32)
  return {"blk.0.attn_q.weight": a, "blk.1.ffn_down.weight": b, "output.weight": a[::-1].copy()}


def _files(d):
  return sorted(os.listdir(d))


def _ours_params(seed=0):
  return nnx.to_pure_dict(nnx.state(llama.Llama(TINY, rngs=nnx.Rngs(seed)), nnx.Param))


# ----------------------------------------------------------------------------
# The layout and the round trip.


@pytest.mark.parametrize("chunks", [(3, 100), (1, 1), (128, 512)])
def test_round_trip_is_exact(tmp_path, chunks):
  means = _means()
  path = tmp_path / "imatrix.gguf"
  im.write_imatrix(path, means, chunk_count=chunks[0], chunk_size=chunks[1], datasets=["wiki"])
  assert _files(tmp_path) == ["imatrix.gguf"]  # no temporary file left
  back = im.read_imatrix_file(path)
  assert sorted(back.means) == sorted(means)
  count = im.exact_count(chunks[0] * chunks[1])
  assert count == {(3, 100): 256, (1, 1): 1, (128, 512): 65536}[chunks]
  for name, m in means.items():
    assert back.means[name].dtype == np.float32 and back.means[name].shape == m.shape
    np.testing.assert_array_equal(back.means[name], m)  # bit for bit
    np.testing.assert_array_equal(back.counts[name], [count])
    np.testing.assert_array_equal(back.sums[name], (m * np.float32(count))[None])
  assert (back.datasets, back.chunk_count, back.chunk_size) == (["wiki"], *chunks)
  assert back.has_metadata and not back.legacy and back.in_sums == {}
  assert im.read_imatrix(path).keys() == means.keys()
  # Written again over itself (atomically): the same bytes.
  first = path.read_bytes()
  im.write_imatrix(path, means, chunk_count=chunks[0], chunk_size=chunks[1], datasets=["wiki"])
  assert path.read_bytes() == first


def test_gguf_py_reads_what_llama_cpp_expects(tmp_path):
  """The keys, tensor names, types and ggml shapes of llama-imatrix's own files
  (`tools/imatrix/imatrix.cpp`), and the means as llama-quantize computes them
  (`in_sum2 / count`, float32), read with gguf-py rather than our reader."""
  means = _means()
  path = tmp_path / "imatrix.gguf"
  im.write_imatrix(path, means, chunk_count=10, chunk_size=512)
  r = gguf.GGUFReader(path)
  f = r.fields
  assert f["general.type"].contents() == "imatrix"
  assert "general.architecture" not in f
  V = gguf.GGUFValueType
  assert f["imatrix.datasets"].types == [V.ARRAY, V.STRING]
  assert f["imatrix.datasets"].contents() == ["quantjax"]  # llama-quantize needs the key
  assert f["imatrix.chunk_count"].types == [V.UINT32]
  assert f["imatrix.chunk_count"].contents() == 10
  assert f["imatrix.chunk_size"].types == [V.UINT32]
  assert f["imatrix.chunk_size"].contents() == 512
  assert gguf.Keys.IMatrix.DATASETS == "imatrix.datasets"  # gguf-py's names for the keys
  names = [t.name for t in r.tensors]
  want = []
  for n in sorted(means):
    want += [n + ".in_sum2", n + ".counts"]
  assert names == want  # sorted, in_sum2 then counts, as llama-imatrix writes them
  t = {t.name: t for t in r.tensors}
  for n, m in means.items():
    s, c = t[n + ".in_sum2"], t[n + ".counts"]
    assert s.tensor_type == c.tensor_type == gguf.GGMLQuantizationType.F32
    assert s.shape.tolist() == [m.size, 1] and c.shape.tolist() == [1, 1]  # ggml ne order
    count = np.float32(np.asarray(c.data).reshape(-1)[0])
    assert count == 4096 and float(count).is_integer()
    # llama-quantize: values[i] = sums[i] / (float) lround(count)
    np.testing.assert_array_equal(np.asarray(s.data, np.float32).reshape(-1) / count, m)


def test_true_token_counts_would_not_be_exact(tmp_path):
  """Why the default count is a power of two: with 3 rows, no float32 sum divides back
  to some means; an explicit count is still stored as given (means within an ulp)."""
  m = _means()["blk.1.ffn_down.weight"]
  sums = (m.astype(np.float64) * 3).astype(np.float32)
  assert (sums / np.float32(3) != m).any()
  path = tmp_path / "three.gguf"
  im.write_imatrix(path, {"blk.0.ffn_up.weight": m}, chunk_count=1, chunk_size=3, counts=3)
  back = im.read_imatrix_file(path)
  np.testing.assert_array_equal(back.counts["blk.0.ffn_up.weight"], [3])
  np.testing.assert_array_max_ulp(back.means["blk.0.ffn_up.weight"], m, maxulp=1)
  im.write_imatrix(path, {"blk.0.ffn_up.weight": m}, chunk_count=1, chunk_size=3,
                   counts={"blk.0.ffn_up.weight": 1024})
  np.testing.assert_array_equal(im.read_imatrix(path)["blk.0.ffn_up.weight"], m)
  assert [im.exact_count(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 2, 512,
                                                                         1024, 1024]


def test_expert_matrices_and_zero_counts_read_as_llama_quantize_does(tmp_path):
  """A llama-imatrix entry with two matrices (experts), one never used (count 0), and the
  newer `in_sum` tensor: means `[n_mat, n_in]`, ones for the unused one."""
  path = tmp_path / "moe.gguf"
  w = gguf.GGUFWriter(path, "")
  w.add_type("imatrix")
  w.add_key_value("imatrix.datasets", ["x.txt"], gguf.GGUFValueType.ARRAY,
                  sub_type=gguf.GGUFValueType.STRING)
  w.add_uint32("imatrix.chunk_count", 2)
  w.add_uint32("imatrix.chunk_size", 8)
  sums = np.array([[2.0, 4.0, 6.0, 8.0], [0, 0, 0, 0]], np.float32)
  w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", sums)
  w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[4.0], [0.0]], np.float32))
  w.add_tensor("blk.0.ffn_down_exps.weight.in_sum", np.ones((2, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  back = im.read_imatrix_file(path)
  np.testing.assert_array_equal(back.means["blk.0.ffn_down_exps.weight"],
                                [[0.5, 1.0, 1.5, 2.0], [1.0, 1.0, 1.0, 1.0]])
  np.testing.assert_array_equal(back.counts["blk.0.ffn_down_exps.weight"], [4, 0])
  assert back.in_sums["blk.0.ffn_down_exps.weight"].shape == (2, 4)


def _legacy_dat(entries, trailer=(7, "calib.txt")):
  """llama-imatrix's legacy layout (`save_imatrix_legacy`): values = mean x² * ncall."""
  out = struct.pack("<i", len(entries))
  for name, ncall, values in entries:
    b = name.encode()
    out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(values))
    out += np.asarray(values, "<f4").tobytes()
  if trailer is not None:
    d = trailer[1].encode()
    out += struct.pack("<ii", trailer[0], len(d)) + d
  return out


def test_legacy_dat_files_are_read(tmp_path):
  m = np.array([0.25, 1.0, 3.0, 0.0], np.float32)
  path = tmp_path / "imatrix.dat"
  path.write_bytes(_legacy_dat([("blk.0.attn_k.weight", 4, m * 4),
                                ("blk.0.attn_v.weight", 0, m)]))
  back = im.read_imatrix_file(path)
  assert back.legacy and back.has_metadata
  np.testing.assert_array_equal(back.means["blk.0.attn_k.weight"], m)
  np.testing.assert_array_equal(back.means["blk.0.attn_v.weight"], m)  # ncall 0: as stored
  np.testing.assert_array_equal(back.counts["blk.0.attn_k.weight"], [4])
  assert (back.chunk_count, back.datasets, back.chunk_size) == (7, ["calib.txt"], None)
  # The trailer is optional.
  path.write_bytes(_legacy_dat([("blk.0.attn_k.weight", 2, m * 2)], trailer=None))
  np.testing.assert_array_equal(im.read_imatrix(path)["blk.0.attn_k.weight"], m)


# ----------------------------------------------------------------------------
# Names: params paths -> GGUF tensor names, from the architecture record.


def test_names_come_from_the_architecture_record(tmp_path):
  names = im.gguf_names(TINY)
  assert names["layers/1/attn/q_proj/kernel"] == "blk.1.attn_q.weight"
  assert names["layers/0/mlp/down_proj/kernel"] == "blk.0.ffn_down.weight"
  assert names["lm_head/kernel"] == "output.weight"
  # Exactly the names export_gguf writes.
  assert set(names.values()) == {g for g, *_ in gio.tensor_table(TINY)}
  # input_importance's result on a tiny model maps whole, each vector the GGUF rows' length.
  params = _ours_params()
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (3, 20)).astype(np.int32)
  imp = importance_lib.input_importance(llama.forward_fn(TINY), params, [tokens], TARGETS,
                                        progress=False)
  by_name = im.tensor_importance(imp, names)
  assert len(by_name) == len(imp) == 7 * TINY.num_layers
  want = gio.expected_shapes(TINY)
  for g, v in by_name.items():
    assert v.shape == (want[g][0][-1],), g  # the row length (ne0): the input features
  path = tmp_path / "imatrix.gguf"
  im.write_imatrix(path, by_name, chunk_count=3, chunk_size=20)
  back = im.read_imatrix_file(path)
  for p, v in imp.items():
    np.testing.assert_array_equal(back.means[names[p]], v)
  np.testing.assert_array_equal(back.counts["blk.0.attn_q.weight"], [32])  # 60 tokens
  with pytest.raises(ValueError, match=r"importance for embed/nope: no GGUF tensor name"):
    im.tensor_importance({"embed/nope": np.ones(4)}, names)
  with pytest.raises(ValueError, match=r"importance for b and a: both name GGUF tensor x"):
    im.tensor_importance({"a": np.ones(2), "b": np.ones(2)}, {"a": "x", "b": "x"})


# ----------------------------------------------------------------------------
# Errors, each naming the file and the tensor; nothing written.


@pytest.mark.parametrize("vec, match", [
    (np.array([1.0, np.nan, 2.0], np.float32), r"1 NaN, Inf or negative values of 3 \(first at 1"),
    (np.array([1.0, -0.5], np.float32), r"first at 1: -0.5"),
    (np.array([1.0, np.inf], np.float32), r"NaN, Inf or negative"),
    (np.ones((2, 3), np.float32), r"non-empty 1-D vector .*shape \(2, 3\)"),
    (np.ones(0, np.float32), r"non-empty 1-D vector .*shape \(0,\)"),
    (np.array([3e38, 1.0], np.float32), r"mean 3e\+38 at 0 times count 256 overflows"),
])
def test_bad_vectors_are_named(tmp_path, vec, match):
  path = tmp_path / "out" / "imatrix.gguf"
  good = np.ones(4, np.float32)
  with pytest.raises(ValueError, match=r"imatrix\.gguf: tensor blk\.1\.ffn_up\.weight: .*" + match):
    im.write_imatrix(path, {"blk.0.ffn_up.weight": good, "blk.1.ffn_up.weight": vec},
                     chunk_count=3, chunk_size=100)
  assert not path.exists()


def test_bad_arguments_are_named_and_leave_the_old_file(tmp_path):
  path = tmp_path / "imatrix.gguf"
  im.write_imatrix(path, {"a.weight": np.ones(4)}, chunk_count=1, chunk_size=4)
  old = path.read_bytes()
  cases = [
      (dict(importance={}), r"imatrix\.gguf: no importance vectors"),
      (dict(importance={"x" * 60: np.ones(4)}), r"tensor x+: 'x+\.in_sum2' is 68 bytes"),
      (dict(chunk_size=0), r"chunk_size must be positive"),
      (dict(chunk_count=-1), r"chunk_count must be an integer in \[0, 2\^32\)"),
      (dict(counts=0), r"tensor a\.weight: count 0 is not a positive integer"),
      (dict(counts=2 ** 24 + 1), r"count 16777217 is not a positive integer that float32"),
      (dict(counts={"b.weight": 4}), r"counts for tensors without importance: \['b\.weight'\]"),
  ]
  for kw, match in cases:
    args = dict(importance={"a.weight": np.ones(4)}, chunk_count=1, chunk_size=4)
    args.update(kw)
    imp = args.pop("importance")
    with pytest.raises(ValueError, match=match):
      im.write_imatrix(path, imp, **args)
    assert path.read_bytes() == old and _files(tmp_path) == ["imatrix.gguf"]


def _write_raw(path, tensors, kv=True, gtype="imatrix"):
  w = gguf.GGUFWriter(path, "")
  if gtype:
    w.add_type(gtype)
  if kv:
    w.add_key_value("imatrix.datasets", ["d"], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 4)
  for name, a in tensors:
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


ONE = np.ones((1, 4), np.float32)
C4 = np.full((1, 1), 4.0, np.float32)


@pytest.mark.parametrize("tensors, match", [
    ([("w.in_sum2", ONE)], r"tensor 'w\.in_sum2' has no 'w\.counts' beside it \(entry w\)"),
    ([("w.counts", C4)], r"tensor 'w\.counts' has no 'w\.in_sum2' beside it"),
    ([("w.in_sum2", ONE.astype(np.float16)), ("w.counts", C4)],
     r"tensor 'w\.in_sum2' is F16; imatrix tensors are F32"),
    ([("w.in_sum2", -ONE), ("w.counts", C4)], r"entry w: 'w\.in_sum2' holds 4 NaN, Inf or neg"),
    ([("w.in_sum2", ONE), ("w.counts", C4 + 0.5)], r"entry w: the counts .* integers"),
    ([("w.in_sum2", np.ones((1, 5), np.float32)), ("w.counts", np.ones((1, 2), np.float32))],
     r"entry w: 5 sums \('w\.in_sum2'\) do not divide into 2 matrices"),
    ([("w.in_sum2", ONE), ("w.counts", C4), ("w.in_sum", np.ones((1, 3), np.float32))],
     r"entry w: 'w\.in_sum' has 3 values, 'w\.in_sum2' 4"),
    ([("token_embd.weight", ONE)], r"holds no imatrix entries"),
])
def test_malformed_gguf_files_are_named(tmp_path, tensors, match):
  path = tmp_path / "bad.gguf"
  _write_raw(path, tensors)
  with pytest.raises(GGUFError, match=r"bad\.gguf: " + match):
    im.read_imatrix(path)


def test_unreadable_files_are_named(tmp_path):
  model = tmp_path / "model.gguf"
  _write_raw(model, [("w.in_sum2", ONE), ("w.counts", C4)], gtype="model")
  with pytest.raises(GGUFError, match=r"model\.gguf: general\.type is 'model', not 'imatrix'"):
    im.read_imatrix(model)
  good = tmp_path / "good.gguf"
  im.write_imatrix(good, _means(), chunk_count=1, chunk_size=8)
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
  with pytest.raises(GGUFError, match=r"cut\.gguf"):
    im.read_imatrix(cut)
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"\x00\x00\x00\x00 not an imatrix")
  with pytest.raises(GGUFError, match=r"junk\.bin: not an imatrix file .*entry count of 0"):
    im.read_imatrix(junk)
  empty = tmp_path / "empty.dat"
  empty.write_bytes(b"")
  with pytest.raises(GGUFError, match=r"empty\.dat: truncated or not an imatrix file"):
    im.read_imatrix(empty)
  dat = tmp_path / "short.dat"
  dat.write_bytes(_legacy_dat([("blk.0.attn_k.weight", 1, np.ones(8))], trailer=None)[:-8])
  with pytest.raises(GGUFError, match=r"short\.dat: .*entry blk\.0\.attn_k\.weight's 8 values"):
    im.read_imatrix(dat)
  neg = tmp_path / "neg.dat"
  neg.write_bytes(_legacy_dat([("blk.0.attn_k.weight", 1, [1.0, np.nan])]))
  with pytest.raises(GGUFError, match=r"neg\.dat: entry blk\.0\.attn_k\.weight: 1 NaN"):
    im.read_imatrix(neg)
  with pytest.raises(FileNotFoundError, match=r"imatrix file not found: .*nothing\.gguf"):
    im.read_imatrix(tmp_path / "nothing.gguf")
  with pytest.raises(GGUFError, match=r"is a directory"):
    im.read_imatrix(tmp_path)


# ----------------------------------------------------------------------------
# The runner writes imatrix.gguf beside its export.


def test_pipeline_writes_the_imatrix_beside_the_export(tmp_path, capsys):
  from experiments import pipeline

  class Data(dict):
    corpus = "wikitext-2"

  stage = tmp_path / "stages" / "export-abc"
  ctx = types.SimpleNamespace(stage_dir=str(stage), workdir=str(tmp_path),
                              config=types.SimpleNamespace(data=Data()),
                              model=types.SimpleNamespace(config=TINY))
  imp = {"layers/0/attn/q_proj/kernel": np.full(64, 0.5, np.float32),
         "layers/1/mlp/down_proj/kernel": np.full(128, 2.0, np.float32)}
  batches = [np.zeros((4, 33), np.int32)] * 2
  rel = pipeline._write_imatrix(ctx, imp, batches)
  assert rel == os.path.join("stages", "export-abc", "imatrix.gguf")
  assert "importance matrix (2 tensors)" in capsys.readouterr().out
  back = im.read_imatrix_file(tmp_path / rel)
  assert sorted(back.means) == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
  assert (back.chunk_count, back.chunk_size, back.datasets) == (8, 33, ["wikitext-2"])
  np.testing.assert_array_equal(back.means["blk.1.ffn_down.weight"], imp[
      "layers/1/mlp/down_proj/kernel"])


# ----------------------------------------------------------------------------
# llama.cpp's own quantizer, given the importance read back from the file.


def _llamacpp():
  from quantjax.eval import llamacpp
  assert llamacpp.available(), "llama-cpp-python is missing: `make install` installs it"
  return llamacpp


def _llama_quantize(lc, src, dst, imatrix):
  """`llama_model_quantize` to Q4_0 (pure), with `imatrix` ({name: values}) handed over as
  llama-quantize does (`llama_model_quantize_params.imatrix`, null-terminated)."""
  params = lc.llama_model_quantize_default_params()
  params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q4_0
  params.nthread = 1
  params.pure = True
  keep = []
  if imatrix is not None:
    arr = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (k, v) in enumerate(sorted(imatrix.items())):
      v, kb = np.ascontiguousarray(v, np.float32), k.encode()
      keep += [v, kb]
      arr[i].name, arr[i].size = kb, v.size
      arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params.imatrix = arr
    keep.append(arr)
  assert lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
  return {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(dst).tensors}


@pytest.mark.requires_extra("llamacpp")
def test_llamacpp_quantizes_the_same_with_the_file_as_in_memory(tmp_path):
  """llama-cpp-python loads no imatrix file (that is llama-quantize's / llama-imatrix's
  code, not libllama's), but `llama_model_quantize` takes the per-tensor values: the
  file's values (in_sum2 / count, as llama-quantize computes them from gguf-py's read)
  give llama.cpp's Q4_0 the same bytes as the in-memory importance, which ggml's row
  quantizer (`ggml_quantize_rows`) reproduces tensor by tensor."""
  llamacpp = _llamacpp()
  import llama_cpp as lc
  params = _ours_params(1)
  f32 = tmp_path / "f32.gguf"
  gio.export_gguf(f32, TINY, params, float_type="F32")
  names = im.gguf_names(TINY)
  flat = dict(rules_lib.tree_leaves_with_paths(params))
  rng = np.random.default_rng(2)
  imp = {p: (rng.random(flat[p].shape[0]) ** 3 * 10).astype(np.float32)
         for p in names if re.fullmatch(TARGETS, p)}
  memory = im.tensor_importance(imp, names)
  path = tmp_path / "imatrix.gguf"
  im.write_imatrix(path, memory, chunk_count=7, chunk_size=300)
  r = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in gguf.GGUFReader(path).tensors}
  from_file = {n: r[n + ".in_sum2"] / np.float32(np.round(r[n + ".counts"][0])) for n in memory}
  ours = im.read_imatrix(path)
  for n in memory:
    np.testing.assert_array_equal(ours[n], from_file[n])
  a = _llama_quantize(lc, f32, tmp_path / "file.gguf", from_file)
  b = _llama_quantize(lc, f32, tmp_path / "memory.gguf", memory)
  c = _llama_quantize(lc, f32, tmp_path / "none.gguf", None)
  assert a == b
  assert sum(a[n] != c[n] for n in memory) == len(memory) == 7 * TINY.num_layers  # it was used
  rows = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(f32).tensors}
  for n in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):  # Q rows permuted: same columns
    got = llamacpp.ggml_quantize_rows(rows[n], "Q4_0", ours[n])
    assert got.tobytes() == a[n] == llamacpp.ggml_quantize_rows(rows[n], "Q4_0",
                                                                memory[n]).tobytes()
