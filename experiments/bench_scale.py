"""Streaming GPTQ on Llama-shaped models larger than a layer: memory and time per layer.

    python -m experiments.bench_scale --shape 1b --out runs/bench_scale
    python -m experiments.bench_scale --shape 8b --layers 4 --out runs/bench_scale

Writes a random Llama-shaped BF16 model (safetensors, one shard per layer,
`config.json` with `torch_dtype: bfloat16`) to a temporary directory in a
child process, then compresses it with `quantjax.compress_streaming`: GPTQ,
every projection in `--format` (default W4 group 128, symmetric), on
`--windows` random windows of `--seq` tokens. Reports the peak resident
memory of the compression (Linux VmHWM, the process's own RSS with the JAX
runtime included; the runtime's RSS before the call is given beside it), its
ratio to the model's BF16 size, seconds per layer (first layer, with its
compiles, apart), the output's size, and checks that the output loads in the
JAX model (`io.hf.import_hf`) and decodes a few tokens. Appends a row to
`<out>/bench_scale.json` and rewrites `<out>/bench_scale.md` (atomically), with
an estimate for Llama-3-70B from `quantjax.eval.plan`'s shape.

Shapes: Llama-3.2-1B (16 layers, d 2048, FFN 8192, 32/8 heads, tied),
Llama-3.2-3B (28 layers, d 3072, FFN 8192, 24/8 heads, tied), Llama-3-8B
(32 layers, d 4096, FFN 14336, 32/8 heads, untied); vocab 128256; plain RoPE
(Llama 3.x's rope scaling does not change any shape or cost). `--layers N`
truncates to N layers for a quicker run; the table says so. The temporary
files are deleted at the end (unless `--keep`). Run it alone:
`flock /tmp/quantjax-heavy.lock python -m experiments.bench_scale ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = {
    # name, vocab, d, ffn, layers, heads, kv_heads, head_dim, tied
    "1b": ("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, 64, True),
    "3b": ("Llama-3.2-3B", 128256, 3072, 8192, 28, 24, 8, 128, True),
    "8b": ("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 128, False),
}


def _shape(key: str):
  from quantjax.eval import plan
  return plan.ModelShape(*SHAPES[key])


def _hf_config(m, layers: int) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "_name_or_path": f"random-{m.name}", "vocab_size": m.vocab, "hidden_size": m.d,
          "intermediate_size": m.hidden, "num_hidden_layers": layers,
          "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
          "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": 8192,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": m.tied,
          "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
          "bos_token_id": 128000, "eos_token_id": 128001}


def write_model(directory: str, key: str, layers: int, seed: int = 0) -> int:
  """Writes the random BF16 model; returns its tensor bytes. Row blocks keep memory small."""
  import ml_dtypes

  from quantjax.io import safetensors as st
  m = _shape(key)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)

  def normal(shape, std):
    rows = max(1, (1 << 24) // int(np.prod(shape[1:])))
    for r in range(0, shape[0], rows):
      n = min(rows, shape[0] - r)
      yield (rng.standard_normal((n,) + tuple(shape[1:]), np.float32) * std).astype(bf16)

  def ones(shape):
    yield np.ones(shape, bf16)

  q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
  shards = [("model.embed_tokens.weight", (m.vocab, m.d), "n"), ("model.norm.weight", (m.d,), "1")]
  if not m.tied:
    shards.append(("lm_head.weight", (m.vocab, m.d), "n"))
  files = [shards]
  for i in range(layers):
    p = f"model.layers.{i}."
    files.append([(p + "input_layernorm.weight", (m.d,), "1"),
                  (p + "self_attn.q_proj.weight", (q, m.d), "n"),
                  (p + "self_attn.k_proj.weight", (kv, m.d), "n"),
                  (p + "self_attn.v_proj.weight", (kv, m.d), "n"),
                  (p + "self_attn.o_proj.weight", (m.d, q), "n"),
                  (p + "post_attention_layernorm.weight", (m.d,), "1"),
                  (p + "mlp.gate_proj.weight", (m.hidden, m.d), "n"),
                  (p + "mlp.up_proj.weight", (m.hidden, m.d), "n"),
                  (p + "mlp.down_proj.weight", (m.d, m.hidden), "n")])
  weight_map, total = {}, 0
  for k, tensors in enumerate(files):
    fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
    entries = {}
    for name, shape, kind in tensors:
      std = 1.0 / np.sqrt(shape[-1])  # unit-variance outputs: activations stay O(1)
      entries[name] = (bf16, shape, ones(shape) if kind == "1" else normal(shape, std))
      weight_map[name] = fname
      total += int(np.prod(shape)) * 2
    st.write_safetensors_chunks(os.path.join(directory, fname), entries, {"format": "pt"})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(_hf_config(m, layers), f, indent=1)
  return total


def _gib(b) -> str:
  return "n/a" if b is None else f"{b / 2**30:.2f}"


def run(args) -> dict:
  m = _shape(args.shape)
  layers = args.layers or m.layers
  if not 1 <= layers <= m.layers:
    raise SystemExit(f"--layers must be in [1, {m.layers}] for {args.shape}")
  tmp = tempfile.mkdtemp(prefix="quantjax-bench-scale-", dir=args.tmp)
  src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
  try:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.bench_scale", "--write", src,
                    "--shape", args.shape, "--layers", str(layers)], check=True)
    write_s = time.perf_counter() - t0
    src_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))

    import jax

    from quantjax import methods, streaming
    from quantjax.eval import speed
    from quantjax.io import hf
    from quantjax.models import llama
    from quantjax.rules import QuantRule
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, m.vocab, (1, args.seq)).astype(np.int32)
               for _ in range(args.windows)]
    rules = [QuantRule(module_path=llama.PROJ_KERNELS, format=args.format)]
    base_rss = speed.rss_bytes()
    # The float32 solve (the reference's precision) halves the largest Hessian's copy.
    res = streaming.compress_streaming(src, out, batches, rules,
                                       methods.GPTQ(solve_dtype="float32"),
                                       progress=not args.no_progress,
                                       activation_limit=args.activation_limit)
    secs = [r["seconds"] for r in res.layers]
    rest = secs[1:] or secs

    # The output loads in the JAX model and decodes (greedy) a few tokens.
    t1 = time.perf_counter()
    cfg, params, _, info = hf.import_hf(out, tokenizer=False)
    n_q = sum(1 for v in info.values() if v[1] == "qarray")
    prompt = rng.integers(0, m.vocab, (1, 8)).astype(np.int32)
    toks = llama.generate(cfg, params, prompt, 4)
    logits = np.asarray(llama.forward(cfg, params, prompt))
    decode_ok = bool(np.isfinite(logits).all()) and toks.shape == (1, 12)
    load_s = time.perf_counter() - t1
    del params

    full_bf16 = 2 * m.n_params
    row = {
        "shape": args.shape, "model": m.name, "layers": layers, "full_layers": m.layers,
        "truncated": layers < m.layers, "format": args.format, "windows": args.windows,
        "seq": args.seq, "activation_limit": args.activation_limit,
        "spilled_bytes": sum(r["spilled_bytes"] for r in res.layers),
        "source_bytes": src_bytes, "full_bf16_bytes": full_bf16,
        "peak_rss_bytes": res.peak_rss_bytes, "runtime_rss_before_bytes": base_rss,
        "peak_over_source": res.peak_rss_bytes / src_bytes if res.peak_rss_bytes else None,
        "peak_over_full_bf16": res.peak_rss_bytes / full_bf16 if res.peak_rss_bytes else None,
        "first_layer_s": secs[0], "median_layer_s": float(np.median(rest)),
        "layer_s": secs, "layer_peak_rss_bytes": [r["peak_rss_bytes"] for r in res.layers],
        "compress_s": res.seconds, "write_source_s": write_s, "output_bytes": res.output_bytes,
        "quantized_modules": n_q, "decoded_tokens": toks[0, 8:].tolist(),
        "decode_ok": decode_ok, "load_decode_s": load_s,
        "jax": jax.__version__, "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return row
  finally:
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)


def _act_bytes(r: dict) -> int:
  """The float32 hidden states of the calibration set at a layer boundary."""
  return 4 * r["windows"] * r["seq"] * _shape(r["shape"]).d


def _spill(r: dict) -> str:
  lim = r.get("activation_limit")
  if lim is None:
    return "no (in memory)"
  return f"above {lim / 2**20:.0f} MiB: {_gib(r.get('spilled_bytes', 0))} GiB written"


def _estimate_70b(rows: list[dict]) -> list[str]:
  """Llama-3-70B from quantjax.eval.plan's shape, scaled from the largest measured shape."""
  from quantjax.eval import plan
  m70 = plan.MODELS["llama3-70b"]
  # The largest layer measured with the default calibration set, in memory; the deepest run.
  default = [r for r in rows if r.get("activation_limit") is None] or rows
  big = max(default, key=lambda r: (_shape(r["shape"]).linear_params / _shape(r["shape"]).layers,
                                    r["layers"], -r["windows"] * r["seq"]))
  mb = _shape(big["shape"])
  per_layer = m70.linear_params / m70.layers
  ratio = per_layer / (mb.linear_params / mb.layers)
  # What grows with the layer: its weights (stored + float32) and the largest Hessian
  # (float32 statistic, float64 Cholesky copies): scale the measured growth above the
  # runtime's own RSS by the larger of the two ratios.
  h_ratio = (max(m70.d, m70.hidden) / max(mb.d, mb.hidden)) ** 2
  grow = (big["peak_rss_bytes"] - big["runtime_rss_before_bytes"]) * max(ratio, h_ratio)
  peak = big["runtime_rss_before_bytes"] + grow
  p = plan.plan("llama3-70b", big["format"], "data=1", "cpu-24gb",
                calib_samples=big["windows"], calib_seq=big["seq"])
  return [
      f"| {m70.name} (estimate) | {m70.layers} | {_gib(2 * m70.n_params)} | ~{_gib(peak)} | "
      f"~{peak / (2 * m70.n_params):.3f} | {big['windows']} x {big['seq']} | | | "
      f"~{big['median_layer_s'] * ratio:.0f} | "
      f"~{big['median_layer_s'] * ratio * m70.layers / 3600:.1f} h | "
      f"~{_gib(big['output_bytes'] / mb.n_params * m70.n_params)} | |",
      "",
      f"70B estimate: scaled from the {big['model']} run ({big['layers']} layers): seconds per "
      f"layer x {ratio:.2f} (linear parameters per layer), the memory grown above the runtime "
      f"x {max(ratio, h_ratio):.2f} (the larger of the layer-size and Hessian-size ratios). "
      f"`quantjax.eval.plan` puts in-memory GPTQ of the same model at {_gib(p.gptq)} GiB "
      f"(the quantized model {_gib(p.store)} GiB held, plus one FP32 layer, its Hessian and the "
      "calibration activations); streaming holds no model.",
  ]


