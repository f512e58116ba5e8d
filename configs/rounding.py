"""Learned rounding (SignRound) against round-to-nearest and GPTQ on SmolLM2-135M.

Launch (from the repository root; resumable; `arg` is a comma list of entries):

    python -m experiments.main --config=configs/rounding.py --workdir=runs/rounding
    python -m experiments.main \\
        --config=configs/rounding.py:fp32,signround_w4_g64,signround_w3_g64 \\
        --workdir=runs/rounding

The default comparison's protocol (`configs/default.py`): every `*_proj`
kernel, 8 calibration windows of 512 tokens, perplexity / KL / top-1 against
FP32 on the 32 evaluation windows; here one window per calibration batch,
since SignRound takes one calibration batch per step (GPTQ and RTN sum over
the batches, so this changes them only by float summation order). `quantjax.methods.SignRound`
learns each group's rounding offsets and clipping factors by signed gradient
descent against the float model's values at the next group boundary of the
traced program (80 steps per group, lr 1/80, clipping in [0.5, 1];
docs/methods.md, "SignRound"). The SignRound options live in this config's
`quantize` block (`iters`, `lr` with 0 = 1/iters, `min_clip`, `seed` with
-1 = none), so `--config.quantize.iters=200` reaches them; they change nothing
for the other methods.

Expected result (docs/methods.md, "SignRound"; perplexity, FP32 11.090):
SignRound W4 g64 11.779 (+6.22%; RTN +26.9%, GPTQ act-order +11.6%, Intel's
AutoRound at 200 steps +6.26% in 1,554 s) in 406 s of quantizing on a shared
2-core CPU under a load of 2-5 (557 s at 5-7); SignRound W3 g64 14.325 (+29.2%; GPTQ act-order
+55.0%; +26.3% at `--config.quantize.iters=200`, 1,049 s).
"""

from configs.base import base_config, entry, select

CALIB_WINDOWS = 8

ENTRIES = (
    entry("fp32", "evaluate"),
    entry("rtn_w4_g64", "quantize,evaluate", quantize__format="int4_g64"),
    entry("gptq_w4_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True),
    entry("signround_w4_g64", "quantize,evaluate", quantize__method="signround",
          quantize__format="int4_g64"),
    entry("gptq_w3_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int3_g64", quantize__act_order=True),
    entry("signround_w3_g64", "quantize,evaluate", quantize__method="signround",
          quantize__format="int3_g64"),
    entry("signround_q4_0", "quantize,export,llamacpp", quantize__method="signround",
          quantize__format="q4_0"),
    # Rotation first (configs/rotation.py's R1 + R2 Hadamard; the untied head in Q8_0, its
    # bytes counted), then SignRound on the rotated model.
    entry("rot_signround_w4_g64", "rotate,quantize,evaluate", quantize__method="signround",
          quantize__format="int4_g64", quantize__head_format="q8_0"),
    entry("rot_signround_w3_g64", "rotate,quantize,evaluate", quantize__method="signround",
          quantize__format="int3_g64", quantize__head_format="q8_0"),
)


def get_config(arg=None):
  """Learned rounding vs RTN and GPTQ; `arg` (optional) is a comma list of entry names."""
  c = base_config()
  c.name = "learned rounding (SignRound)"
  c.calib.windows = CALIB_WINDOWS
  # One window per calibration batch: SignRound's mini-batch is one calibration batch
  # (GPTQ and RTN sum over all batches: the batch size does not change them).
  c.calib.batch_size = 1
  c.quantize.iters = 80  # per group; the cost is linear in it
  c.quantize.lr = 0.0  # 0: 1 / iters, the paper's
  c.quantize.min_clip = 0.5
  c.quantize.seed = -1  # -1: offsets start at 0 (no random start)
  c.sweep = select(ENTRIES, arg, "configs/rounding.py")
  return c
