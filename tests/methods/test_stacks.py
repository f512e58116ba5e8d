"""Stacked weights with the layer axis anywhere, and scans inside scans.

One residual MLP model written four ways, as JAX users write it: layers as
separate leaves in a Python loop; stacked `[L, in, out]` under `lax.scan`;
stacked with the layer axis last (`[in, out, L]`, scanned over a moved view);
and two nested scans over `[G, L/G, in, out]`. The calibrated driver and the
plain transforms must give every layout the unstacked model's result, bit for
bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import methods, sparsity, transforms
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import QArray
from quantjax.rules import PruneRule, QuantRule

D, F, L, G = 32, 64, 4, 2


def _block(x, w1, w2):
  return x + jax.nn.gelu(x @ w1) @ w2


def fn_unstacked(p, x):
  for layer in p["layers"]:
    x = _block(x, layer["w1"], layer["w2"])
  return x


def fn_first(p, x):
  x, _ = jax.lax.scan(lambda h, w: (_block(h, *w), None), x, (p["w1"], p["w2"]))
  return x


def fn_last(p, x):
  ws = (jnp.moveaxis(p["w1"], -1, 0), jnp.moveaxis(p["w2"], -1, 0))
  x, _ = jax.lax.scan(lambda h, w: (_block(h, *w), None), x, ws)
  return x


def fn_nested(p, x):
  def outer(h, ws):
    h, _ = jax.lax.scan(lambda hh, w: (_block(hh, *w), None), h, ws)
    return h, None
  x, _ = jax.lax.scan(outer, x, (p["w1"], p["w2"]))
  return x


FNS = {"first": fn_first, "last": fn_last, "nested": fn_nested}
# Where each layout keeps layer l of a stacked leaf.
STACK_AXES = {"first": (0,), "last": (-1,), "nested": (0, 1)}


def _layers(seed=0):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)  # noqa: E731
  return [{"w1": mk(D, F), "w2": mk(F, D)} for _ in range(L)]


def _stacked(layers, layout):
  out = {}
  for n in ("w1", "w2"):
    w = jnp.stack([layer[n] for layer in layers])  # [L, in, out]
    if layout == "last":
      w = jnp.moveaxis(w, 0, -1)
    elif layout == "nested":
      w = w.reshape((G, L // G) + w.shape[1:])
    out[n] = w
  return out


def _layer(leaf, layout, i):
  """Layer i of a stacked leaf (a QArray is dequantized first)."""
  w = np.asarray(leaf.dequantize() if isinstance(leaf, QArray) else leaf)
  if layout == "last":
    return w[..., i]
  if layout == "nested":
    return w[i // (L // G), i % (L // G)]
  return w[i]


def _batches(seed=1):
  rng = np.random.default_rng(seed)
  scale = 1.0 + 4.0 * (np.arange(D) < 3)  # a few outlier channels
  return [jnp.asarray(rng.normal(size=(4, 16, D)) * scale, jnp.float32) for _ in range(3)]


@pytest.mark.parametrize("layout", sorted(FNS))
def test_gptq_on_a_stack_equals_the_unstacked_model_bit_for_bit(layout):
  layers = _layers()
  batches = _batches()
  ref = methods.calibrate(fn_unstacked, {"layers": layers}, batches,
                          [QuantRule(module_path=r"layers/\d+/w\d", format="int4_g16")],
                          methods.GPTQ(), progress=False)
  params = _stacked(layers, layout)
  res = methods.calibrate(FNS[layout], params, batches,
                          [QuantRule(module_path=r"w\d", format="int4_g16")], methods.GPTQ(),
                          progress=False)
  for n in ("w1", "w2"):
    q = res.params[n]
    assert isinstance(q, QArray) and q.shape == params[n].shape, (n, q)
    for i in range(L):
      want = ref.params["layers"][i][n]
      np.testing.assert_array_equal(_layer(q, layout, i), np.asarray(want.dequantize()))
  # Each slice got its own statistics: L parts per leaf, named by their index.
  assert len(res.parts) == 2 * L
  # The quantized stack runs under the same scans, and computes what the unstacked one does.
  x = batches[0]
  np.testing.assert_allclose(np.asarray(jax.jit(FNS[layout])(res.params, x)),
                             np.asarray(fn_unstacked(ref.params, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", sorted(FNS))
@pytest.mark.parametrize("spec", ["int4_g16", "int8", "int4_g32_asym"])
def test_quantize_params_with_stack_axes_equals_per_layer_quantization(layout, spec):
  layers = _layers()
  params = _stacked(layers, layout)
  q = transforms.quantize_params(
      params, [QuantRule(module_path=r"w\d", format=spec, stack_axes=STACK_AXES[layout])],
      strict=True)
  for n in ("w1", "w2"):
    assert q[n].shape == params[n].shape
    for i in range(L):
      want = qarray_lib.quantize(layers[i][n], spec)
      np.testing.assert_array_equal(_layer(q[n], layout, i), np.asarray(want.dequantize()))
    # Real size: the stack costs what its layers cost, one by one.
    per_layer = qarray_lib.quantize(layers[0][n], spec).nbytes
    assert q[n].nbytes == L * per_layer
  # The result runs in the unmodified model under jit.
  jax.jit(FNS[layout])(q, _batches()[0])
  # Fake quantization with the same rule lies on the same grid, slice by slice.
  fq = transforms.fake_quant_params(
      params, [QuantRule(module_path=r"w\d", format=spec, stack_axes=STACK_AXES[layout])])
  for n in ("w1", "w2"):
    np.testing.assert_allclose(np.asarray(fq[n]), np.asarray(q[n].dequantize()), rtol=0,
                               atol=1e-6)


def test_a_stack_without_stack_axes_is_refused_by_name():
  # 32 layers: grouping along axis 0 would divide evenly and go wrong silently.
  params = {"blocks": {"down": {"kernel": jnp.ones((32, 64, 128))}}}
  for call in (lambda r: transforms.quantize_params(params, r),
               lambda r: transforms.fake_quant_params(params, r)):
    with pytest.raises(ValueError, match=r"blocks/down/kernel has 3 axes \(32, 64, 128\).*"
                                         r"stack_axes"):
      call([QuantRule(module_path=".*kernel", format="int4_g32")])
  # Saying so is enough: stack_axes=(0,) quantizes layer by layer.
  q = transforms.quantize_params(
      params, [QuantRule(module_path=".*kernel", format="int4_g32", stack_axes=(0,))])
  assert q["blocks"]["down"]["kernel"].scale.shape == (32, 2, 128)
  # stack_axes=() keeps a 3-D weight whole (a DenseGeneral [d, heads, head_dim]).
  q = transforms.quantize_params(
      params, [QuantRule(module_path=".*kernel", format="int4_g32", stack_axes=())])
  assert q["blocks"]["down"]["kernel"].scale.shape == (1, 64, 128)
  with pytest.raises(ValueError, match="out of range"):
    transforms.quantize_params(
        params, [QuantRule(module_path=".*kernel", format="int4_g32", stack_axes=(3,))])


def test_per_tensor_slices_stack_only_along_leading_axes():
  params = _stacked(_layers(), "last")
  with pytest.raises(ValueError, match=r"w1: per_tensor scales .* stacking axes \(2,\)"):
    transforms.quantize_params(
        params, [QuantRule(module_path=r"w\d", format="int8_t", stack_axes=(-1,))])
  first = transforms.quantize_params(
      _stacked(_layers(), "first"),
      [QuantRule(module_path=r"w\d", format="int8_t", stack_axes=(0,))])
  assert first["w1"].scale.shape == (L, 1, 1)


@pytest.mark.parametrize("layout", sorted(FNS))
def test_nm_pruning_of_a_stack_is_per_layer(layout):
  layers = _layers()
  params = _stacked(layers, layout)
  rule = PruneRule(module_path=r"w\d", n=2, m=4, stack_axes=STACK_AXES[layout])
  pruned, masks = sparsity.prune_params(params, [rule])
  ref, _ = sparsity.prune_params({"layers": layers}, [PruneRule(module_path=".*", n=2, m=4)])
  for n in ("w1", "w2"):
    for i in range(L):
      np.testing.assert_array_equal(_layer(pruned[n], layout, i),
                                    np.asarray(ref["layers"][i][n]))


def test_slices_read_with_different_layouts_are_refused():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(2, D, D)), jnp.float32)

  def fn(p, x):
    return (x @ p["w"][0]) @ p["w"][1].T  # layer 1 is read transposed

  with pytest.raises(ValueError, match=r"w: its slices are read with different layouts"):
    methods.calibrate(fn, {"w": w}, _batches(), [QuantRule(module_path="w", format="int4_g16")],
                      methods.RTN(), progress=False)