def table(rows: list[dict]) -> str:
  lines = [
      "| model | layers | BF16 file GiB (full model) | peak RSS GiB (runtime before) | "
      "peak / full model's BF16 | calibration tokens (hidden states) | "
      "activations on disk | first layer s | s / layer (median) | compress total | "
      "output GiB | loads + decodes |",
      "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
  for r in rows:
    lay = f"{r['layers']} of {r['full_layers']} (truncated)" if r["truncated"] else \
        str(r["layers"])
    lines.append(
        f"| {r['model']} | {lay} | {_gib(r['source_bytes'])} ({_gib(r['full_bf16_bytes'])}) | "
        f"{_gib(r['peak_rss_bytes'])} ({_gib(r['runtime_rss_before_bytes'])}) | "
        f"{r['peak_over_full_bf16']:.3f} | "
        f"{r['windows']} x {r['seq']} ({_act_bytes(r) / 2**20:.0f} MiB) | {_spill(r)} | "
        f"{r['first_layer_s']:.1f} | {r['median_layer_s']:.1f} | {r['compress_s']:.0f} s | "
        f"{_gib(r['output_bytes'])} | {'yes' if r['decode_ok'] else 'NO'} |")
  if rows:
    lines += _estimate_70b(rows)
  r0 = rows[-1] if rows else {}
  lines += ["", f"GPTQ {r0.get('format')} (float32 solve) on random token windows (the "
            "calibration column: windows x tokens, and the float32 hidden states they make at a "
            "layer boundary); random BF16 weights; "
            f"{r0.get('device')}, "
            f"{r0.get('cpus')} CPUs, jax {r0.get('jax')}. Peak RSS: the process's VmHWM during "
            "`compress_streaming` (JAX runtime included). A truncated run has the full model's "
            "layer shapes, embedding and head, fewer layers: its peak is the full model's (it "
            "does not grow with depth), so its ratio is given to the full model's BF16 size; "
            "its time is per layer."]
  return "\n".join(lines)


def _bytes(text: str) -> int:
  mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
  return int(float(text[:-1] if mult > 1 else text) * mult)


def _key(r: dict) -> tuple:
  return (r["shape"], r["layers"], r["windows"], r["seq"], r.get("activation_limit"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
  ap.add_argument("--layers", type=int, default=None, help="truncate to N layers")
  ap.add_argument("--windows", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--format", default="int4_g128")
  ap.add_argument("--activation_limit", type=_bytes, default=None,
                  help="compress_streaming's activation_limit (bytes; K/M/G suffixes)")
  ap.add_argument("--out", default="runs/bench_scale")
  ap.add_argument("--tmp", default=None, help="where the temporary model goes")
  ap.add_argument("--keep", action="store_true", help="keep the temporary files")
  ap.add_argument("--no_progress", action="store_true")
  ap.add_argument("--write", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.write:
    write_model(args.write, args.shape, args.layers or SHAPES[args.shape][4])
    return 0
  row = run(args)
  from quantjax.io import atomic
  os.makedirs(args.out, exist_ok=True)
  jpath = os.path.join(args.out, "bench_scale.json")
  rows = []
  if os.path.exists(jpath):
    with open(jpath) as f:
      rows = json.load(f)
  rows = [r for r in rows if _key(r) != _key(row)] + [row]
  rows.sort(key=lambda r: (_shape(r["shape"]).n_params, r["layers"], r["windows"] * r["seq"],
                           r.get("activation_limit") is not None))
  with atomic.atomic_write(jpath, "w") as f:
    json.dump(rows, f, indent=1)
  md = table(rows)
  with atomic.atomic_write(os.path.join(args.out, "bench_scale.md"), "w") as f:
    f.write(md + "\n")
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
