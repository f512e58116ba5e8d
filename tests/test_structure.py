"""The package's seams, read from its source with `ast`: no module of quantjax reaches
into another module's private (underscore) names, none imports the harness
(`experiments`, `configs`), the imports between its modules and layers form no circle
(see "Import circles" below), and an import inside a function says why.

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


# ----------------------------------------------------------------------------
# Import circles.
#
# The graph: one node per module of quantjax/ (`quantjax/__init__.py` is "quantjax"),
# one edge per import of a quantjax module anywhere in a file (at module level or
# inside a function: both run). An import of `quantjax.a.b` from outside
# `quantjax.a` also runs `quantjax/a/__init__.py`, so it adds an edge to that package
# too. The layers (docs/architecture.md#layers) are the top-level packages and
# modules (`quantjax.numerics`, `quantjax.ops`, ...): the test fails on a circle
# between layers and on a circle between modules.
#
# A circle not yet broken is listed below as the one edge that closes it, with the
# reason; the lists can only shrink: an entry whose edge is gone, or no longer on a
# circle, fails the test until it is removed.

# (importing layer, imported layer): why the upward edge is still there.
ALLOWED_LAYER_EDGES: dict = {}
# (importing module, imported module): why the edge that closes a circle is still there.
ALLOWED_MODULE_EDGES: dict = {}

# Imports of quantjax modules inside functions ("lazy" imports) carry a comment saying
# why, on the import's first line or the line above it: `# lazy: <why>` (an
# optional dependency behind the module, or one of the circles allowed above).
LAZY_TAG = "# lazy:"
# Lazy imports without the comment, in files being reworked in other changes:
# (file, module imported): why it is still there. Only shrinks, as above.
_REWORKED = "in a file another change is reworking; move it to the top of the file"
ALLOWED_UNEXPLAINED_LAZY = {
    ("quantjax/methods/gptq.py", "quantjax.methods.activations"): _REWORKED,
    ("quantjax/methods/rtn.py", "quantjax.methods.activations"): _REWORKED,
}


def _module_name(path):
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name, modules):
  """The module an imported dotted name is: the longest prefix that is one."""
  parts = name.split(".")
  while parts and ".".join(parts) not in modules:
    parts.pop()
  return ".".join(parts) or None


def _quantjax_imports(path, modules, source=None):
  """`(module imported, line, inside a function)` for each quantjax import of a file."""
  me = _module_name(path)
  package = me if path.name == "__init__.py" else me.rpartition(".")[0]
  tree = ast.parse(path.read_text() if source is None else source)
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name.split(".")[0] == "quantjax":
            out.append((_resolve(alias.name, modules), child.lineno, in_function))
      elif isinstance(child, ast.ImportFrom):
        if child.level:
          base = package.split(".")[:len(package.split(".")) - child.level + 1]
          module = ".".join(base + ([child.module] if child.module else []))
        else:
          module = child.module or ""
        if module.split(".")[0] == "quantjax":
          targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules
                     else _resolve(module, modules) for a in child.names]
          out.extend((t, child.lineno, in_function) for t in dict.fromkeys(targets))
      visit(child, in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

  visit(tree, False)
  return out


def _layer(module):
  return ".".join(module.split(".")[:2])


def _import_graph(modules):
  """module -> the modules importing it runs (the packages above the target included)."""
  graph = {m: set() for m in modules}
  for me, path in modules.items():
    for target, _, _ in _quantjax_imports(path, modules):
      if target is None:
        continue
      parts = target.split(".")
      packages = [".".join(parts[:i]) for i in range(2, len(parts))]
      for t in [p for p in packages if not me.startswith(p + ".")] + [target]:
        if t != me:  # (a package of the importer's own is already running)
          graph[me].add(t)
  return graph


def _layer_graph(graph):
  layers = {}
  for a, targets in graph.items():
    layers.setdefault(_layer(a), set())
    for b in targets:
      if _layer(a) != _layer(b):
        layers[_layer(a)].add(_layer(b))
  return layers


def _circles(graph):
  """The strongly connected components of more than one node, each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(v):  # Tarjan's algorithm, iteratively
    work = [(v, iter(sorted(graph.get(v, ()))))]
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          component.append(w)
          if w == node:
            break
        if len(component) > 1:
          out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return sorted(out)


def _without(graph, edges):
  return {a: {b for b in targets if (a, b) not in edges} for a, targets in graph.items()}


def _shortest_circle(graph, component):
  """The shortest circle within a strongly connected component, as a path a -> ... -> a."""
  best = None
  for start in sorted(component):
    parent, queue = {start: None}, [start]
    for node in queue:  # breadth first, inside the component
      nxt = [b for b in sorted(graph[node]) if b in component]
      if start in nxt:
        path = [node]
        while parent[path[-1]] is not None:
          path.append(parent[path[-1]])
        path = [*reversed(path), start]
        best = path if best is None or len(path) < len(best) else best
        break
      for b in nxt:
        if b not in parent:
          parent[b] = node
          queue.append(b)
  return best


