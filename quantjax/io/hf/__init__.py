"""Hugging Face model directories and compressed-tensors, out and in.

A Hugging Face model directory holds `config.json`, the tokenizer files and
`model.safetensors` (or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` mapping each tensor to its shard). Quantized
checkpoints in the format that llm-compressor writes and vLLM, SGLang and
transformers load add a `quantization_config` with `quant_method:
"compressed-tensors"` to `config.json`: config groups (a scheme of weight and
input-activation arguments plus a storage `format`, and the modules it
targets) and an `ignore` list. Per quantized Linear module `m` (weights
`[out, in]`, PyTorch's layout):

=================  ============================================================
format             tensors of module `m`
=================  ============================================================
pack-quantized     `m.weight_packed` int32 `[out, ceil(in*b/32)]`: signed b-bit
(W4A16, W8A16)     codes offset by 2^(b-1), densely packed, code `i` of a row at
                   bits `i*b` of the little-endian int32 stream;
                   `m.weight_shape` int64 `[2]`; `m.weight_scale` `[out,
                   in/g]` (group), `[out, 1]` (channel) or `[1]` (tensor);
                   asymmetric: `m.weight_zero_point`, signed codes packed the
                   same way along `out` (int32 `[ceil(out*b/32), in/g]`).
                   x = (q - z) * s.
int-quantized      `m.weight` int8 codes `[out, in]`, `m.weight_scale`,
(W8A8 int8)        `m.weight_zero_point` int8 when asymmetric; activations
                   quantized at run time per token (dynamic) or with a static
                   per-tensor `m.input_scale` `[1]` (and `m.input_zero_point`).
float-quantized    `m.weight` float8_e4m3fn `[out, in]`, `m.weight_scale`;
(W8A8 FP8)         activations as for int-quantized, in FP8 E4M3.
naive-quantized    weight-only codes stored unpacked (FP8 W8A16 here).
mxfp4-pack-        `m.weight_packed` uint8 `[out, in/2]`: FP4 E2M1 nibbles
quantized          (sign bit 3, magnitude 0, .5, 1, 1.5, 2, 3, 4, 6), element
                   2j low; `m.weight_scale` uint8 `[out, in/32]`: E8M0
                   exponents, scale 2^(e-127). x = fp4 * s.
nvfp4-pack-        `m.weight_packed` as MXFP4; `m.weight_scale` float8_e4m3fn
quantized          `[out, in/16]`; `m.weight_global_scale` float32 `[1]`.
                   x = fp4 * s / global (ours write global = 1: our NVFP4
                   scales are final, as in llama.cpp's NVFP4).
dense              `m.weight` in the model dtype.
=================  ============================================================

`export_hf` writes a params tree (arrays, `QArray`, `ActQuantized`,
`StaticActQuantized`) with its config and tokenizer as such a directory.
QArrays whose format *is* a compressed-tensors scheme are written code for
code (group-wise along the contraction axis, per channel or per tensor;
symmetric signed codes or integer zero points, our unsigned codes shifted by
2^(b-1); binary and ternary codes as exact 2-bit codes); anything else (a
GGUF-style float minimum, NF4, FP8 E5M2, groups along the wrong axis) is
re-quantized to the nearest scheme, and the returned report says so per
tensor. 2:4-sparse weights are written dense: compressed-tensors dropped its
sparse compressors after 0.14 and vLLM dropped Sparse24 models (both 2026),
so no servable sparse form remains. Everything is written to a temporary
directory next to the destination and renamed into place; a failed export
leaves nothing behind and never touches an existing directory.

`import_hf` reads such a directory (ours or llm-compressor's) into JAX:
compressed-tensors weights become QArrays holding the checkpoint's own codes,
scales and zero points (no dequantization), activation schemes become
`ActQuantized` / `StaticActQuantized`, plain safetensors directories load as
float arrays. What it reads is checked: an unsupported method, format or
scheme, a missing shard or tensor, shapes that disagree with `config.json`,
a truncated safetensors file: each is an `HFFormatError` naming the file and
tensor.

Architectures are data: each model module's `quantjax.io.architecture.Architecture`
record carries an `HFArchitecture` (the mapping between its params paths and the
checkpoint's tensor names, and the config translation), registered with
`quantjax.io.architecture.register`; `architecture_for` looks it up.

Modules: `scheme` (constants, `HFFormatError`, `TensorSpec`, `HFArchitecture`, `QArgs`,
`Scheme`, `quantization_config`), `packing` (int32 and FP4 packing, QArray <->
compressed-tensors codes and scales), `export` (`export_hf`, `encode_leaf`), `reader`
(`import_hf`, `Checkpoint`, `read_config`); their public names are importable from here.

References:
  compressed-tensors (vLLM project), `compressors/pack_quantized`,
  `compressors/naive_quantized`, `quantization/quant_args.py`,
  `quantization/quant_config.py`, version 0.19.0.
  Hugging Face safetensors and sharded checkpoints
  (`model.safetensors.index.json`).
"""

from quantjax.io.hf.export import ExportReport, TensorExport, encode_leaf, export_hf
from quantjax.io.hf.packing import pack_fp4, pack_int32, unpack_fp4, unpack_int32
from quantjax.io.hf.reader import Checkpoint, import_hf, read_config
from quantjax.io.hf.scheme import (CT_VERSION, INDEX_FILE, QUANT_METHOD, REPORT_FILE,
                                   SINGLE_FILE, HFArchitecture, HFFormatError, QArgs, Scheme,
                                   TensorSpec, architecture_for, decoder_tensors, fused_notes,
                                   quantization_config)

__all__ = [
    "CT_VERSION",
    "Checkpoint",
    "ExportReport",
    "HFArchitecture",
    "HFFormatError",
    "INDEX_FILE",
    "QArgs",
    "QUANT_METHOD",
    "REPORT_FILE",
    "SINGLE_FILE",
    "Scheme",
    "TensorExport",
    "TensorSpec",
    "architecture_for",
    "decoder_tensors",
    "encode_leaf",
    "export_hf",
    "fused_notes",
    "import_hf",
    "pack_fp4",
    "pack_int32",
    "quantization_config",
    "read_config",
    "unpack_fp4",
    "unpack_int32",
]
