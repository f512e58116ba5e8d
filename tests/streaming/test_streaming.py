"""Streaming compression (`quantjax.streaming`) on a tiny random Llama written as safetensors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import methods, streaming
from quantjax.io import atomic, hf
from quantjax.io import safetensors as st
from quantjax.models import llama
from quantjax.rules import QuantRule
from tests.methods.conftest import make_tiny

RULES = (QuantRule(module_path=llama.PROJ_KERNELS, format="int4_g32"),)
N_LAYERS = 3


def _tokens():
  return [np.random.default_rng(i).integers(0, 128, (2, 16)).astype(np.int32) for i in range(3)]


def _write_source(path, dtype="bfloat16", shard="40KB"):
  cfg, pure = make_tiny(num_layers=N_LAYERS)
  hf.export_hf(path, cfg, pure, dtype=dtype, max_shard_size=shard)
  return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return _write_source(tmp_path_factory.mktemp("src") / "tiny-bf16")


@pytest.fixture(scope="module")
def full(tmp_path_factory, source):
  """One uninterrupted GPTQ run, the reference of the other tests: (output dir, result)."""
  out = tmp_path_factory.mktemp("full") / "full"
  return out, streaming.compress_streaming(source, out, _tokens(), RULES, methods.GPTQ(),
                                           progress=False)


def _tensors(directory):
  ck = hf.Checkpoint(str(directory))
  return {k: np.asarray(ck.get(k)) for k in ck.where}


def _assert_same_tensors(a_dir, b_dir):
  a, b = _tensors(a_dir), _tensors(b_dir)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), f"{k} differs"


def _files(directory):
  """Every file's bytes, but the commit record (it holds the commit time) and the
  report's own output path."""
  out = {}
  for name in sorted(os.listdir(directory)):
    if name == atomic.COMMIT_RECORD:
      continue
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    if name == hf.REPORT_FILE:
      rep = json.loads(data)
      rep.pop("path")
      data = json.dumps(rep, sort_keys=True).encode()
    out[name] = data
  return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_streaming_equals_in_memory_gptq(tmp_path, source, full, dtype):
  """Same codes, scales and float tensors, bit for bit, as import_hf -> calibrate -> export_hf:
  the layer's segments run the same equations on the same float32 inputs."""
  if dtype == "bfloat16":
    src = source
    shutil.copytree(full[0], tmp_path / "out")
    res = full[1]
  else:
    src = _write_source(tmp_path / "src32", "float32")
    res = streaming.compress_streaming(src, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                       progress=False)
  cfg, params, _, _ = hf.import_hf(src, dtype=jnp.float32, tokenizer=False)
  ref = methods.calibrate(llama.forward_fn(cfg), params, _tokens(), RULES, methods.GPTQ(),
                          progress=False)
  hf.export_hf(tmp_path / "ref", cfg, ref.params, dtype=dtype)
  _assert_same_tensors(tmp_path / "out", tmp_path / "ref")
  with open(tmp_path / "out" / "config.json") as f:
    out_cfg = json.load(f)
  with open(tmp_path / "ref" / "config.json") as f:
    ref_cfg = json.load(f)
  assert out_cfg == {**ref_cfg, "_name_or_path": out_cfg["_name_or_path"]}
  assert atomic.verify_dir(tmp_path / "out")
  # The record: one entry per layer with its time and peak memory; GPTQ losses per weight.
  assert [r["layer"] for r in res.layers] == list(range(N_LAYERS))
  assert all(r["seconds"] > 0 and not r["resumed"] for r in res.layers)
  # Identical layers share the first layer's compiled segments.
  assert res.layers[0]["compiles"] > 0 and all(r["compiles"] == 0 for r in res.layers[1:])
  assert res.peak_rss_bytes is None or res.peak_rss_bytes > 0
  assert set(res.info["gptq_loss"]) == set(ref.info["gptq_loss"])
  assert res.output_bytes == sum(os.path.getsize(tmp_path / "out" / n)
                                 for n in os.listdir(tmp_path / "out"))
  assert not os.path.exists(tmp_path / ".out.stream-work")  # removed after success
  assert not os.path.exists(full[0].parent / ".full.stream-work")
  # The output loads in the JAX model and decodes.
  qcfg, qparams, _, _ = hf.import_hf(tmp_path / "out", tokenizer=False)
  toks = llama.generate(qcfg, qparams, _tokens()[0][:1, :4], 3)
  assert toks.shape == (1, 7)


