"""A corpus of damaged GGUF files, generated from one valid file.

`base_model(tmp)` exports a tiny Llama (2 layers, d=64, a 320-token byte-level
BPE tokenizer so llama.cpp loads it) with one tensor of each of Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q6_K, F16 and F32. `variants(path)` yields
`(name, category, bytes)` for every damage below, made by patching bytes in
place or by re-serializing the parsed file with one thing changed:

  truncate   at every structural boundary (header fields, each key, each
             tensor description, the data section, each tensor's data) and
             inside the largest string array and inside tensors;
  type       each tensor's ggml type id changed to another type (F32, F16, a
             quant type with the same block, an unknown id);
  offset     each tensor's data offset shifted (+-1, +-alignment), pointed at
             the tensor before it (overlap), or past the end;
  length     oversized string / array / name lengths, counts, dimensions;
  meta       edited metadata (head counts, lengths, RoPE base, epsilon,
             alignment, key types, token ids, duplicate keys and names, ...);
  scale      NaN / Inf in one block scale or minimum of each block type;
  value      NaN / Inf in a float tensor value (llama.cpp's check_tensors);
  bytes      a flipped byte inside quantized codes (GGUF has no checksum:
             neither reader can tell; listed to say so).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Iterator

from quantjax.io import gguf_read

TYPES = {  # tensor -> GGUF type in the base file
    r"blk\.0\.attn_q\.weight": "Q4_0", r"blk\.1\.attn_q\.weight": "Q4_0",
    r"blk\.\d\.attn_k\.weight": "Q4_1", r"blk\.\d\.attn_v\.weight": "Q5_0",
    r"blk\.\d\.attn_output\.weight": "Q5_1", r"blk\.\d\.ffn_gate\.weight": "Q8_0",
    r"blk\.\d\.ffn_up\.weight": "F16", r"blk\.0\.ffn_down\.weight": "Q6_K",
    r"blk\.1\.ffn_down\.weight": "Q4_K", r"token_embd\.weight": "Q8_0",
}


def base_config(vocab: int):
  from quantjax.models import llama
  return llama.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           rope_theta=10000.0, tie_embeddings=True,
                           max_position_embeddings=256, name="tiny-corpus")


def tiny_tokenizer(vocab: int = 320):
  """A byte-level BPE tokenizer of `vocab` tokens trained on CPython's docs (about 1 s):
  llama.cpp needs a tokenizer to load a model, and a small one keeps the corpus fast."""
  from pydoc_data.topics import topics
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>")
  assert len(fast) == vocab, len(fast)
  return fast


def base_model(directory: str, *, tokenizer=None) -> str:
  """Writes the valid base file (tiny tokenizer unless one is given); returns its path."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from quantjax.io import gguf as gio
  from quantjax.models import llama

  tok = tiny_tokenizer() if tokenizer is None else tokenizer
  cfg = base_config(len(tok))
  pure = nnx.to_pure_dict(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  pure = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pure)
  path = os.path.join(directory, "base.gguf")
  gio.export_gguf(path, cfg, pure, tokenizer=tok, types=list(TYPES.items()))
  return path


# ----------------------------------------------------------------------------
# The parsed layout and a serializer.


@dataclasses.dataclass
class KV:
  key: str
  types: tuple[int, ...]
  raw: bytes           # the value's bytes as stored (after the type id(s))


@dataclasses.dataclass
class Tensor:
  name: str
  ne: list[int]
  type_id: int
  offset: int
  data: bytes


@dataclasses.dataclass
class Layout:
  version: int
  kvs: list[KV]
  tensors: list[Tensor]
  alignment: int


def parse(path: str) -> Layout:
  with gguf_read.read_gguf(path) as f:
    raw = open(path, "rb").read()
    fields = [fl for k, fl in f.fields.items() if not k.startswith("GGUF.")]
    ends = [fl.offset for fl in fields[1:]] + [f.tensors[0].info_offset]
    kvs = []
    for fl, end in zip(fields, ends):
      start = fl.value_offset + (4 if fl.is_array else 0)  # arrays: sub type follows
      kvs.append(KV(fl.name, fl.type_ids, raw[start:end]))
    tensors = [Tensor(t.name, [int(x) for x in t.shape], t.type_id,
                      t.data_offset - f.data_start, raw[t.data_offset:t.data_offset + t.n_bytes])
               for t in f.tensors]
    return Layout(f.version, kvs, tensors, f.alignment)


