"""Sharding on 8 forced CPU devices (see tests/conftest.py) and a 2-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import quantjax as qj
from quantjax import distributed as dist
from quantjax.io import checkpoint


def _llama_like(seed=0, d=64, hidden=128, layers=2):
  keys = iter(jax.random.split(jax.random.key(seed), 8 * layers + 2))
  p = {"embed": {"embedding": jax.random.normal(next(keys), (256, d))}, "layers": {}}
  for i in range(layers):
    p["layers"][str(i)] = {
        "attn": {n: {"kernel": jax.random.normal(next(keys), (d, d))} for n in
                 ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": {"kernel": jax.random.normal(next(keys), (d, hidden))},
                "up_proj": {"kernel": jax.random.normal(next(keys), (d, hidden))},
                "down_proj": {"kernel": jax.random.normal(next(keys), (hidden, d))}},
        "input_norm": {"scale": jnp.ones(d)}}
  return p


RULES = [qj.QuantRule(module_path=r".*_proj/kernel", format="int4_g32_asym")]


def test_mesh_from_config_and_errors():
  assert jax.device_count() == 8
  m = dist.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(dist.make_mesh(dist.MeshConfig(tensor=4)).shape)["data"] == 2
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    dist.make_mesh(dist.MeshConfig(data=-1, tensor=3))
  with pytest.raises(ValueError, match="needs 12 devices"):
    dist.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    dist.make_mesh({"model": 8})


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int8", "int3_g32", "nf4_g32"])
def test_sharded_quantize_equals_single_device(fmt):
  params = _llama_like()
  rules = [qj.QuantRule(module_path=r".*_proj/kernel", format=fmt)]
  mesh = dist.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ref = qj.quantize_params(params, rules)
  out = dist.quantize_params_sharded(params, rules, mesh)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = out["layers"]["0"]["mlp"]["gate_proj"]["kernel"]
  assert q.qvalue.sharding.spec == P("fsdp", "tensor")
  o = out["layers"]["0"]["attn"]["o_proj"]["kernel"]
  assert o.qvalue.sharding.spec == P("tensor", "fsdp")
  # each device holds 1/4 of the weight codes (data axis replicates)
  per_dev = dist.device_bytes(q)
  codes = dist.device_bytes(q.qvalue)
  total = q.nbytes
  print(f"{fmt}: gate_proj {total} B in all; per device {sorted(set(per_dev.values()))} B "
        f"(codes {sorted(set(codes.values()))} of {q.qvalue.nbytes} B)")
  assert max(codes.values()) == q.qvalue.nbytes // 4
  # per-channel scales are split over tensor only (replicated over fsdp)
  assert max(per_dev.values()) <= q.qvalue.nbytes // 4 + q.scale.nbytes // 2 + (
      0 if q.zero_point is None else q.zero_point.nbytes // 2)


def test_sharding_errors_name_the_problem():
  mesh = dist.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    dist.spec_for("w", (64, 64), mesh, [dist.PartitionRule(module_path="w", spec=("model", None))])
  q = qj.quantize(jnp.ones((24, 8)), "int4")  # 24 rows over 8 shards: 3 per shard
  with pytest.raises(ValueError, match="shard boundary inside a packed byte"):
    dist.qarray_sharding(q, ("fsdp", None), mesh, "w")
  q = qj.quantize(jnp.ones((64, 8)), "int4_g16")  # 4 groups over 8 shards
  with pytest.raises(ValueError, match="boundary inside a group"):
    dist.qarray_sharding(q, ("fsdp", None), mesh, "w")
  with pytest.raises(ValueError, match="cannot be split into 8 shards"):
    dist.spec_for("w", (12, 4), mesh, [dist.PartitionRule(module_path="w", spec=("fsdp",))])
  with pytest.raises(ValueError, match="not a valid regex"):
    dist.PartitionRule(module_path="(", spec=())


def test_data_parallel_hessian_equals_single():
  x = jax.random.normal(jax.random.key(0), (64, 16))
  mesh = dist.make_mesh({"data": 8})
  h = dist.data_parallel_hessian(x, mesh)
  np.testing.assert_allclose(np.asarray(h), np.asarray(x.T @ x), rtol=1e-5, atol=1e-4)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  params = _llama_like()
  mesh8 = dist.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q8 = dist.quantize_params_sharded(params, RULES, mesh8)
  checkpoint.save_params(tmp_path / "c", q8)
  restored = checkpoint.restore_params(tmp_path / "c")
  mesh4 = dist.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  q4 = dist.shard_params(restored, mesh4, dist.LLAMA_PARTITION_RULES)
  for a, b in zip(jax.tree.leaves(q8), jax.tree.leaves(q4)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  k = q4["layers"]["1"]["mlp"]["down_proj"]["kernel"]
  assert len(k.qvalue.sharding.device_set) == 4


_WORKER = textwrap.dedent("""
    import json, os, sys
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from quantjax import distributed as dist
    if pid >= 0:
      dist.initialize_multihost(f"127.0.0.1:{port}", 2, pid)
    import jax, jax.numpy as jnp, numpy as np
    import quantjax as qj
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    d, h = 64, 128
    k = jax.random.split(jax.random.key(0), 3)
    params = {"layers": {"0": {"mlp": {"up_proj": {"kernel": jax.random.normal(k[0], (d, h))},
                                       "down_proj": {"kernel": jax.random.normal(k[1], (h, d))}}}}}
    x = jax.random.normal(k[2], (32, d))
    rules = [qj.QuantRule(module_path=r".*_proj/kernel", format="int4_g32_asym")]
    mesh = dist.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}) if jax.device_count() == 8 \\
        else dist.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    q = dist.quantize_params_sharded(params, rules, mesh)
    xs = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")),
                                      lambda idx: np.asarray(x)[idx])
    @jax.jit
    def evaluate(p, a):
      m = p["layers"]["0"]["mlp"]
      y = qj.qdot(jax.nn.gelu(qj.qdot(a, m["up_proj"]["kernel"])), m["down_proj"]["kernel"])
      return jnp.mean((y - a) ** 2)
    loss = evaluate(q, xs)
    codes = multihost_utils.process_allgather(q["layers"]["0"]["mlp"]["up_proj"]["kernel"].qvalue,
                                              tiled=True)
    if pid <= 0:
      json.dump({"loss": float(loss), "codes_sum": int(np.asarray(codes, np.int64).sum()),
                 "devices": jax.device_count(), "processes": jax.process_count()}, open(out, "w"))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_agree_with_one(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  port = str(_free_port())
  multi = str(tmp_path / "multi.json")
  single = str(tmp_path / "single.json")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, multi], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  subprocess.run([sys.executable, str(script), "-1", port, single], env=env, check=True,
                 capture_output=True, timeout=240)
  m, s = json.load(open(multi)), json.load(open(single))
  assert m["processes"] == 2 and m["devices"] == 8 and s["processes"] == 1 and s["devices"] == 4
  assert m["codes_sum"] == s["codes_sum"]
  np.testing.assert_allclose(m["loss"], s["loss"], rtol=1e-5)


