"""Shared pieces of the staged-chain configs (not an experiment by itself)."""

import ml_collections

from configs import default as default_config

TARGETS = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"


def _train_block(**overrides):
  t = ml_collections.ConfigDict()
  t.steps = 100
  t.learning_rate = 5e-5
  t.warmup_steps = 10
  t.weight_decay = 0.0
  t.clip_norm = 1.0
  t.batch_size = 4
  t.seq_len = 256
  t.temperature = 1.0
  t.alpha = 1.0  # 1.0: pure logit KD; < 1 mixes in the next-token cross-entropy
  t.seed = 0
  t.checkpoint_every = 25
  for k, v in overrides.items():
    t[k] = v
  return t


def chain_config(stages: str) -> ml_collections.ConfigDict:
  """Model / data / eval / calib from configs/default.py plus every stage block."""
  d = default_config.get_config()
  c = ml_collections.ConfigDict()
  c.model = d.model
  c.model.tiny = ml_collections.ConfigDict(dict(hidden_size=64, intermediate_size=128,
                                                num_layers=2, num_heads=4, num_kv_heads=2, seed=0))
  c.data = d.data
  c.eval = d.eval
  c.calib = d.calib
  c.calib.windows = 64
  c.calib.batch_size = 8
  c.targets = TARGETS
  c.stages = stages
  c.prune = ml_collections.ConfigDict(dict(method="sparsegpt", pattern="2:4"))
  c.distill = _train_block()
  # init "minmax": LSQ starts from the RTN scales (the RTN model), not LSQ's 2 mean|w| / sqrt(Qp).
  c.qat = _train_block(format="int4_g64", lsq=True, init="minmax")
  # method: rtn | gptq | awq | smoothquant | static (RTN weights + static activation
  # ranges); act_format (e.g. "int8_t", per-tensor int8) quantizes the inputs too;
  # act_observer ("" = dynamic, or minmax / percentile / mse = static ranges);
  # mode: sequential | one_pass; input_scales: "foldable" (AWQ / SmoothQuant scales only
  # where the model's fold table absorbs them) or "all" (every weight, kept as InputScaled).
  c.quantize = ml_collections.ConfigDict(dict(method="rtn", format="int4_g64", act_order=False,
                                              calibration="minmax", act_format="",
                                              act_observer="", alpha=0.5, mode="sequential",
                                              input_scales="foldable"))
  # GGUF export (stage "export", and `python -m quantjax.export`).
  c.export = ml_collections.ConfigDict(dict(types=[("embed/embedding", "Q8_0")],
                                            float_type="F32", llamacpp_eval=False))
  c.sweep = []
  return c