def serialize(lay: Layout, *, n_tensors: int | None = None, n_kv: int | None = None,
              keep_offsets: bool = True) -> bytes:
  out = bytearray(b"GGUF")
  out += struct.pack("<IQQ", lay.version, len(lay.tensors) if n_tensors is None else n_tensors,
                     len(lay.kvs) if n_kv is None else n_kv)
  for kv in lay.kvs:
    k = kv.key.encode()
    out += struct.pack("<Q", len(k)) + k + struct.pack("<I", kv.types[0])
    if len(kv.types) > 1:
      out += struct.pack("<I", kv.types[1])
    out += kv.raw
  offsets = []
  off = 0
  for t in lay.tensors:
    offsets.append(t.offset if keep_offsets else off)
    off += -(-len(t.data) // lay.alignment) * lay.alignment
  for t, o in zip(lay.tensors, offsets):
    n = t.name.encode()
    out += struct.pack("<Q", len(n)) + n + struct.pack("<I", len(t.ne))
    out += b"".join(struct.pack("<Q", x) for x in t.ne)
    out += struct.pack("<IQ", t.type_id, o)
  out += b"\0" * ((-len(out)) % lay.alignment)
  for t in lay.tensors:
    out += t.data + b"\0" * ((-len(t.data)) % lay.alignment)
  return bytes(out)


def _kv_raw(t: int, v) -> bytes:
  if t == 8:
    b = v.encode()
    return struct.pack("<Q", len(b)) + b
  return struct.pack(gguf_read._SCALAR[t][0], v)


# ----------------------------------------------------------------------------
# The variants.


def _positions(path: str):
  """Byte positions of the structure, from the checked reader."""
  with gguf_read.read_gguf(path) as f:
    fields = {k: (fl.offset, fl.value_offset, fl.type_ids, fl.count)
              for k, fl in f.fields.items() if not k.startswith("GGUF.")}
    tens = []
    for t in f.tensors:
      name_len = len(t.name.encode())
      nd = len(t.shape)
      type_pos = t.info_offset + 8 + name_len + 4 + 8 * nd
      tens.append(dict(name=t.name, info=t.info_offset, ne_pos=t.info_offset + 8 + name_len + 4,
                       type_pos=type_pos, off_pos=type_pos + 4, data=t.data_offset,
                       n_bytes=t.n_bytes, kind=t.type_name, type_id=t.type_id,
                       shape=[int(x) for x in t.shape], rel=t.data_offset - f.data_start))
    return fields, tens, f.data_start, f.size, f.alignment


def variants(path: str) -> Iterator[tuple[str, str, bytes]]:
  base = open(path, "rb").read()
  fields, tens, data_start, size, align = _positions(path)
  lay = parse(path)

  def patch(pos: int, fmt: str, value) -> bytes:
    b = bytearray(base)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)

  # --- truncations at every structural boundary
  cuts = {"empty": 0, "magic": 4, "version": 8, "n_tensors": 16, "n_kv": 24}
  for k, (off, voff, _, _) in fields.items():
    cuts[f"key {k}"] = off
    cuts[f"value of {k}"] = voff
  big = max(fields.items(), key=lambda kv: kv[1][3])
  cuts[f"inside {big[0]}"] = big[1][1] + 5000
  for t in tens:
    cuts[f"info of {t['name']}"] = t["info"]
    cuts[f"type of {t['name']}"] = t["type_pos"]
    cuts[f"data of {t['name']}"] = t["data"]
    cuts[f"middle of {t['name']}"] = t["data"] + t["n_bytes"] // 2
  cuts["data section"] = data_start
  cuts["last byte"] = size - 1
  for what, at in cuts.items():
    yield f"truncate at {what} (byte {at})", "truncate", base[:at]

  # --- type ids
  same_block = {"Q4_0": "Q4_1", "Q4_1": "Q4_0", "Q5_0": "Q8_0", "Q5_1": "Q5_0", "Q8_0": "Q4_0",
                "Q4_K": "Q6_K", "Q6_K": "Q4_K", "F16": "BF16", "F32": "F16"}
  import gguf
  for t in tens:
    for new in sorted({"F32", "F16", same_block[t["kind"]]} - {t["kind"]}):
      yield (f"type of {t['name']} {t['kind']} -> {new}", "type",
             patch(t["type_pos"], "<I", int(gguf.GGMLQuantizationType[new])))
  for t in (tens[0], tens[-1]):
    for bad in (4, 99, 2 ** 31):
      yield f"type of {t['name']} -> unknown id {bad}", "type", patch(t["type_pos"], "<I", bad)

  # --- offsets
  for i, t in enumerate(tens):
    for d in (1, -1, align, -align):
      if t["rel"] + d >= 0:
        yield f"offset of {t['name']} {d:+d}", "offset", patch(t["off_pos"], "<Q", t["rel"] + d)
    if i:
      yield (f"offset of {t['name']} = that of {tens[i - 1]['name']} (overlap)", "offset",
             patch(t["off_pos"], "<Q", tens[i - 1]["rel"]))
  yield "offset of last tensor past the end", "offset", patch(tens[-1]["off_pos"], "<Q", size)
  yield "offset 2^63", "offset", patch(tens[0]["off_pos"], "<Q", 2 ** 63)
  yield ("tensors in another order (offsets kept)", "offset",
         serialize(dataclasses.replace(lay, tensors=lay.tensors[::-1])))

  # --- lengths
  k0 = next(iter(fields))
  yield "key length 2^40", "length", patch(fields[k0][0], "<Q", 2 ** 40)
  yield "key length 2^64-1", "length", patch(fields[k0][0], "<Q", 2 ** 64 - 1)
  for key, (off, voff, ty, count) in fields.items():
    if ty[0] == 9:
      for n in (count + 1, 2 ** 40, 2 ** 62, 2 ** 64 - 1):
        yield f"array {key} length {n}", "length", patch(voff + 4, "<Q", n)
    elif ty[0] == 8 and key == "general.name":
      yield f"string {key} length 2^50", "length", patch(voff, "<Q", 2 ** 50)
  strings = [k for k, v in fields.items() if v[2] == (9, 8)]
  s = strings[0]
  yield (f"first string of {s} length 2^40", "length", patch(fields[s][1] + 12, "<Q", 2 ** 40))
  yield "n_tensors 2^40", "length", patch(8, "<Q", 2 ** 40)
  yield "n_tensors +1", "length", patch(8, "<Q", len(tens) + 1)
  yield "n_kv 2^40", "length", patch(16, "<Q", 2 ** 40)
  yield "n_kv +1", "length", patch(16, "<Q", len(fields) + 1)
  yield "n_kv -1", "length", patch(16, "<Q", len(fields) - 1)
  t = tens[0]
  yield "tensor name length 2^40", "length", patch(t["info"], "<Q", 2 ** 40)
  yield "n_dims 5", "length", patch(t["ne_pos"] - 4, "<I", 5)
  yield "n_dims 1 (was 2)", "length", patch(t["ne_pos"] - 4, "<I", 1)
  yield "ne[1] 2^62", "length", patch(t["ne_pos"] + 8, "<Q", 2 ** 62)
  yield "ne[1] 2^63 (negative)", "length", patch(t["ne_pos"] + 8, "<Q", 2 ** 63)
  yield "ne[0] 48 (not a multiple of 32)", "length", patch(t["ne_pos"], "<Q", 48)
  yield "ne[1] halved", "length", patch(t["ne_pos"] + 8, "<Q", t["shape"][1] // 2)
  long_name = [dataclasses.replace(x) for x in lay.tensors]
  long_name[1].name = "blk.0." + "x" * 70
  yield "tensor name of 76 bytes", "length", serialize(dataclasses.replace(lay, tensors=long_name))
  five = [dataclasses.replace(x) for x in lay.tensors]
  five[0].ne = five[0].ne + [1, 1, 1]
  yield "5 dimensions (sizes 1)", "length", serialize(dataclasses.replace(lay, tensors=five))
  nested = lay.kvs + [KV("general.nested", (9, 9), struct.pack("<IQ", 0, 0) + b"")]
  yield "array of arrays", "length", serialize(dataclasses.replace(lay, kvs=nested))

  # --- header fields
  yield "magic GGUX", "meta", b"GGUX" + base[4:]
  yield "version 1", "meta", patch(4, "<I", 1)
  yield "version 4", "meta", patch(4, "<I", 4)
  yield "version byte-swapped", "meta", patch(4, "<I", 3 << 24)
  yield "version 0", "meta", patch(4, "<I", 0)

  # --- metadata values
  def set_kv(key: str, t: int, v, name: str | None = None):
    kvs = [KV(k.key, (t,), _kv_raw(t, v)) if k.key == key else k for k in lay.kvs]
    if not any(k.key == key for k in lay.kvs):
      kvs.append(KV(key, (t,), _kv_raw(t, v)))
    return name or f"{key} = {v!r}", "meta", serialize(dataclasses.replace(lay, kvs=kvs))

  u32, i32, f32, str_ = 4, 5, 6, 8
  for key, vals in (("llama.attention.head_count_kv", (0, 3, 8, 1)),
                    ("llama.attention.head_count", (0, 3, 8, 2)),
                    ("llama.embedding_length", (0, 32, 128)),
                    ("llama.block_count", (0, 1, 3)),
                    ("llama.feed_forward_length", (0, 128, 512)),
                    ("llama.context_length", (0,)),
                    ("llama.rope.dimension_count", (0,)),
                    ("llama.vocab_size", (0, 100)),
                    ("tokenizer.ggml.bos_token_id", (10 ** 6, 2 ** 32 - 1)),
                    ("tokenizer.ggml.eos_token_id", (10 ** 6,))):
    for v in vals:
      yield set_kv(key, u32, v)
  for key, vals in (("llama.rope.freq_base", (float("nan"), 0.0, -1.0, float("inf"))),
                    ("llama.attention.layer_norm_rms_epsilon", (float("nan"), -1.0))):
    for v in vals:
      yield set_kv(key, f32, v)
  yield set_kv("llama.attention.head_count", f32, 4.0, "llama.attention.head_count as FLOAT32")
  yield set_kv("llama.attention.head_count", str_, "4", "llama.attention.head_count as STRING")
  yield set_kv("llama.block_count", i32, -2, "llama.block_count = -2 (INT32)")
  yield set_kv("general.architecture", str_, "llamb")
  yield set_kv("general.architecture", u32, 1, "general.architecture as UINT32")
  yield set_kv("tokenizer.ggml.model", str_, "gpt3")
  for a in (0, 3, 64, 16):
    yield set_kv("general.alignment", u32, a)
  yield set_kv("general.alignment", 10, 32, "general.alignment as UINT64")
  # duplicate key, empty key, duplicate tensor name
  dup = lay.kvs + [lay.kvs[1]]
  yield "duplicate key", "meta", serialize(dataclasses.replace(lay, kvs=dup), n_kv=len(dup))
  empty = lay.kvs + [KV("", (u32,), _kv_raw(u32, 1))]
  yield "empty key", "meta", serialize(dataclasses.replace(lay, kvs=empty))
  bad_utf8 = lay.kvs + [KV("general.zz", (u32,), _kv_raw(u32, 1))]
  raw_bad = serialize(dataclasses.replace(lay, kvs=bad_utf8)).replace(b"general.zz",
                                                                      b"general.\xff\xfe")
  yield "key not UTF-8", "meta", raw_bad
  dupt = [dataclasses.replace(x) for x in lay.tensors]
  dupt[2].name = dupt[1].name
  yield "duplicate tensor name", "meta", serialize(dataclasses.replace(lay, tensors=dupt))
  missing = [x for x in lay.tensors if x.name != "blk.1.ffn_up.weight"]
  yield "a tensor missing", "meta", serialize(dataclasses.replace(lay, tensors=missing),
                                              keep_offsets=False)
  extra = lay.tensors + [dataclasses.replace(lay.tensors[-1], name="blk.2.attn_norm.weight")]
  yield "a tensor beyond block_count", "meta", serialize(dataclasses.replace(lay, tensors=extra),
                                                         keep_offsets=False)
  for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
    kvs = [k for k in lay.kvs if k.key != key]
    yield f"{key} removed", "meta", serialize(dataclasses.replace(lay, kvs=kvs))
  tt = next(k for k in lay.kvs if k.key == "tokenizer.ggml.token_type")
  short = dataclasses.replace(tt, raw=struct.pack("<Q", 100) + tt.raw[8:8 + 400])
  kvs = [short if k.key == tt.key else k for k in lay.kvs]
  yield "tokenizer.ggml.token_type of 100 entries", "meta", serialize(
      dataclasses.replace(lay, kvs=kvs))
  yield ("trailing bytes after the data", "meta", base + b"\0" * 64)

  # --- NaN / Inf block scales (one block of each block type)
  seen = set()
  for t in tens:
    layout = gguf_read.SCALE_LAYOUT.get(t["kind"])
    if not layout or t["kind"] in seen:
      continue
    seen.add(t["kind"])
    _, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t["kind"]]]
    block = 3 if t["n_bytes"] // tsize > 3 else 0
    for off, dt, label in layout:
      for bits, what in ((0x7E00, "NaN"), (0x7C00, "Inf")):
        yield (f"{what} {label} in block {block} of {t['name']} ({t['kind']})", "scale",
               patch(t["data"] + block * tsize + off, "<H", bits))
  # --- NaN / Inf in float tensor values
  for t in tens:
    if t["kind"] == "F32":
      yield f"NaN value in {t['name']} (F32)", "value", patch(t["data"] + 8, "<f", float("nan"))
      break
  for t in tens:
    if t["kind"] == "F16":
      yield f"Inf value in {t['name']} (F16)", "value", patch(t["data"] + 6, "<H", 0x7C00)
      break
  # --- flipped code bytes: no checksum in GGUF
  for t in tens:
    if t["kind"] == "Q4_0":
      b = bytearray(base)
      b[t["data"] + 10] ^= 0xFF
      yield f"flipped code byte in {t['name']} (Q4_0)", "bytes", bytes(b)
      break


def write_all(path: str, directory: str) -> list[tuple[str, str, str]]:
  """Writes every variant of `path` to `directory`; returns `(name, category, file)`."""
  out = []
  for i, (name, cat, data) in enumerate(variants(path)):
    p = os.path.join(directory, f"v{i:03d}.gguf")
    with open(p, "wb") as f:
      f.write(data)
    out.append((name, cat, p))
  return out
