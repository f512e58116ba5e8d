"""Calibration on any JAX model: capture the matmuls that read params leaves.

A calibrated method (GPTQ, AWQ, SmoothQuant, static activation ranges,
Wanda, SparseGPT, the importance matrix, the error report) needs, for every
weight it changes, the inputs of the matmuls that read it. This module gets
them from the user's own forward function `fn(params, batch)`, with no model
change and no names: an NNX module (`nnx_apply`), a linen module and its
variables (`linen_apply`), quantjax's own models, or any function of a
params pytree.

The package: `trace.py` (the flat program, sites, layouts), `stats.py` (input
statistics), `parts.py` (the units a method quantizes), `segments.py` (the
compiled pieces between groups), `spill.py` (activations on disk) and
`driver.py` (`calibrate`, `collect_stats`). The protocol a method follows is
`quantjax.methods.base.CalibratedMethod`.

How (`trace`):

1. `jax.make_jaxpr(fn)(params, batch)` records the computation once.
   Nested `jit`s, `remat`/`checkpoint`, `custom_jvp` / `custom_vjp` calls are
   inlined, and every `lax.scan` that reads params (`nn.scan`, `nnx.scan`,
   scanned layers with stacked weights `[L, ...]`) is unrolled, so the flat
   program has one equation per operation of every layer.
2. Dataflow marks each `dot_general` and `conv_general_dilated` one of whose
   operands is a params leaf reached only through layout operations
   (`astype`, transpose, reshape, slicing, sharding constraints) and the
   other depends on the batch: a *site*. Applying the same layout operations
   to an array of element indices tells, exactly, which leaf element each
   operand element is: that gives the weight's contraction axes, its output
   axes, and for stacked weights the slice (layer) a site reads. Each weight
   (or slice) is then seen as a matrix `[K, N]` (contraction axes in the
   leaf's axis order, then output axes) and each site's input as features
   `[T, K]` in the same order; methods work on those.
3. Sites whose input is the same value (after value-preserving reshapes and
   casts) form a *group*: q/k/v read one normed input, gate/up another.

Calibration (`calibrate`) then cuts the flat program at the first site of
each group that a rule targets. *Sequential* mode runs segment n for every
calibration batch, with the weights of groups before n already replaced by
their quantized values (and the activation quantization of their sites
applied), accumulates the statistics of group n's inputs inside the same
compiled call, quantizes group n, and carries the segment's live values on:
each equation runs once per batch, so the cost is one forward pass plus the
statistics, linear in depth. Segments are compiled once per distinct
structure (identical layers share one executable). *One-pass* mode takes all
statistics from the float model (the quantized weights are not fed forward),
batch by batch. Nothing after the last targeted group is run.

A method with `wants_block = True` (SignRound) is handed, with each group's
parts, the group's `Block` (`part.block`): the span of the program from the
group's first matmul to the next group boundary as a differentiable function
of its inputs and weights, its inputs from the quantized prefix, and the
float model's values at its end, taken from a second chain of live values
run with the float weights (one more forward of each segment).

Trade-offs of the jaxpr route, against patching `jax.lax.dot_general` during a
call (Qwix's interception): it sees every matmul, including `jnp.einsum`,
`x @ w`, stock Flax layers and calls inside jitted or scanned code, with
exact knowledge of which leaf an operand is (no identity heuristics), and it
is what makes error-propagating sequential calibration possible without
re-running the model per group. Its costs: it relies on `jax.extend.core`
(the jaxpr data structures), weights used inside `lax.cond` / `while_loop`
bodies are not seen (a targeted weight used only there is reported), and the
calibration batches must all have one shape (the program is traced once).

References:
  Frantar et al. GPTQ, ICLR 2023, arXiv:2210.17323 (sequential quantization
  with inputs from the quantized prefix). llm-compressor's sequential
  pipeline and Qwix's interception-based calibration are the designs this
  combines (see docs/design.md).
"""


from quantjax.methods.capture.driver import (CalibrationResult, MemoryOptions, calibrate,
                                             collect_stats, effective_weight, tree_from_parts)
from quantjax.methods.capture.parts import Block, Part
from quantjax.methods.capture.stats import STAT_KINDS, InputStats
from quantjax.methods.capture.trace import Capture, Layout, Site, linen_apply, nnx_apply, trace

__all__ = ["Site", "Layout", "Capture", "InputStats", "Part", "trace", "calibrate",
           "collect_stats", "nnx_apply", "linen_apply", "CalibrationResult", "STAT_KINDS",
           "tree_from_parts", "effective_weight", "MemoryOptions", "Block"]
