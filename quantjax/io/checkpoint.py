"""Orbax checkpoints of params trees that hold `QArray`s.

Orbax stores the arrays (codes, scales, zero points: the real, small bytes);
the static part of each QArray (format, logical shape, dtype) and the tree's
layout go to a JSON manifest beside them, so a checkpoint restores with no
target tree.

Saves are crash-safe (`quantjax.io.atomic.atomic_dir`): a kill at any point
leaves the previous checkpoint or the new one restorable, never neither and
never a mix; the next save cleans what an interrupted one left. A save never
replaces anything that is not a quantjax checkpoint. Restores check a
checksum (XXH3-128) of every file and of every array (recorded at save), so a flipped
byte, a truncated file or an edited manifest is an error naming it, not
silently different values.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from quantjax.io import atomic
from quantjax.io.atomic import atomic_dir  # noqa: F401  (re-exported for stage outputs)
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray, StaticActQuantized

__all__ = ["save_params", "restore_params", "find_checkpoint", "exists", "atomic_dir",
           "format_to_dict", "format_from_dict"]

_MANIFEST = "quantjax_manifest.json"
_ARRAYS = "arrays"
_VERSION = 2          # array checksums in the manifest, files in the commit record
_VERSION_LEGACY = 1   # before commit records: read without checks


def format_to_dict(fmt: QuantFormat) -> dict[str, Any]:
  d = {k: getattr(fmt, k) for k in fmt.__dataclass_fields__}
  d["scale_dtype"] = jnp.dtype(fmt.scale_dtype).name
  return d


def format_from_dict(d: dict[str, Any]) -> QuantFormat:
  d = dict(d)
  d["scale_dtype"] = jnp.dtype(d["scale_dtype"])
  return QuantFormat(**d)


def _to_plain(tree: Any) -> Any:
  """nnx.State -> nested dict; leaves untouched."""
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return tree


def _describe(node: Any, arrays: dict[str, Any], prefix: str) -> Any:
  """JSON description of `node`; its arrays go into `arrays` under path keys."""
  if isinstance(node, InputScaled):
    arrays[f"{prefix}.s"] = node.scale
    return {"__input_scaled__": f"{prefix}.s",
            "weight": _describe(node.weight, arrays, prefix + ".w")}
  if isinstance(node, StaticActQuantized):
    entry = {"__static_act__": format_to_dict(node.act_format),
             "weight": _describe(node.weight, arrays, prefix + ".w")}
    for name in ("act_scale", "act_zero_point"):
      a = getattr(node, name)
      if a is not None:
        arrays[f"{prefix}.{name}"] = a
        entry[name] = f"{prefix}.{name}"
    return entry
  if isinstance(node, ActQuantized):
    return {"__act__": format_to_dict(node.act_format),
            "weight": _describe(node.weight, arrays, prefix + ".w")}
  if isinstance(node, QArray):
    entry = {"__qarray__": format_to_dict(node.fmt), "shape": list(node.shape),
             "dtype": jnp.dtype(node.dtype).name}
    for name in ("qvalue", "scale", "zero_point"):
      a = getattr(node, name)
      if a is not None:
        arrays[f"{prefix}.{name}"] = a
        entry[name] = f"{prefix}.{name}"
    return entry
  if isinstance(node, dict):
    for k in node:
      if not isinstance(k, (str, int)) or isinstance(k, bool):
        raise TypeError(f"cannot checkpoint dict key {k!r} ({type(k).__name__}) at {prefix or '/'}")
    return {"__dict__": {str(k): _describe(v, arrays, f"{prefix}/{k}") for k, v in node.items()},
            "int_keys": [str(k) for k in node if isinstance(k, int)]}
  if isinstance(node, (list, tuple)):
    return {"__list__": [_describe(v, arrays, f"{prefix}/{i}") for i, v in enumerate(node)],
            "tuple": isinstance(node, tuple)}
  if node is None:
    return {"__none__": True}
  if hasattr(node, "shape") and hasattr(node, "dtype"):
    arrays[prefix] = node
    return {"__array__": prefix}
  if isinstance(node, (int, float, str, bool)):
    return {"__scalar__": node}
  raise TypeError(f"cannot checkpoint leaf of type {type(node).__name__} at {prefix or '/'}")


def _rebuild(desc: Any, arrays: dict[str, Any]) -> Any:
  if "__input_scaled__" in desc:
    return InputScaled(weight=_rebuild(desc["weight"], arrays),
                       scale=arrays[desc["__input_scaled__"]])
  if "__static_act__" in desc:
    get = lambda n: arrays[desc[n]] if n in desc else None  # noqa: E731
    return StaticActQuantized(weight=_rebuild(desc["weight"], arrays),
                              act_format=format_from_dict(desc["__static_act__"]),
                              act_scale=get("act_scale"), act_zero_point=get("act_zero_point"))
  if "__act__" in desc:
    return ActQuantized(weight=_rebuild(desc["weight"], arrays),
                        act_format=format_from_dict(desc["__act__"]))
  if "__qarray__" in desc:
    fmt = format_from_dict(desc["__qarray__"])
    get = lambda n: arrays[desc[n]] if n in desc else None  # noqa: E731
    return QArray(qvalue=get("qvalue"), scale=get("scale"), zero_point=get("zero_point"),
                  fmt=fmt, shape=tuple(desc["shape"]), dtype=jnp.dtype(desc["dtype"]))
  if "__dict__" in desc:
    ints = set(desc.get("int_keys", ()))
    return {(int(k) if k in ints else k): _rebuild(v, arrays) for k, v in desc["__dict__"].items()}
  if "__list__" in desc:
    items = [_rebuild(v, arrays) for v in desc["__list__"]]
    return tuple(items) if desc.get("tuple") else items
  if "__none__" in desc:
    return None
  if "__array__" in desc:
    return arrays[desc["__array__"]]
  if "__scalar__" in desc:
    return desc["__scalar__"]
  raise ValueError(f"unreadable checkpoint manifest entry: {desc!r}")


def _legacy_checkpoint(d: str) -> bool:
  """A checkpoint written before commit records (manifest version 1): only our two entries."""
  try:
    entries = set(os.listdir(d))
  except OSError:
    return False
  return _MANIFEST in entries and entries <= {_MANIFEST, _ARRAYS}


def _array_digest(a: np.ndarray) -> str:
  """XXH3-128 of an array's dtype, shape and bytes."""
  import xxhash
  a = np.ascontiguousarray(a)
  h = xxhash.xxh3_128(f"{a.dtype.str}{a.shape}".encode())
  if a.size:
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
  return h.hexdigest()