def test_rtn_streams_too(tmp_path, source):
  streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.RTN(),
                               progress=False)
  cfg, params, _, _ = hf.import_hf(source, dtype=jnp.float32, tokenizer=False)
  ref = methods.calibrate(llama.forward_fn(cfg), params, _tokens(), RULES, methods.RTN(),
                          progress=False)
  hf.export_hf(tmp_path / "ref", cfg, ref.params, dtype="bfloat16")
  _assert_same_tensors(tmp_path / "out", tmp_path / "ref")


class _Stop(Exception):
  pass


def test_resume_after_interruption_is_identical(tmp_path, source, full):

  def stop(i, rec):
    if i == 1:
      raise _Stop
  with pytest.raises(_Stop):
    streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                 progress=False, on_layer=stop)
  assert not os.path.exists(tmp_path / "out")
  work = tmp_path / ".out.stream-work"
  with open(work / streaming.MANIFEST) as f:
    assert json.load(f)["done"] == [0, 1]
  res = streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                     progress=False)
  assert res.resumed_from == 2
  assert [r["resumed"] for r in res.layers] == [True, True, False]
  assert _files(tmp_path / "out") == _files(full[0])
  assert res.info["gptq_loss"] == full[1].info["gptq_loss"]


def test_activations_on_disk_give_the_same_file(tmp_path, source, full):
  """`activation_limit=0`: the carried hidden states stay in the work directory (read and
  written one batch at a time) and the driver's stacks go to files too; the output is the
  in-memory run's, bytes for bytes, also when a run interrupted in memory is resumed with
  the limit. No activation file is left."""
  spilled = []

  def stop(i, rec):
    work = tmp_path / ".out.stream-work"
    spilled.append(sorted(os.listdir(work)))
    if i == 0:
      raise _Stop
  with pytest.raises(_Stop):
    streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                 progress=False, on_layer=stop)
  res = streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                     progress=False, activation_limit=0, on_layer=stop)
  assert res.resumed_from == 1
  assert all(r["spilled_bytes"] > 0 for r in res.layers[1:])
  assert full[1].layers[0]["spilled_bytes"] == 0
  assert _files(tmp_path / "out") == _files(full[0])
  assert res.info["gptq_loss"] == full[1].info["gptq_loss"]
  # Between layers: the next boundary's hidden states, no activation files.
  assert all("activations" not in names for names in spilled)
  assert "hidden-00002.npy" in spilled[1] and "hidden-00001.npy" not in spilled[1]
  res = streaming.compress_streaming(source, tmp_path / "out2", _tokens(), RULES,
                                     methods.GPTQ(), progress=False, activation_limit=0)
  assert _files(tmp_path / "out2") == _files(full[0])
  assert not os.path.exists(tmp_path / ".out2.stream-work")
  with pytest.raises(ValueError, match="activation_limit must be"):
    streaming.compress_streaming(source, tmp_path / "out3", _tokens(), RULES, methods.RTN(),
                                 progress=False, activation_limit=-5)