def test_sharded_training_matches_single_device():
  from jax.sharding import NamedSharding
  from quantjax import distill
  params = {"layers": {"0": {"mlp": {"up_proj": {"kernel": 0.1 * jax.random.normal(jax.random.key(0), (64, 128))},
                                     "down_proj": {"kernel": 0.1 * jax.random.normal(jax.random.key(1), (128, 64))}}}}}
  target = jax.random.normal(jax.random.key(2), (64, 64)) / 8

  def loss_fn(p, x, key):
    m = p["layers"]["0"]["mlp"]
    y = qj.qdot(jax.nn.gelu(qj.qdot(x, m["up_proj"]["kernel"])), m["down_proj"]["kernel"])
    return jnp.mean((y - x @ target) ** 2)

  batch_fn = lambda s: jax.random.normal(jax.random.fold_in(jax.random.key(9), s), (32, 64))  # noqa
  cfg = distill.TrainConfig(steps=10, learning_rate=1e-2, warmup_steps=1)
  single, _ = distill.fit(loss_fn, params, batch_fn, cfg, progress=False)
  mesh = dist.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded_params = dist.shard_params(params, mesh, dist.LLAMA_PARTITION_RULES)
  out, hist = distill.fit(loss_fn, sharded_params, batch_fn, cfg, progress=False,
                          batch_sharding=NamedSharding(mesh, P("data")))
  k = out["layers"]["0"]["mlp"]["up_proj"]["kernel"]
  assert k.sharding.spec == P("fsdp", "tensor")
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(out)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