def save_params(path: str | os.PathLike, params: Any, *, overwrite: bool = True) -> str:
  """Saves a params tree (QArrays, masks, nnx.State, nested dicts) crash-safely.

  The checkpoint is written into a temporary directory beside `path` and
  committed with `quantjax.io.atomic.atomic_dir`: at every instant `path`
  (or, after a crash between two renames, a complete copy beside it that
  `restore_params` finds) is the old checkpoint or the new one, complete.
  Every array's checksum (XXH3-128) goes into the manifest and every file's
  into the commit record, so `restore_params` detects a flipped byte, a truncated
  file or an edited manifest and names it. Leftovers of an interrupted save
  are cleaned by the next save to the same path.

  Args:
    path: the checkpoint directory.
    params: the tree.
    overwrite: replace an existing checkpoint at `path`. Whatever the flag, a
      regular file, a symlink, or a directory that is not a quantjax
      checkpoint (or holds files added to one) is never replaced: that is an
      error and nothing is written.

  Returns:
    The checkpoint directory.
  """
  path = os.path.abspath(os.fspath(path))
  arrays: dict[str, Any] = {}
  desc = _describe(_to_plain(params), arrays, "")
  # numpy keys: orbax wants a dict of arrays; '/' in keys would nest, so escape.
  flat = {k.replace("/", "|") or "|": np.asarray(v) for k, v in arrays.items()}
  manifest = {"version": _VERSION, "tree": desc,
              "is_nnx_state": isinstance(params, nnx.State),
              "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape),
                             atomic.HASH: _array_digest(v)} for k, v in flat.items()}}
  with atomic.atomic_dir(path, overwrite=overwrite, kind="checkpoint",
                         legacy=_legacy_checkpoint) as tmp:
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(os.path.join(tmp, _ARRAYS), flat)
    with open(os.path.join(tmp, _MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f)
  return path


def find_checkpoint(path: str | os.PathLike) -> str | None:
  """The directory `restore_params(path)` reads: `path` itself, or after a save
  interrupted between its two renames, the newest complete copy beside it;
  None when there is no checkpoint."""
  return atomic.resolve(path, legacy=_legacy_checkpoint)


def exists(path: str | os.PathLike) -> bool:
  """True when `restore_params(path)` finds a checkpoint (see `find_checkpoint`)."""
  return find_checkpoint(path) is not None


def restore_params(path: str | os.PathLike, *, as_nnx_state: bool | None = None,
                   verify: bool = True) -> Any:
  """Restores a tree saved by `save_params` (QArrays with their formats).

  Args:
    path: the checkpoint directory.
    as_nnx_state: return an `nnx.State` (default: whatever was saved).
    verify: check every file's and every array's checksum (recorded at save)
      before returning anything.

  Raises:
    FileNotFoundError: no checkpoint at `path` (nor a complete copy beside it).
    ValueError: a damaged checkpoint: a file missing, truncated or changed, an
      edited manifest, an array whose bytes differ from those saved; the
      message names the file or the array.
  """
  path = os.path.abspath(os.fspath(path))
  found = find_checkpoint(path)
  if found is None:
    if os.path.isdir(path):
      raise FileNotFoundError(
          f"{path} is not a quantjax checkpoint (no {atomic.COMMIT_RECORD} nor {_MANIFEST}"
          f"{'; ' + _why_not(path) if os.listdir(path) else ''})")
    raise FileNotFoundError(f"no checkpoint at {path}")
  legacy = not os.path.exists(os.path.join(found, atomic.COMMIT_RECORD))
  if not legacy:
    if verify:
      atomic.verify_dir(found)
    else:
      atomic.read_record(found)
  mpath = os.path.join(found, _MANIFEST)
  try:
    with open(mpath, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"checkpoint {found} has no manifest {_MANIFEST}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"corrupt checkpoint manifest {mpath}: {e}") from None
  want = _VERSION_LEGACY if legacy else _VERSION
  if not isinstance(manifest, dict) or manifest.get("version") != want:
    got = manifest.get("version") if isinstance(manifest, dict) else None
    raise ValueError(f"checkpoint manifest {mpath} has version {got}; expected {want}")
  try:
    flat = ocp.PyTreeCheckpointer().restore(os.path.join(found, _ARRAYS))
  except Exception as e:  # orbax / tensorstore raise assorted errors on damaged files
    raise ValueError(f"checkpoint {found}: orbax cannot read {os.path.join(found, _ARRAYS)} "
                     f"({type(e).__name__}: {e})") from None
  if not legacy and verify:
    _verify_arrays(manifest, flat, mpath)
  arrays = {("" if k == "|" else k.replace("|", "/")): jnp.asarray(v) for k, v in flat.items()}
  try:
    tree = _rebuild(manifest["tree"], arrays)
  except (KeyError, TypeError) as e:
    raise ValueError(f"checkpoint manifest {mpath} does not match its arrays ({e!r})") from None
  if as_nnx_state is None:
    as_nnx_state = manifest.get("is_nnx_state", False)
  if as_nnx_state:
    return nnx.State(tree)
  return tree


def _why_not(path: str) -> str:
  try:
    atomic.read_record(path)
  except FileNotFoundError:
    return f"it holds {sorted(os.listdir(path))[:6]}"
  except atomic.CommitError as e:
    return str(e)
  return ""


def _verify_arrays(manifest: dict, flat: dict, mpath: str) -> None:
  want = manifest.get("arrays")
  if not isinstance(want, dict):
    raise ValueError(f"checkpoint manifest {mpath} lists no array checksums")
  if set(want) != set(flat):
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    raise ValueError(f"checkpoint arrays do not match manifest {mpath}: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}")
  for k, info in want.items():
    a = np.asarray(flat[k])
    name = "/" if k == "|" else k.replace("|", "/")
    if a.dtype.str != info["dtype"] or list(a.shape) != list(info["shape"]):
      raise ValueError(f"checkpoint array {name!r} restored as {a.dtype.str}{list(a.shape)}, "
                       f"saved as {info['dtype']}{info['shape']} (manifest {mpath})")
    if _array_digest(a) != info.get(atomic.HASH):
      raise ValueError(f"checkpoint array {name!r} differs from what was saved (checksum "
                       f"mismatch; manifest {mpath})")