def _check_circles(graph, allowed, what):
  kept = _without(graph, allowed)
  circles = _circles(kept)
  assert not circles, (
      f"import circles between {what} (docs/architecture.md#layers says which may import "
      "which; break the circle, don't hide it in a function), the shortest in each knot:\n" +
      "\n".join(f"{' -> '.join(_shortest_circle(kept, set(c)))}  ({len(c)} {what} knotted)"
                for c in circles))
  on_circle = {frozenset(c) for c in _circles(graph)}
  stale = [edge for edge in allowed
           if edge[1] not in graph.get(edge[0], ())
           or not any(set(edge) <= c for c in on_circle)]
  assert not stale, f"allowed {what} edges that close no circle any more (remove them): {stale}"


def test_no_import_circle_between_layers():
  _check_circles(_layer_graph(_import_graph(_modules())), ALLOWED_LAYER_EDGES, "layers")


def test_no_import_circle_between_modules():
  _check_circles(_import_graph(_modules()), ALLOWED_MODULE_EDGES, "modules")


def _lazy_imports(path, modules, source=None):
  """`(module, line, explained)` for each quantjax import inside a function of a file."""
  import io
  import tokenize
  text = path.read_text() if source is None else source
  comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
              if tok.type == tokenize.COMMENT and tok.string.startswith(LAZY_TAG)}
  return [(target, line, line in comments or line - 1 in comments)
          for target, line, in_function in _quantjax_imports(path, modules, text)
          if in_function]


def test_every_lazy_import_says_why():
  modules = _modules()
  found, seen = [], set()
  for path in modules.values():
    rel = path.relative_to(ROOT).as_posix()
    for target, line, explained in _lazy_imports(path, modules):
      if not explained:
        seen.add((rel, target))
        if (rel, target) not in ALLOWED_UNEXPLAINED_LAZY:
          found.append(f"{rel}:{line}: import of {target}")
  assert not found, (f"imports of quantjax modules inside functions without a `{LAZY_TAG} "
                     "<why>` comment (move them to the top of the file unless a circle "
                     "or an optional dependency forces them):\n" + "\n".join(found))
  stale = set(ALLOWED_UNEXPLAINED_LAZY) - seen
  assert not stale, f"ALLOWED_UNEXPLAINED_LAZY entries not found (remove them): {sorted(stale)}"


def test_the_circle_check_sees_each_kind_of_import():
  modules = {"quantjax", "quantjax.a", "quantjax.a.x", "quantjax.a.y", "quantjax.b",
             "quantjax.b.z", "quantjax.c"}
  source = ("import numpy\n"
            "from quantjax.a import x, helper  # a module and a name of a package\n"
            "import quantjax.b.z.thing\n"
            "from . import c\n"
            "def f():\n"
            "  from quantjax.a import y  # lazy: a test\n"
            "  # lazy: the line above counts too\n"
            "  import quantjax.c\n"
            "  from quantjax import b\n")
  path = PACKAGE / "probe.py"  # never written: the source is parsed from a string
  got = _quantjax_imports(path, modules, source)
  assert got == [("quantjax.a.x", 2, False), ("quantjax.a", 2, False),
                 ("quantjax.b.z", 3, False), ("quantjax.c", 4, False),
                 ("quantjax.a.y", 6, True), ("quantjax.c", 8, True), ("quantjax.b", 9, True)]
  assert _lazy_imports(path, modules, source) == [
      ("quantjax.a.y", 6, True), ("quantjax.c", 8, True), ("quantjax.b", 9, False)]
  graph = {"quantjax.a.x": {"quantjax.b.z"}, "quantjax.b.z": {"quantjax.c"},
           "quantjax.c": {"quantjax.a.y"}, "quantjax.a.y": set()}
  assert _circles(graph) == []
  assert _layer_graph(graph) == {"quantjax.a": {"quantjax.b"}, "quantjax.b": {"quantjax.c"},
                                 "quantjax.c": {"quantjax.a"}}
  assert _circles(_layer_graph(graph)) == [["quantjax.a", "quantjax.b", "quantjax.c"]]
  graph["quantjax.a.y"] = {"quantjax.a.x"}
  assert _circles(graph) == [["quantjax.a.x", "quantjax.a.y", "quantjax.b.z", "quantjax.c"]]
  assert _circles(_without(graph, {("quantjax.c", "quantjax.a.y")})) == []
  graph["quantjax.b.z"].add("quantjax.a.x")
  assert _shortest_circle(graph, set(graph)) == ["quantjax.a.x", "quantjax.b.z", "quantjax.a.x"]
