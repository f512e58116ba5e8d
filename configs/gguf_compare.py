"""llama.cpp's own quantizers vs quantjax's GGUF encoders, all scored by llama.cpp.

Launch:

    python -m experiments.main --config=configs/gguf_compare.py --workdir=runs/gguf_compare
    # other llama.cpp types / another mix:
    python -m experiments.main --config=configs/gguf_compare.py:Q8_0,Q4_0/Q4_K_M \\
        --workdir=runs/gguf_compare

`arg` is `TYPES[/MIX]`: llama.cpp file types made by llama.cpp's quantizer
from an F32 export of the FP32 model (default `Q8_0,Q6_K,Q5_0,Q4_K_M,Q4_0,
Q3_K_M,Q2_K`), and a type whose per-tensor mix quantjax's encoders reproduce
(default `Q4_K_M`), once as is and once with an importance matrix (mean
squared inputs of every projection over 128 calibration windows) weighting
the k-quant fits and the Q4_0/Q5_0 scale search. Every file, and the F32
source, is scored by llama.cpp on the protocol's windows (and by the JAX
model, importing the file without dequantizing its block types).

Expected result (docs/formats-gguf.md): quantjax's encoders with llama.cpp
Q4_K_M's types about 11.93 (llama.cpp's own: 11.93); with the importance
matrix about 11.54.
"""

from configs.base import base_config, entry

TYPES = ("Q8_0", "Q6_K", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def get_config(arg=None):
  types, _, mix = (arg or "").partition("/")
  types = tuple(t.strip() for t in types.split(",") if t.strip()) or TYPES
  mix = mix.strip() or "Q4_K_M"
  c = base_config()
  c.name = "GGUF files scored by llama.cpp"
  c.llamacpp.jax = True
  c.export.importance_windows = 0
  c.sweep = [entry("fp32", "evaluate"),
             entry("llamacpp_f32", "export,llamacpp", export__types=[])] + [
      entry(f"llamacpp_{t.lower()}", "export,llamacpp", export__llamacpp_quantize=t)
      for t in types] + [
      entry(f"quantjax_{mix.lower()}_mix", "export,llamacpp", export__types_from=mix,
            export__types=[]),
      entry(f"quantjax_{mix.lower()}_mix_imatrix", "export,llamacpp", export__types_from=mix,
            export__types=[], export__importance_windows=128)]
  return c
