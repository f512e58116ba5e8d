"""The Gemma 3 text decoder: a preset of the shared decoder (`quantjax.models.decoder`).

What sets Gemma 3 apart from a Llama, each a switch of the decoder that
`Gemma3Config.switches()` turns on:

* RMSNorm with a `(1 + w)` multiplier, before *and after* each sublayer
  (`input_norm` -> attention -> `post_attn_norm` -> residual; `pre_mlp_norm`
  -> MLP -> `post_mlp_norm` -> residual), and RMSNorms on each query and key
  head (QK-norm) before RoPE;
* a GeGLU MLP with the tanh approximation of GELU;
* token embeddings multiplied by `sqrt(d)`, the factor rounded to the
  embedding's dtype first (as transformers and the reference JAX code do:
  25.25 rather than 25.298 for d = 640 in bfloat16);
* sliding-window layers (a query sees the `sliding_window` most recent keys,
  itself included) interleaved with global layers (5:1 by default), each kind
  with its own RoPE base (10,000 local, 1,000,000 global, optionally with
  linear RoPE scaling on the global layers);
* attention scores scaled by `query_pre_attn_scalar ** -0.5` (not
  `head_dim ** -0.5`), optional tanh soft-capping of the attention scores and
  of the final logits;
* a tied output head (the embedding), untied supported.

Norm weights are stored as the multiplier itself, `scale = 1 + w` (what GGUF
files hold; `load_hf` adds the 1 to transformers' `w`). The arithmetic is the
same as transformers' (`normalize(x) * (1.0 + w)` in float32) and it keeps
every norm an ordinary per-channel scale, so folding AWQ / SmoothQuant input
scales into it (`methods.fold_input_scales`) is an exact division, with no
Gemma-specific code in the methods.

Parameter paths (kernels `[in, out]`, as in `quantjax.models.llama`):

    embed/embedding                              [vocab, d]
    layers/{i}/input_norm/scale                  [d]
    layers/{i}/attn/{q,k,v,o}_proj/kernel
    layers/{i}/attn/{q,k}_norm/scale             [head_dim]
    layers/{i}/post_attn_norm/scale              [d]   (on the attention output)
    layers/{i}/pre_mlp_norm/scale                [d]
    layers/{i}/mlp/{gate,up,down}_proj/kernel
    layers/{i}/post_mlp_norm/scale               [d]   (on the MLP output)
    final_norm/scale                             [d]
    lm_head/kernel                               [d, vocab]   (untied only)

The model (`Gemma3`, the decoder's `CausalLM`) and the functional surface
(`forward(config, params, tokens)`, `token_nll`, `init_cache`, `generate`,
`forward_fn`, `loss_fn`, `fold_groups`, `foldable`, `as_state`, ...) are the
decoder's, the same functions as `quantjax.models.llama`'s, so the experiment
runner, the generic calibration (`quantjax.methods.calibrate`) and the
partition rules of `quantjax.distributed` take either model.

`ARCHITECTURE` is the family as the file formats see it (data, registered with
`quantjax.io.architecture`): the Hugging Face names and `config.json` map
(`Gemma3ForCausalLM`, `model_type` gemma3_text; norms stored as `w`), llama.cpp's
`gemma3` tensor names (no Q/K permutation), the head-dimension checks of a GGUF
file (`check_gguf_shapes`) and the settings llama.cpp cannot represent
(`check_gguf_exportable`).

References:
  Gemma Team, "Gemma 3 Technical Report", arXiv:2503.19786 (2025).
  Hugging Face transformers `Gemma3ForCausalLM` (the parity oracle) and
  llama.cpp's `gemma3` architecture (the export target).

The configuration (`Gemma3Config`, `SLIDING` / `GLOBAL` layer types,
`default_layer_types`) is in `quantjax.models.gemma3_config`, importable from here.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from quantjax.io import architecture as architecture_lib
from quantjax.io.gguf_read import GGUFError
from quantjax.io.hf import HFArchitecture, TensorSpec, decoder_tensors
from quantjax.methods.rotation import HeadRotation, RotationTable
from quantjax.models import decoder as decoder_lib
from quantjax.models import llama as llama_lib
from quantjax.models.gemma3_config import GLOBAL, SLIDING, Gemma3Config, default_layer_types

__all__ = [
    "ARCHITECTURE",
    "AWQ_NO_CLIP",
    "GGUF_LAYER_NAMES",
    "GGUF_TOP_NAMES",
    "GLOBAL",
    "Gemma3",
    "Gemma3Cache",
    "Gemma3Config",
    "PROJ_KERNELS",
    "SLIDING",
    "abstract_state",
    "as_state",
    "cached_step",
    "check_gguf_exportable",
    "check_gguf_shapes",
    "decoder",
    "forward_fn",
    "fold_groups",
    "foldable",
    "forward",
    "rotation_table",
    "generate",
    "graphdef",
    "init_cache",
    "loss_fn",
    "model_from_params",
    "token_nll",
    "window_nll_fn",
]

PROJ_KERNELS = llama_lib.PROJ_KERNELS
AWQ_NO_CLIP = llama_lib.AWQ_NO_CLIP


# ----------------------------------------------------------------------------
# The model and its functional API: the shared decoder with this preset.

Gemma3 = decoder_lib.CausalLM
Gemma3Cache = decoder_lib.KVCache
graphdef, abstract_state, as_state, model_from_params = (
    decoder_lib.graphdef, decoder_lib.abstract_state, decoder_lib.as_state,
    decoder_lib.model_from_params)
forward, init_cache, step, generate, decoder = (
    decoder_lib.forward, decoder_lib.init_cache, decoder_lib.step, decoder_lib.generate,
    decoder_lib.decoder)
cached_step = decoder_lib.cached_step
token_nll, window_nll_fn, forward_fn = (decoder_lib.token_nll, decoder_lib.window_nll_fn,
                                        decoder_lib.forward_fn)
fold_groups, foldable = decoder_lib.fold_groups, decoder_lib.foldable


def loss_fn(config: Gemma3Config, *, rows: int = 512):
  """`loss(params, tokens) -> mean next-token NLL` (float32), e.g. for
  `methods.mixed.fisher_diagonal`; the head runs `rows` positions at a time (Gemma's
  262,144-entry vocabulary makes whole logits large)."""
  return decoder_lib.loss_fn(config, rows=rows)


GEMMA3_NO_R1 = (
    "Gemma 3 normalizes what each sublayer adds to the residual stream (post_attn_norm, "
    "post_mlp_norm: x + normalize(y) * (1 + s)). A residual rotation R would have to pass "
    "through that elementwise scale, and diag(1 + s) R != R diag(1 + s) unless s is uniform; "
    "the scale cannot fold into o_proj / down_proj either, because the norm's division by "
    "the RMS of y sits between them. So R1 is not function-preserving for Gemma 3 (q/k "
    "rotations are blocked the same way by the QK-norms); R2 (values / attention output "
    "per head) is, since v has no norm.")


def rotation_table(config: Gemma3Config, *, prefix: str = "layers"):
  """The rotations Gemma 3 allows, for `methods.rotation.rotate`: R2 only
  (`GEMMA3_NO_R1` says why not R1)."""
  heads = HeadRotation(
      pairs=tuple((f"{prefix}/{i}/attn/v_proj/kernel", f"{prefix}/{i}/attn/o_proj/kernel")
                  for i in range(config.num_layers)),
      head_dim=config.head_dim, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
  return RotationTable(None, heads, why_not=GEMMA3_NO_R1)


# ----------------------------------------------------------------------------
# The architecture record: what the file formats (`quantjax.io`) know of the family.


def _hf_config(cfg: Gemma3Config) -> dict:
  """`config.json` of a `Gemma3ForCausalLM` (`gemma3_text`; no quantization_config)."""
  full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor != 1.0:
    full = {"rope_type": "linear", "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling_factor}
  d = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
      "rope_parameters": {GLOBAL: full,
                          SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
      # transformers' config class types it int; keep a fractional value as it is
      "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar)
                                if float(cfg.query_pre_attn_scalar).is_integer()
                                else cfg.query_pre_attn_scalar),
      "final_logit_softcapping": cfg.final_logit_softcapping,
      "attn_logit_softcapping": cfg.attn_logit_softcapping,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
  }
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if getattr(cfg, k) is not None:
      d[k] = int(getattr(cfg, k))
  return d


def _hf_tensors(cfg: Gemma3Config) -> list[TensorSpec]:
  """Gemma 3's checkpoint names. quantjax keeps each RMSNorm weight as the multiplier
  `1 + w`; checkpoints store `w`."""
  d, hd = cfg.hidden_size, cfg.head_dim
  return decoder_tensors(
      cfg, ([("input_layernorm.weight", ("input_norm", "scale"), d)],
            [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), hd),
             ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), hd),
             ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), d),
             ("pre_feedforward_layernorm.weight", ("pre_mlp_norm", "scale"), d)],
            [("post_feedforward_layernorm.weight", ("post_mlp_norm", "scale"), d)]),
      norm_offset=1.0)


# llama.cpp's `gemma3` tensor names -> params paths: no Q/K row permutation (NEOX-style
# RoPE), and norm weights stored as the multiplier 1 + w, which is what quantjax keeps.
GGUF_LAYER_NAMES = {
    "attn_norm.weight": ("input_norm", "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "attn_q_norm.weight": ("attn", "q_norm", "scale"),
    "attn_k_norm.weight": ("attn", "k_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"),
    "ffn_norm.weight": ("pre_mlp_norm", "scale"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
    "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
}
GGUF_TOP_NAMES = llama_lib.GGUF_TOP_NAMES


def _gguf_metadata(cfg: Gemma3Config, w, gguf) -> None:
  """llama.cpp's "gemma3" keys beyond the common ones (`GGUFNames.write_metadata`)."""
  w.add_key_length(int(cfg.head_dim))
  w.add_value_length(int(cfg.head_dim))
  if cfg.sliding_window is not None:
    w.add_sliding_window(int(cfg.sliding_window))
  if cfg.final_logit_softcapping is not None:
    w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
  if cfg.rope_scaling_factor != 1.0:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(cfg.rope_scaling_factor))


