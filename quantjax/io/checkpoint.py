"""Orbax checkpoints of params trees that hold `QArray`s.

Orbax stores the arrays (codes, scales, zero points: the real, small bytes);
the static part of each QArray (format, logical shape, dtype) and the tree's
layout go to a JSON manifest beside them, so a checkpoint restores with no
target tree. Writes are atomic: everything is written into a temporary
directory next to the destination, which is renamed into place at the end;
an interrupted save leaves the previous checkpoint (if any) untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray

__all__ = ["save_params", "restore_params", "format_to_dict", "format_from_dict"]

_MANIFEST = "quantjax_manifest.json"
_ARRAYS = "arrays"
_VERSION = 1


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
  from quantjax.methods.activations import StaticActQuantized
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
    from quantjax.methods.activations import StaticActQuantized
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


def save_params(path: str | os.PathLike, params: Any, *, overwrite: bool = True) -> str:
  """Saves a params tree (QArrays, masks, nnx.State, nested dicts) atomically.

  Returns the checkpoint directory. With `overwrite=False`, an existing
  directory is an error.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"checkpoint {path} exists (pass overwrite=True to replace it)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  arrays: dict[str, Any] = {}
  desc = _describe(_to_plain(params), arrays, "")
  manifest = {"version": _VERSION, "tree": desc,
              "is_nnx_state": isinstance(params, nnx.State)}
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  try:
    # numpy keys: orbax wants a dict of arrays; '/' in keys would nest, so escape.
    flat = {k.replace("/", "|") or "|": np.asarray(v) for k, v in arrays.items()}
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(os.path.join(tmp, _ARRAYS), flat)
    with open(os.path.join(tmp, _MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f)
    if os.path.exists(path):
      old = path + ".old-" + os.path.basename(tmp)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def restore_params(path: str | os.PathLike, *, as_nnx_state: bool | None = None) -> Any:
  """Restores a tree saved by `save_params` (QArrays with their formats).

  Args:
    path: the checkpoint directory.
    as_nnx_state: return an `nnx.State` (default: whatever was saved).
  """
  path = os.path.abspath(os.fspath(path))
  mpath = os.path.join(path, _MANIFEST)
  if not os.path.isfile(mpath):
    raise FileNotFoundError(f"{path} is not a quantjax checkpoint (no {_MANIFEST})")
  with open(mpath, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"corrupt checkpoint manifest {mpath}: {e}") from None
  if manifest.get("version") != _VERSION:
    raise ValueError(f"checkpoint {path} has manifest version {manifest.get('version')}, "
                     f"this quantjax reads version {_VERSION}")
  flat = ocp.PyTreeCheckpointer().restore(os.path.join(path, _ARRAYS))
  arrays = {("" if k == "|" else k.replace("|", "/")): jnp.asarray(v) for k, v in flat.items()}
  tree = _rebuild(manifest["tree"], arrays)
  if as_nnx_state is None:
    as_nnx_state = manifest.get("is_nnx_state", False)
  if as_nnx_state:
    return nnx.State(tree)
  return tree
