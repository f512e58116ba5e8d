"""The package's seams, read from its source with `ast`: no module of quantjax reaches
into another module's private (underscore) names, and none imports the harness
(`experiments`, `configs`).

A use is `X._name` (or `getattr(X, "_name")`) where `X` is bound in that file by an
import of a quantjax module, or is named `lib` / `*_lib` (the package's name for a
module passed around, `self.lib`); or `from quantjax... import _name`, except a
package's own private submodule imported by a module of that package."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quantjax"
HARNESS = ("experiments", "configs")

# Private uses that remain inside quantjax/methods/ (being reworked): (file, use).
# Remove an entry with the use; the test fails on a use not listed and on an entry
# that no longer matches a use.
ALLOWED: frozenset = frozenset()


def _private(name):
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted):
  path = ROOT.joinpath(*dotted.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _dotted(node):
  """`a.b.c` -> "a.b.c"; None for anything but a chain of names."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return ".".join([node.id, *reversed(parts)])


def _a_module(chain, modules, others):
  """Whether the chain of names `chain` ("a.b") is a quantjax module."""
  if chain is None:
    return False
  names = chain.split(".")
  if names[0] in modules:
    return _is_module(".".join([modules[names[0]], *names[1:]]))
  return names[0] not in others and (names[-1] == "lib" or names[-1].endswith("_lib"))


def _absolute(path, node):
  """The module a `from ... import` names, relative imports resolved."""
  if not node.level:
    return node.module or ""
  package = path.relative_to(ROOT).with_suffix("").parts[:-1]  # __init__ too
  base = package[:len(package) - node.level + 1]
  return ".".join([*base, *([node.module] if node.module else [])])


def _problems(path, source=None):
  rel = path.relative_to(ROOT).as_posix()
  tree = ast.parse(path.read_text() if source is None else source, filename=rel)
  modules = {}  # names this file binds to a quantjax module -> that module
  others = set()  # names it binds by other imports
  problems = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        top = alias.name.split(".")[0]
        if top in HARNESS:
          problems.append((rel, node.lineno, f"imports {alias.name}"))
        if top == "quantjax":
          modules[alias.asname or top] = alias.name if alias.asname else top
        else:
          others.add(alias.asname or top)
    elif isinstance(node, ast.ImportFrom):
      module = _absolute(path, node)
      top = module.split(".")[0]
      if top in HARNESS:
        problems.append((rel, node.lineno, f"imports from {module}"))
      if top != "quantjax":
        others.update(alias.asname or alias.name for alias in node.names)
        continue
      own = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
      for alias in node.names:
        submodule = _is_module(f"{module}.{alias.name}")
        if _private(alias.name) and not (submodule and module == own):
          problems.append((rel, node.lineno, f"from {module} import {alias.name}"))
        if submodule:
          modules[alias.asname or alias.name] = f"{module}.{alias.name}"
  for node in ast.walk(tree):
    use = None
    if isinstance(node, ast.Attribute) and _private(node.attr):
      chain = _dotted(node.value)
      if _a_module(chain, modules, others):
        use = f"{chain}.{node.attr}"
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
          and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
          and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
      chain = _dotted(node.args[0])
      if _a_module(chain, modules, others):
        use = f"{chain}.{node.args[1].value}"
    if use:
      problems.append((rel, node.lineno, use))
  return problems


def _all_problems():
  return [p for path in sorted(PACKAGE.rglob("*.py")) for p in _problems(path)]


def test_no_module_uses_another_modules_private_names_or_the_harness():
  problems = _all_problems()
  found = [f"{rel}:{line}: {use}" for rel, line, use in problems
           if (rel, use) not in ALLOWED]
  assert not found, "private names or harness imports across modules:\n" + "\n".join(found)
  stale = ALLOWED - {(rel, use) for rel, _, use in problems}
  assert not stale, f"ALLOWED entries no longer used (remove them): {sorted(stale)}"


def test_the_check_sees_each_kind_of_use():
  module = PACKAGE / "sparsity" / "probe.py"  # never written: the source is parsed from a string
  source = ("import numpy as np\n"
            "from quantjax.io import hf\n"
            "import quantjax.io.atomic as atomic\n"
            "import quantjax\n"
            "from quantjax.io.gguf import _x\n"
            "from . import _select as select_lib\n"
            "from quantjax.models import _y\n"
            "def f(gguf_lib, self):\n"
            "  import experiments.bench\n"
            "  from configs import base\n"
            "  return (hf._read(), atomic._unlink, quantjax.io.hf._y, select_lib._z,\n"
            "          getattr(hf, '_w'), self.lib._v, gguf_lib._u,\n"
            "          hf.__name__, hf.public, np.lib._ok, self._ok, atomic.x._ok)\n")
  got = sorted((line, use) for _, line, use in _problems(module, source))
  assert got == [(5, "from quantjax.io.gguf import _x"), (7, "from quantjax.models import _y"),
                 (9, "imports experiments.bench"), (10, "imports from configs"),
                 (11, "atomic._unlink"), (11, "hf._read"), (11, "quantjax.io.hf._y"),
                 (11, "select_lib._z"), (12, "gguf_lib._u"), (12, "hf._w"), (12, "self.lib._v")]