def _config_from_gguf(meta: Mapping[str, Any], vocab_size: int, tie_embeddings: bool,
                      source: str) -> Gemma3Config:
  try:
    return Gemma3Config.from_gguf_metadata(meta, vocab_size=vocab_size,
                                           tie_embeddings=tie_embeddings, source=source)
  except ValueError as e:
    raise GGUFError(str(e) if source in str(e) else f"{source}: {e}") from None


def check_gguf_shapes(config: Gemma3Config, shapes: Mapping[str, tuple], source: str) -> None:
  """Head-dimension checks of a GGUF file's tensors that name the tensor and the metadata
  keys involved (`shapes`: tensor name -> row-major shape, `[out, in]`)."""
  h, hk, hd = config.num_heads, config.num_kv_heads, config.head_dim
  fields = ("gemma3.attention.head_count", "gemma3.attention.head_count_kv",
            "gemma3.attention.key_length")
  names = {"q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
           "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight",
           "qn": "blk.{i}.attn_q_norm.weight", "kn": "blk.{i}.attn_k_norm.weight"}
  want = {"q": (0, h, fields[0]), "k": (0, hk, fields[1]), "v": (0, hk, fields[1]),
          "o": (1, h, fields[0]), "qn": (0, 1, None), "kn": (0, 1, None)}
  for i in range(config.num_layers):
    for key, (axis, n, field) in want.items():
      name = names[key].format(i=i)
      if name not in shapes:
        continue  # reported as missing by the caller
      got = int(shapes[name][axis])
      if got != n * hd:
        how = (f"{field} ({n}) x {fields[2]} ({hd}) = {n * hd}" if field else
               f"{fields[2]} = {hd}")
        raise GGUFError(f"{source}: inconsistent head dimension: tensor {name!r} has shape "
                        f"{tuple(shapes[name])} (size {got} on axis {axis}) but {how}")


