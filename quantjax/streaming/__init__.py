"""Compress models larger than memory: one decoder layer at a time, disk to disk.

`compress_streaming(source, output, batches, rules, method)` reads a Llama-family
Hugging Face directory (`config.json` and F32 / BF16 / F16 safetensors, one
file or shards with `model.safetensors.index.json`) or a Llama-family GGUF file
(memory-mapped; each tensor dequantized to float32 when its layer is read, as
`models.load.load_gguf` dequantizes it (`io.gguf_dequant`), Q/K rows back in Hugging Face's order;
the embedding's calibration rows and the copies of the embedding, norm and head
read by rows, so a quantized vocabulary is never dequantized whole) and writes the quantized
model as a Hugging Face compressed-tensors directory (the layout `io.hf.export_hf`
writes, one safetensors shard per decoder layer) or as one GGUF file (the
bytes `io.gguf.export_gguf` writes), holding at most one layer in memory:

1. Every header is checked first (a missing tensor, a wrong shape, a shard
   whose dtype differs from `config.json`'s, unknown extra tensors: an
   `HFFormatError` naming the file and the tensor; for GGUF the checks of
   `io.gguf_read`, a `GGUFError`), before any work.
2. The calibration hidden states start as the embedding rows of the
   calibration tokens, gathered from a memory map (only those rows are read).
3. For each layer: its tensors are read from disk (a copy per tensor, no map
   left open; BF16 / F16 stay in their dtype and are cast to float32 inside
   the forward's computation and by the method), the method runs
   on it through the ordinary calibration driver (`methods.calibrate`,
   sequential mode) with the layer's own forward taken from the model code
   (`models.decoder.Block`), the quantized tensors are encoded exactly as
   `export_hf` encodes them and written as one shard, and the layer's output
   hidden states, computed with the quantized weights, become the next
   layer's inputs (GPTQ's sequential recipe: every layer is calibrated on the
   outputs of the already-quantized layers before it, as llm-compressor's
   sequential pipeline does). The layer is then released.
4. The embedding, final norm and untied head are copied in row blocks; the
   shards, index, `config.json` and report are committed atomically as one
   directory (`io.atomic.atomic_dir`), or the GGUF file is assembled from the
   finished layers (memory maps) and renamed into place: the output is
   complete or absent, and an earlier output is kept until the new one is
   complete.

Across processes (`jax.distributed`): the calibration batches are dealt out,
each process carries its own batches' hidden states, XLA sums the statistics
across processes, and every process continues with process 0's layer (see
`compress_streaming`).

Resume: finished layer shards, the hidden states at the last layer boundary
and a manifest live in a work directory beside the output, each written
atomically. The manifest is keyed by everything the result depends on
(source files, config, rules, method, calibration tokens, output dtype,
versions); a run that finds a matching manifest continues after the last
finished layer and gives the same bytes as an uninterrupted run.

Memory: one layer's weights in their stored dtype (BF16 stays BF16; each
projection's array is freed once its result replaces it, via
`MemoryOptions(donate=True)`) and the float32 effective (dequantized) weights of
its finished parts (`MemoryOptions(stand_in_dtype=float32)`: exactly the values a
float32 copy of the model would compute with), the method's statistics and
working copies (for GPTQ the largest Hessian: its `K x K` float32 statistic,
dropped once GPTQ has its own copy, and that copy, solved in place, which the
column loop reads without a further copy for a float32 solve), plus the
calibration activations: `n_tokens x d` float32 between layers, and within a
layer the driver's stacks of each segment's activations over all batches.
With `activation_limit`, stacks above the limit live in files of the work
directory instead and the layer runs one batch at a time, so memory holds
one batch's activations. Freed heap pages are returned to the OS after each
layer. The peak is independent of the number of layers.

Modules: `source` (the checked source, `check_source`), `files` (the manifest,
work directory, shard and carried-activation writers, GGUF output plan), `driver`
(`compress_streaming`: the layer loop, resume, commit).

References:
  Frantar et al., GPTQ, ICLR 2023, arXiv:2210.17323 (layer-by-layer
  quantization on the quantized prefix's outputs). llm-compressor,
  `pipelines/sequential` (one decoder layer at a time, activations carried
  between layers). Hugging Face safetensors sharding
  (`model.safetensors.index.json`); compressed-tensors 0.19 (see `io/hf/`).
"""


from quantjax.streaming.driver import StreamResult, compress_streaming
from quantjax.streaming.files import MANIFEST
from quantjax.streaming.source import check_source

__all__ = ["MANIFEST", "StreamResult", "compress_streaming", "check_source"]