def test_resume_after_kill_is_identical(tmp_path, source, full):
  """A process killed (SIGKILL) after layer 1 is resumed by another process."""
  code = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {os.getcwd()!r})
      from tests.streaming.test_streaming import RULES, _tokens
      from quantjax import methods, streaming
      def kill(i, rec):
        if i == 1:
          os.kill(os.getpid(), signal.SIGKILL)
      streaming.compress_streaming({source!r}, {str(tmp_path / 'out')!r}, _tokens(), RULES,
                                   methods.GPTQ(), progress=False, on_layer=kill)
      """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.getcwd(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")
  res = streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                     progress=False)
  assert res.resumed_from == 2
  assert _files(tmp_path / "out") == _files(full[0])


def test_work_of_another_run_is_not_resumed(tmp_path, source):
  def stop(i, rec):
    raise _Stop
  with pytest.raises(_Stop):
    streaming.compress_streaming(source, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                 progress=False, on_layer=stop)
  other = (QuantRule(module_path=llama.PROJ_KERNELS, format="int8_g32"),)
  with pytest.raises(ValueError, match=r"other inputs \(differs in: rules\)"):
    streaming.compress_streaming(source, tmp_path / "out", _tokens(), other, methods.GPTQ(),
                                 progress=False)
  res = streaming.compress_streaming(source, tmp_path / "out", _tokens(), other, methods.GPTQ(),
                                     progress=False, resume=False)
  assert res.resumed_from == 0


def _rewrite_shard(path, fn):
  sf = st.SafetensorsFile(path)
  tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
  meta = dict(sf.metadata)
  del sf
  st.write_safetensors(path, fn(tensors), meta)


def _shard_of(directory, name):
  with open(os.path.join(directory, hf.INDEX_FILE)) as f:
    return os.path.join(directory, json.load(f)["weight_map"][name])


def test_missing_layer_tensor_is_named(tmp_path):
  src = _write_source(tmp_path / "src")
  name = "model.layers.2.mlp.up_proj.weight"
  path = _shard_of(src, name)
  with open(os.path.join(src, hf.INDEX_FILE)) as f:
    index = json.load(f)
  del index["weight_map"][name]
  with open(os.path.join(src, hf.INDEX_FILE), "w") as f:
    json.dump(index, f)
  _rewrite_shard(path, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(hf.HFFormatError, match=rf"{src}: tensor '{name}' is missing"):
    streaming.compress_streaming(src, tmp_path / "out", _tokens(), RULES, progress=False)
  assert not os.path.exists(tmp_path / "out")
  assert not os.path.exists(tmp_path / ".out.stream-work")  # refused before any work


def test_shard_of_another_dtype_is_named(tmp_path):
  src = _write_source(tmp_path / "src")
  name = "model.layers.1.self_attn.o_proj.weight"
  path = _shard_of(src, name)
  _rewrite_shard(path, lambda t: {k: v.astype(np.float32) for k, v in t.items()})
  with pytest.raises(hf.HFFormatError, match=rf"{path}: tensor '.*' has dtype float32, but "
                     r"config.json .* declares bfloat16"):
    streaming.compress_streaming(src, tmp_path / "out", _tokens(), RULES, progress=False)
  assert not os.path.exists(tmp_path / ".out.stream-work")


def test_disk_full_keeps_previous_output(tmp_path, source, full, monkeypatch):
  out = tmp_path / "out"
  shutil.copytree(full[0], out)  # an earlier output (committed: ours to replace)
  before = _files(out)
  real = st.write_safetensors_chunks

  def full(path, entries, metadata=None):
    if "layer-00001" in os.fspath(path):
      with open(path, "wb") as f:
        f.write(b"\0" * 100)  # part of the file, then the disk is full
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(path, entries, metadata)
  monkeypatch.setattr(st, "write_safetensors_chunks", full)
  with pytest.raises(OSError, match=r"cannot write .*layer-00001\.safetensors") as e:
    streaming.compress_streaming(source, out, _tokens(), RULES, methods.RTN(), progress=False,
                                 overwrite=True)
  assert e.value.errno == errno.ENOSPC
  assert _files(out) == before and atomic.verify_dir(out)
  work = tmp_path / ".out.stream-work"
  assert sorted(os.listdir(work)) == ["embed.safetensors", "hidden-00001.npy",
                                      "layer-00000.safetensors", streaming.MANIFEST]
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
  # Space freed: the run resumes from layer 1 and replaces the output.
  monkeypatch.setattr(st, "write_safetensors_chunks", real)
  res = streaming.compress_streaming(source, out, _tokens(), RULES, methods.RTN(),
                                     progress=False, overwrite=True)
  assert res.resumed_from == 1 and _files(out) != before


def test_refusals_before_any_work(tmp_path, source):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("x")
  with pytest.raises(FileExistsError, match="exists"):
    streaming.compress_streaming(source, tmp_path / "mine", _tokens(), RULES, progress=False)
  with pytest.raises(FileExistsError, match="not a .* quantjax wrote"):
    streaming.compress_streaming(source, tmp_path / "mine", _tokens(), RULES, progress=False,
                                 overwrite=True)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "x"
  with pytest.raises(ValueError, match="selects embed/embedding"):
    streaming.compress_streaming(source, tmp_path / "o", _tokens(),
                                 [QuantRule(module_path=r".*", format="int4_g32")],
                                 progress=False)
  with pytest.raises(ValueError, match=r"token ids in \[0, 500\]"):
    streaming.compress_streaming(source, tmp_path / "o", [np.array([[0, 500]])], RULES,
                                 progress=False)
  assert not os.path.exists(tmp_path / "o")


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    pid, port, source, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from quantjax import methods, streaming
    from quantjax.models import llama
    from quantjax.rules import QuantRule
    tokens = [np.random.default_rng(i).integers(0, 128, (2, 16)).astype(np.int32)
              for i in range(4)]
    res = streaming.compress_streaming(
        source, out, tokens, [QuantRule(module_path=llama.PROJ_KERNELS, format="int4_g32")],
        methods.GPTQ(), progress=False)
    print("process", pid, "layers", len(res.layers), "processes", res.info["processes"],
          "batches here", res.info["local_batches"], flush=True)
    jax.distributed.shutdown()
    """)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _unpack_int4(words):
  """compressed-tensors pack-quantized int32 words -> 8 unsigned 4-bit codes each."""
  w = np.asarray(words).astype(np.uint32)
  return np.stack([(w >> (4 * j)) & 0xF for j in range(8)], -1).reshape(w.shape[0], -1)


