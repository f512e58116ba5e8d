"""Low-bit format wrappers and calibration windows."""

import numpy as np
import pytest

from quantjax.eval import data as data_lib
from quantjax.methods import calib_data, ternary
from quantjax.models import llama
from quantjax.numerics.qarray import QArray


@pytest.mark.parametrize("kind,levels", [("binary", 2), ("ternary", 3), ("nf4", 16),
                                         ("fp8_e4m3", None)])
def test_lowbit_wrappers(tiny, kind, levels):
  cfg, pure = tiny
  q = ternary.quantize_lowbit(pure, kind, module_path=llama.PROJ_KERNELS,
                             group_size=32 if kind != "fp8_e4m3" else None)
  w = q["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(w, QArray) and w.fmt.kind == kind
  assert not isinstance(q["embed"]["embedding"], QArray)
  assert not isinstance(q["layers"][0]["input_norm"]["scale"], QArray)
  codes = np.asarray(w.codes()).astype(np.float32)
  if levels is not None:
    assert len(np.unique(codes)) <= levels
  w0 = np.asarray(pure["layers"][0]["mlp"]["up_proj"]["kernel"])
  d = np.asarray(w.dequantize())
  if kind == "ternary":
    # TWN: zero where |w| <= 0.7 mean|w| of the group
    g = np.abs(w0).reshape(-1, 32, w0.shape[1])
    thr = np.repeat(0.7 * g.mean(1), 32, axis=0)
    np.testing.assert_array_equal(d == 0, np.abs(w0) <= thr)
  if kind == "binary":
    g = np.abs(w0).reshape(-1, 32, w0.shape[1]).mean(1)
    np.testing.assert_allclose(np.abs(d), np.repeat(g, 32, axis=0), rtol=1e-6)
  rel = np.linalg.norm(d - w0) / np.linalg.norm(w0)
  assert rel < {"binary": 0.9, "ternary": 0.7, "nf4": 0.15, "fp8_e4m3": 0.05}[kind]
  with pytest.raises(ValueError, match="kind must be one of"):
    ternary.quantize_lowbit(pure, "int4", module_path=llama.PROJ_KERNELS)


def test_calibration_windows_follow_the_protocol():
  tokens = np.arange(40000, dtype=np.int32)
  w = calib_data.calibration_windows(tokens, n_samples=16, length=512, seed=3)
  split = data_lib.make_split(tokens, data_lib.Protocol(calib_windows=16, seed=3))
  np.testing.assert_array_equal(w, split.calib_windows)  # same draw as eval/data.py
  assert w.max() < 40000 - 16384  # only tokens before the evaluation set
  short = calib_data.calibration_windows(tokens, n_samples=5, length=64, seed=0)
  assert short.shape == (5, 64) and short.max() < 40000 - 16384
  np.testing.assert_array_equal(short[:, 1:] - short[:, :-1], 1)
  s = data_lib.split_with_calibration(tokens, n_samples=4, length=128)
  assert s.calib_windows.shape == (4, 128) and s.eval_windows.shape == (32, 512)
  assert [b.shape[0] for b in calib_data.calibration_batches(w, 6)] == [6, 6, 4]
  with pytest.raises(ValueError, match="precede the evaluation set"):
    calib_data.calibration_windows(tokens[:16500], n_samples=2, length=512)
