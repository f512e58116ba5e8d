"""Every block the runner's stages read, with their defaults (not an experiment by itself).

A config file's `get_config(arg)` starts from `base_config()` and sets its
stages or its sweep. Every field can be overridden on the command line
(`--config.data.corpus=my.txt`, `--config.model.source=gguf
--config.model.path=model.gguf`, `--config.calib.windows=32`), so every model,
corpus and method is reachable from every config; an unknown key is an error
that lists the valid ones.
"""

import ml_collections

from quantjax.eval.data import DEFAULT_CORPUS

# GGUF block types: what a mixed allocation can export code for code.
GGUF_CANDIDATES = ("q8_0", "q5_1", "q5_0", "q4_0")
# A mix at 4.5 bits per weight needs a candidate below 4.5: GGUF's block types on rows that
# are not multiples of 256 (SmolLM2's 576, Gemma 3's 640; the k-quants need 256) stop at
# Q4_0's 4.5 bpw, so a 4.5-bpw budget over them alone is Q4_0 everywhere. int3 g64 (3.5 bpw)
# is the step below.
MIXED_CANDIDATES = ("q8_0", "q5_0", "q4_0", "int3_g64")


def _train_block(**overrides) -> ml_collections.ConfigDict:
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


def base_config(stages: str = "evaluate") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""  # the experiment's title in results.md

  c.model = ml_collections.ConfigDict()
  c.model.source = "smollm2"  # smollm2 | gemma3 | gguf | hf | tiny (see quantjax.models.load.SOURCES)
  c.model.path = ""  # the .gguf file or Hugging Face directory for gguf / hf
  c.model.dtype = "float32"  # activation dtype of the forward pass
  c.model.tiny = ml_collections.ConfigDict(dict(hidden_size=64, intermediate_size=128,
                                                num_layers=2, num_heads=4, num_kv_heads=2,
                                                seed=0))

  c.data = ml_collections.ConfigDict()
  c.data.corpus = DEFAULT_CORPUS  # a named corpus or the path of a UTF-8 text file
  c.data.calib_corpus = ""  # calibrate on another text ("" = the same); evaluate on corpus

  c.eval = ml_collections.ConfigDict()
  c.eval.tokens = 16384  # the last N tokens of the corpus: 32 windows of 512
  c.eval.window = 512
  c.eval.batch_size = 8  # windows per forward pass
  c.eval.kl_top_k = 64  # tokens of the FP32 distribution kept for KL
  c.eval.transformers = False  # also score the source model with transformers (PyTorch)
  c.eval.speed = False  # also prefill / decode tokens/s with a KV cache (random prompt)
  c.eval.speed_batch_sizes = (1, 8)
  c.eval.prompt_len = 128
  c.eval.decode_steps = 32
  c.eval.progress = True

  c.calib = ml_collections.ConfigDict()
  c.calib.windows = 128  # drawn before the evaluation text
  c.calib.seed = 0
  c.calib.batch_size = 8

  c.targets = ""  # regex of the leaves to compress; "" = the model's own projections

  c.stages = stages
  # Function-preserving rotations before quantizing (stage "rotate", first): r1 the residual
  # stream, r2 the value heads; hadamard | auto (Hadamard, else random orthogonal x
  # Walsh-Hadamard) | random | "" (none). The model's rotation table says what it allows.
  # learn_steps > 0: SpinQuant, the rotations trained (Cayley, Adam) on the calibration
  # windows (learn_batch per step) against the loss of the model fake-quantized in
  # learn_format.
  c.rotate = ml_collections.ConfigDict(dict(r1="hadamard", r2="hadamard", seed=0, learn_steps=0,
                                            learn_format="", learning_rate=2e-3, learn_batch=2))
  c.prune = ml_collections.ConfigDict(dict(method="sparsegpt", pattern="2:4"))
  c.distill = _train_block()
  # init "minmax": LSQ starts from the RTN scales (the RTN model), not LSQ's 2 mean|w| / sqrt(Qp).
  c.qat = _train_block(format="int4_g64", lsq=True, init="minmax")
  # method: rtn | cast | gptq | awq | smoothquant | static | signround | llamacpp;
  # format: any QuantFormat spec (int4_g64, int3_g64_asym, nf4_g64, fp8_e4m3, ternary, binary,
  # q4_0, iq4_nl, mxfp4, nvfp4, q2_0, bf16 for cast...);
  # act_format: activations quantized at run time (int8: per token, int8_t: per tensor);
  # act_observer: "" = dynamic, minmax / percentile / mse = static ranges from calibration;
  # calibration: the weights' scale rule; embedding_format: also quantize the embedding;
  # mode: sequential | one_pass; input_scales: foldable | all (AWQ / SmoothQuant);
  # head_format: also quantize an untied head (lm_head/kernel; a rotated model's);
  # importance_windows: method "llamacpp" (ggml's own quantizer) with an importance matrix.
  c.quantize = ml_collections.ConfigDict(dict(
      method="rtn", format="int4_g64", calibration="auto", act_format="", act_observer="",
      act_order=False, alpha=0.5, mode="sequential", input_scales="foldable",
      embedding_format="", head_format="", importance_windows=0))
  # One format per tensor under a budget (bits per weight of the targets, scales included).
  c.mixed = ml_collections.ConfigDict(dict(
      budget_bpw=4.5, candidates=list(GGUF_CANDIDATES), sensitivity_windows=16, method="rtn",
      calibration="auto"))
  # format gguf | hf; types: (regex, GGUF type) pairs; llamacpp_quantize: let llama.cpp's own
  # quantizer make this type from an F32 export; types_from: reproduce that llama.cpp type's
  # per-tensor mix with quantjax's encoders; importance_windows: importance matrix.
  c.export = ml_collections.ConfigDict(dict(
      format="gguf", types=[("embed/embedding", "Q8_0")], float_type="F32",
      llamacpp_quantize="", types_from="", importance_windows=0, hf_dtype="float32"))
  # windows: score only the first N evaluation windows (0: all); jax: also score the same file
  # with the JAX model (imported without dequantizing).
  c.llamacpp = ml_collections.ConfigDict(dict(windows=0, jax=False))
  # transformers scores an `export.format="hf"` directory; windows: the first N only (0: all);
  # dequantize_fallback: load with CompressedTensorsConfig(dequantize=True) when the
  # compressed load fails (asymmetric pack-quantized checkpoints).
  c.transformers = ml_collections.ConfigDict(dict(windows=0, dequantize_fallback=True))
  c.sweep = []
  return c


def entry(name: str, stages: str, **overrides) -> dict:
  """A sweep entry: `entry("gptq", "quantize,evaluate", quantize__method="gptq")`."""
  out = {"name": name, "stages": stages}
  for k, v in overrides.items():
    out[k.replace("__", ".")] = v
  return out


def select(entries, arg, config_name: str) -> list[dict]:
  """The entries named in `arg` (a comma list), in order; all when `arg` is empty."""
  known = {e["name"]: e for e in entries}
  names = [n.strip() for n in arg.split(",") if n.strip()] if arg else list(known)
  for n in names:
    if n not in known:
      raise ValueError(f"{config_name}: unknown entry {n!r}; expected some of "
                       f"{', '.join(known)}")
  return [known[n] for n in names]