def test_two_processes_give_the_one_process_file(tmp_path, source):
  """The calibration set split over 2 jax.distributed CPU processes (Hessians summed by
  XLA across them, process 0's layer shared): the same file as one process, up to
  the float summation order of the statistics (measured: the share of codes that differ
  is printed; the bound is one step in under 0.1% of the weights)."""
  tokens = [np.random.default_rng(i).integers(0, 128, (2, 16)).astype(np.int32)
            for i in range(4)]
  one = streaming.compress_streaming(source, tmp_path / "one", tokens, RULES, methods.GPTQ(),
                                     progress=False)
  port = str(_free_port())
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
  env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, str(script), str(p), port, source,
                             str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for p in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  for p in range(2):  # each process calibrated on its 2 of the 4 batches
    assert f"process {p} layers 3 processes 2 batches here 2" in outs[p], outs[p][-2000:]
  assert atomic.verify_dir(tmp_path / "two")
  a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
  assert sorted(a) == sorted(b)
  n_codes = n_diff = 0
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    if k.endswith("weight_packed"):
      ca, cb = _unpack_int4(a[k]).astype(int), _unpack_int4(b[k]).astype(int)
      assert np.abs(ca - cb).max() <= 1, k
      n_codes += ca.size
      n_diff += int((ca != cb).sum())
    elif k.endswith("weight_scale"):
      np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=2e-2,
                                 err_msg=k)
    else:  # float tensors (embedding, norms) and shapes: bit for bit
      assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), f"{k} differs"
  assert n_codes > 0
  print(f"2 processes vs 1: {n_diff} of {n_codes} codes differ ({n_diff / n_codes:.4%})")
  assert n_diff / n_codes < 1e-3
  cfgs = []
  for name in ("one", "two"):
    with open(tmp_path / name / "config.json") as f:
      cfgs.append({k: v for k, v in json.load(f).items() if k != "_name_or_path"})
  assert cfgs[0] == cfgs[1]
  assert [r["layer"] for r in one.layers] == list(range(N_LAYERS))


def test_gguf_output_equals_in_memory_export(tmp_path, source):
  """Streaming to a .gguf file (interrupted after layer 1 and resumed) gives export_gguf's
  bytes for the same GPTQ result: the Q4_0 codes go in code for code, floats in the
  source's dtype (BF16), norms F32."""
  from quantjax.io import gguf, gguf_read
  rules = (QuantRule(module_path=llama.PROJ_KERNELS, format="q4_0"),)
  out = tmp_path / "model.gguf"

  def stop(i, rec):
    if i == 1:
      raise _Stop
  with pytest.raises(_Stop):  # interrupted after layer 1, then resumed: the same bytes
    streaming.compress_streaming(source, out, _tokens(), rules, methods.GPTQ(act_order=True),
                                 progress=False, on_layer=stop)
  assert not os.path.exists(out)
  res = streaming.compress_streaming(source, out, _tokens(), rules,
                                     methods.GPTQ(act_order=True), progress=False)
  assert res.resumed_from == 2
  assert res.output_bytes == os.path.getsize(out)
  assert {r.gguf_type for r in res.report if "attn_q" in r.name} == {"Q4_0"}
  assert all(r.how == "lossless" for r in res.report if r.gguf_type == "Q4_0")
  cfg, params, _, _ = hf.import_hf(source, dtype=jnp.float32, tokenizer=False)
  ref = methods.calibrate(llama.forward_fn(cfg), params, _tokens(), rules,
                          methods.GPTQ(act_order=True), progress=False)
  gguf.export_gguf(tmp_path / "ref.gguf", cfg, ref.params, float_type="BF16")
  with gguf_read.read_gguf(out) as a, gguf_read.read_gguf(tmp_path / "ref.gguf") as b:
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
      assert ta.type_name == tb.type_name, ta.name
      assert np.array_equal(np.asarray(ta.data).view(np.uint8),
                            np.asarray(tb.data).view(np.uint8)), f"{ta.name} differs"
  assert not os.path.exists(tmp_path / ".model.gguf.stream-work")
  # Loads in the JAX model and decodes.
  qcfg, qparams, _ = gguf.import_gguf(out, tokenizer=False)[:3]
  assert llama.generate(qcfg, qparams, _tokens()[0][:1, :4], 3).shape == (1, 7)
  # An existing file is kept unless overwrite=True.
  with pytest.raises(FileExistsError, match="overwrite=True"):
    streaming.compress_streaming(source, out, _tokens(), rules, methods.GPTQ(), progress=False)


