"""Command-line helpers shared by the launchers (`experiments.main`, `experiments.export`)."""

import importlib.util
import sys


def check_overrides(argv: list[str], flag: str = "config") -> None:
  """Exits with one clear line if a `--config.a.b=v` names a key the config lacks."""
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{flag}=")), None)
  keys = [a[len(f"--{flag}."):].split("=", 1)[0] for a in argv[1:]
          if a.startswith(f"--{flag}.")]
  if spec is None or not keys:
    return
  path, _, arg = spec.partition(":")
  try:
    mod_spec = importlib.util.spec_from_file_location("_quantjax_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg or None) if arg else module.get_config()
  except Exception:  # noqa: BLE001 - absl reports a config file that does not load
    return
  for key in keys:
    node = config
    parts = key.split(".")
    for i, p in enumerate(parts):
      if not hasattr(node, "keys") or p not in node:
        where = ".".join(parts[:i]) or "the config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a block)"
        print(f"error: --{flag}.{key}: {where} has no field {p!r}; valid keys: {valid}",
              file=sys.stderr)
        sys.exit(2)
      node = node[p]
