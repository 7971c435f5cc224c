"""The package's import graph: no circles, no imports of the package's own modules inside
functions, and the layers in order (data -> text -> model -> losses -> steps -> method ->
peers / methods -> inference -> maps -> metrics -> trainer -> the commands)."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dpmamba_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, known) -> tuple[set[str], list[str]]:
  """(package modules imported at module level, "line: module" of those imported in functions)."""
  tree = ast.parse(path.read_text())
  top, local = set(), []

  def targets(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from dpmamba_jax.data import datasets` names a module; `... import Split`, a symbol
      subs = [f"{node.module}.{a.name}" for a in node.names]
      return [s if s in known else node.module for s in subs]
    return []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      for name in targets(child):
        if name.split(".")[0] == "dpmamba_jax":
          if fn:
            local.append(f"{child.lineno}: {name}")
          else:
            top.add(name)
      visit(child, fn)

  visit(tree, False)
  return top, local


def _graph():
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    top, _ = _imports(path, mods)
    deps = set()
    for t in top:
      while t not in mods and "." in t:
        t = t.rsplit(".", 1)[0]
      # importing a.b.c runs the packages a and a.b first
      parts = t.split(".")
      deps.update([t] + [".".join(parts[:i]) for i in range(1, len(parts))])
    # a module's own enclosing packages are being imported already when it runs: not an edge
    graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
  return graph


def test_no_import_circles():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def dfs(n):
    state[n] = 1
    stack.append(n)
    for d in sorted(graph.get(n, ())):
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        dfs(d)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      dfs(n)
  assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_local_imports_of_the_package():
  mods = _modules()
  found = {name: local for name, path in mods.items() for local in [_imports(path, mods)[1]]
           if local}
  assert not found, f"function-local imports of the package's own modules: {found}"


# Lower layers may not import higher ones (the order data flows in).
LAYERS = [
    ("dpmamba_jax.errors", "dpmamba_jax.fileio", "dpmamba_jax.locks", "dpmamba_jax.figures",
     "dpmamba_jax.runtime"),
    ("dpmamba_jax.data",),
    ("dpmamba_jax.text",),
    ("dpmamba_jax.model",),
    ("dpmamba_jax.losses", "dpmamba_jax.masks", "dpmamba_jax.sharding"),
    ("dpmamba_jax.config", "dpmamba_jax.checkpoint", "dpmamba_jax.run"),
    ("dpmamba_jax.steps",),
    ("dpmamba_jax.method",),
    ("dpmamba_jax.peers", "dpmamba_jax.methods"),
    ("dpmamba_jax.inference",),
    ("dpmamba_jax.maps",),
    ("dpmamba_jax.metrics",),
    ("dpmamba_jax.workdir", "dpmamba_jax.trainer"),
    ("dpmamba_jax.train", "dpmamba_jax.evaluate", "dpmamba_jax.predict", "dpmamba_jax.summary"),
]


def _layer(module: str) -> int:
  if module == "dpmamba_jax":  # the package's __init__: imports nothing of its own
    return 0
  for i, group in enumerate(LAYERS):
    if any(module == g or module.startswith(g + ".") for g in group):
      return i
  raise KeyError(module)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "dpmamba_jax"))
def test_imports_go_down_the_layers(module):
  up = [d for d in _graph()[module] if _layer(d) > _layer(module)]
  assert not up, f"{module} imports the higher layer(s) {up}"