def check_gguf_exportable(config: Gemma3Config) -> None:
  """llama.cpp's `gemma3` hard-codes some settings; refuse (GGUFError) configs it would
  misread."""
  problems = []
  if config.sliding_window is not None and config.layer_types != default_layer_types(
      config.num_layers):
    problems.append(f"layer_types {config.layer_types} (llama.cpp makes every sixth layer "
                    "global)")
  if config.rope_local_theta != 10_000.0:
    problems.append(f"rope_local_theta={config.rope_local_theta} (llama.cpp uses 10000)")
  want = (config.hidden_size // config.num_heads if config.num_layers == 62 else
          config.head_dim)
  if float(config.query_pre_attn_scalar) != float(want):
    problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp uses "
                    f"{want} for a {config.num_layers}-layer model)")
  if config.attn_logit_softcapping is not None:
    problems.append(f"attn_logit_softcapping={config.attn_logit_softcapping} (llama.cpp's gemma3 "
                    "has none)")
  if problems:
    raise GGUFError("this Gemma3Config cannot be exported for llama.cpp: " + "; ".join(problems))


ARCHITECTURE = architecture_lib.Architecture(
    name="gemma3", config_type=Gemma3Config, model=Gemma3, module=sys.modules[__name__],
    abstract_state=abstract_state,
    as_state=as_state,
    hf=HFArchitecture(
        model_types=("gemma3_text",), hf_class="Gemma3ForCausalLM",
        to_hf_config=_hf_config,
        from_hf_config=lambda d, name, source: Gemma3Config.from_hf(d, name=name, source=source),
        tensors=_hf_tensors,
        ignorable=(r".*rotary_emb.*inv_freq", r"lm_head\.weight")),
    gguf=architecture_lib.GGUFNames(
        arch="gemma3", layer=GGUF_LAYER_NAMES, top=GGUF_TOP_NAMES,
        config_from_metadata=_config_from_gguf, ignored=llama_lib.GGUF_IGNORED_NAMES,
        check_shapes=check_gguf_shapes, check_exportable=check_gguf_exportable,
        write_metadata=_gguf_metadata),
    fold_groups=fold_groups, rotation_table=rotation_table)
architecture_lib.register(ARCHITECTURE)