def test_gguf_source_equals_its_in_memory_load(tmp_path):
  """A GGUF file as the source (Q8_0 projections and embedding, Q4_1 down_proj, F32
  norms) streams to the tensors of load_gguf -> calibrate -> export_hf, bit for bit: each
  tensor dequantized as load_gguf does it, Q/K rows back in Hugging Face's order, the
  embedding's calibration rows dequantized by rows."""
  from quantjax.io import gguf
  from quantjax.models import load as load_lib
  cfg, pure = make_tiny(num_layers=N_LAYERS)
  src = tmp_path / "tiny.gguf"
  gguf.export_gguf(src, cfg, pure, types=[("down_proj", "Q4_1"), ("kernel|embedding", "Q8_0")])
  res = streaming.compress_streaming(src, tmp_path / "out", _tokens(), RULES,
                                     methods.GPTQ(act_order=True), progress=False)
  assert [r["layer"] for r in res.layers] == list(range(N_LAYERS))
  gcfg, params, _ = load_lib.load_gguf(src, tokenizer=False)
  ref = methods.calibrate(llama.forward_fn(gcfg), params, _tokens(), RULES,
                          methods.GPTQ(act_order=True), progress=False)
  hf.export_hf(tmp_path / "ref", gcfg, ref.params, dtype="float32")
  _assert_same_tensors(tmp_path / "out", tmp_path / "ref")
  # The embedding went through Q8_0 (not the float32 weights the file was made from).
  emb = _tensors(tmp_path / "out")["model.embed_tokens.weight"]
  assert np.array_equal(emb, np.asarray(params["embed"]["embedding"]))
  assert not np.array_equal(emb, np.asarray(pure["embed"]["embedding"]))
  # The output exists now: a second run refuses to overwrite it.
  with pytest.raises(FileExistsError, match="overwrite=True"):
    streaming.compress_streaming(src, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                 progress=False)


def test_damaged_gguf_source_is_refused(tmp_path):
  """A damaged GGUF source is refused by name before any work (gguf_read's checks)."""
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF" + b"\0" * 20)
  from quantjax.models import load as load_lib
  with pytest.raises(load_lib.GGUFError, match="bad.gguf"):
    streaming.compress_streaming(bad, tmp_path / "out", _tokens(), RULES, methods.GPTQ(),
                                 progress=False)
  assert not os.path.exists(tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="GGUF source not found: .*missing.gguf"):
    streaming.compress_streaming(tmp_path / "missing.gguf", tmp_path / "out", _tokens(), RULES,
                                 methods.GPTQ(), progress=False)


def _mapped_rss_kib(path):
  """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()
      if len(head) >= 5 and "-" in head[0] and not line.startswith(("Rss", "Size")):
        inside = line.rstrip("\n").endswith(str(path))
      elif inside and line.startswith("Rss:"):
        total += int(head[1])
  return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc needed")
def test_gguf_pages_dropped_without_reparsing(tmp_path):
  """A GGUF source's release takes the pages read out of resident memory and keeps the
  parsed file: later reads fault the same bytes in again."""
  from quantjax.io import gguf
  from quantjax.io import gguf_dequant, gguf_read
  cfg, pure = make_tiny(num_layers=1)
  src = tmp_path / "tiny.gguf"
  gguf.export_gguf(src, cfg, pure)
  f = gguf_read.open_gguf(str(src))
  t = f.tensor("token_embd.weight")
  before = gguf_dequant.dequantize_gguf_tensor(t)
  assert _mapped_rss_kib(src) >= before.nbytes // 1024  # 32 KiB of float32 embedding
  assert f.drop_pages()
  assert _mapped_rss_kib(src) == 0
  assert f.tensor("token_embd.weight") is t  # the header was not parsed again
  assert np.array_equal(gguf_dequant.dequantize_gguf_tensor(t), before)
  f.close()
