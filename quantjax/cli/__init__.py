"""The command-line tools, each run as `python -m quantjax.cli.NAME --help`:

* `inspect`: the bits of a value in FP32, FP16, BF16, FP8 and INT8
  (`quantjax.numerics.inspect`);
* `memory`: bytes to store and to train N parameters per format and regime
  (`quantjax.eval.memory`);
* `plan`: per-device memory to store, calibrate, evaluate and train a model on
  a mesh (`quantjax.eval.plan`).

The experiment runner is `experiments/main.py` in a checkout (docs/experiments.md).
"""
