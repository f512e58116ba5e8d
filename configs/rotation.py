"""Rotations (QuaRot-style randomized Hadamard R1 + R2) before RTN, GPTQ and AWQ on SmolLM2.

Launch (from the repository root):

    python -m experiments.main --config=configs/rotation.py --workdir=runs/rotation
    python -m experiments.main --config=configs/rotation.py:gemma3 --workdir=runs/rotation_gemma3

`arg` is a comma list of entry names (default: all of `ENTRIES`). Every rotated
entry starts with the stage `rotate` (the model's own rotation table:
`quantjax.models.llama.rotation_table`); the rotation unties SmolLM2's head, so the
rotated rows also quantize `lm_head/kernel` (`quantize.head_format`, Q8_0 here) and
its bytes count in every size. Calibration: the default comparison's 8 windows.

Expected result: docs/methods.md, "Rotations" (the table measured with this config).
"""

from configs.base import base_config, entry, select
from configs.default import CALIB_WINDOWS

HEAD = "q8_0"
LEARN_STEPS = 30  # SpinQuant's Adam steps on the Cayley parameters, 2 windows per step

ENTRIES = (
    entry("fp32", "evaluate"),
    entry("rot_fp32", "rotate,evaluate"),
    entry("rtn_w4_g64", "quantize,evaluate", quantize__format="int4_g64"),
    entry("rot_rtn_w4_g64", "rotate,quantize,evaluate", quantize__format="int4_g64",
          quantize__head_format=HEAD),
    entry("gptq_w4_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True),
    entry("rot_gptq_w4_g64", "rotate,quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True, quantize__head_format=HEAD),
    entry("rot_awq_w4_g64", "rotate,quantize,evaluate", quantize__method="awq",
          quantize__format="int4_g64", quantize__head_format=HEAD),
    entry("rot_rtn_w3_g64", "rotate,quantize,evaluate", quantize__format="int3_g64",
          quantize__head_format=HEAD),
    entry("rot_gptq_w3_g64", "rotate,quantize,evaluate", quantize__method="gptq",
          quantize__format="int3_g64", quantize__act_order=True, quantize__head_format=HEAD),
    entry("spin_rtn_w4_g64", "rotate,quantize,evaluate", rotate__learn_steps=LEARN_STEPS,
          rotate__learn_format="int4_g64", quantize__format="int4_g64",
          quantize__head_format=HEAD),
    entry("spin_gptq_w4_g64", "rotate,quantize,evaluate", rotate__learn_steps=LEARN_STEPS,
          rotate__learn_format="int4_g64", quantize__method="gptq", quantize__format="int4_g64",
          quantize__act_order=True, quantize__head_format=HEAD),
    entry("rot_gptq_q4_0", "rotate,quantize,export,llamacpp", quantize__method="gptq",
          quantize__format="q4_0", quantize__act_order=True, quantize__head_format=HEAD),
    # At llama.cpp's own Q4_0 file size or below: the untied head and the embedding share
    # the 8.5 bits per weight that Q8_0 gives the tied embedding alone (MXFP4 + MXFP4, or
    # IQ4_NL for the head, which GPTQ quantizes, and Q2_0 for the embedding table).
    entry("rot_gptq_q4_0_mxfp4_head_emb", "rotate,quantize,export,llamacpp",
          quantize__method="gptq", quantize__format="q4_0", quantize__act_order=True,
          quantize__head_format="mxfp4", export__types=[("embed/embedding", "MXFP4")]),
    entry("rot_gptq_q4_0_iq4nl_head_q2_emb", "rotate,quantize,export,llamacpp",
          quantize__method="gptq", quantize__format="q4_0", quantize__act_order=True,
          quantize__head_format="iq4_nl", export__types=[("embed/embedding", "Q2_0")]),
    # The same function in llama.cpp: F32 files of the model and of its rotation.
    entry("f32_gguf", "export,llamacpp", export__types=[]),
    entry("rot_f32_gguf", "rotate,export,llamacpp", export__types=[]),
    # rot_gptq_w4_g64 as a compressed-tensors directory (int4 g64 pack-quantized, the
    # untied head int8 g32 as Q8_0), scored by transformers on the same windows.
    entry("rot_gptq_w4_g64_hf", "rotate,quantize,export,transformers", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True, quantize__head_format=HEAD,
          export__format="hf", export__types=[]),
)


# Gemma 3 270M: its table allows R2 only (`quantjax.models.gemma3.GEMMA3_NO_R1`), so the head
# stays tied and nothing else changes size.
GEMMA3_ENTRIES = (
    entry("fp32", "evaluate"),
    entry("rot_fp32", "rotate,evaluate"),
    entry("rtn_w4_g64", "quantize,evaluate", quantize__format="int4_g64"),
    entry("rot_rtn_w4_g64", "rotate,quantize,evaluate", quantize__format="int4_g64"),
    entry("gptq_w4_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True),
    entry("rot_gptq_w4_g64", "rotate,quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True),
)


def get_config(arg=None):
  """Rotation recipes; `arg` (optional) is a comma list of entry names, or `gemma3` (then
  optionally `gemma3:<names>`) for the recipes Gemma 3 270M allows."""
  c = base_config()
  c.name = "rotations"
  c.calib.windows = CALIB_WINDOWS
  if arg and arg.split(":")[0] == "gemma3":
    c.name = "rotations on Gemma 3"
    c.model.source = "gemma3"
    c.rotate.r1 = ""  # Gemma 3's table has no residual rotation
    c.sweep = select(GEMMA3_ENTRIES, arg.partition(":")[2], "configs/rotation.py:gemma3")
    return c
  c.sweep = select(ENTRIES, arg, "configs/rotation.py")
  return c
