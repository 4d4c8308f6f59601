"""The package's layers only point down: no import cycles, no import from a lower layer to a higher one.

A unit is a module or a subpackage; LAYERS lists them from the bottom up. A module may import
its own unit and the units of lower layers, never a peer or anything above: the pure maths
(attention, moe) and the data pipeline stay usable, and testable, without configs, models or
trainers. Checked twice: statically over every import statement (those inside functions too: a
late import is still a dependency), and by importing the low units in fresh interpreters (what
actually loads, `importlib` included).
"""

import ast
import functools
import json
import os
import subprocess
import sys

import pytest

import efficient_attn

PACKAGE_DIR = os.path.dirname(efficient_attn.__file__)

# Bottom up. A new module must be placed here (the static test fails until it is).
LAYERS = (
    # The root package, parent of every module: it loads its public names lazily, on first use.
    ("efficient_attn",),
    # Leaves: they import nothing from efficient_attn.
    ("efficient_attn.errors", "efficient_attn.platform", "efficient_attn.scaling"),
    # Foundation: measurement helpers, and the mesh + the one logical-axis rules table, which the MoE's
    # shard_map specs and the fused attention kernels' per-shard maps read (sharding imports flax late).
    ("efficient_attn.measure", "efficient_attn.sharding"),
    # Pure maths and the data pipeline: peers, independent of each other.
    ("efficient_attn.attention", "efficient_attn.moe", "efficient_attn.data"),
    # What is built over them: the configs (they validate against the registries), FLOPs, Linen layers.
    ("efficient_attn.config", "efficient_attn.flops", "efficient_attn.layers"),
    # The models and what runs need beside them.
    ("efficient_attn.model", "efficient_attn.nnx", "efficient_attn.reliability", "efficient_attn.runlog",
     "efficient_attn.state"),
    # The commands.
    ("efficient_attn.bench", "efficient_attn.experiment", "efficient_attn.generate", "efficient_attn.train"),
    ("efficient_attn.cli",),
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
  """The LAYERS unit `module` belongs to (the longest one that is it or a package above it; the root
  package only as itself)."""
  parts = module.split(".")
  for n in range(len(parts), 1, -1):
    if ".".join(parts[:n]) in LEVEL:
      return ".".join(parts[:n])
  return module if module in LEVEL else None


@functools.cache
def package_modules() -> dict[str, str]:
  """Dotted name -> file, for every module of the package."""
  root = os.path.dirname(PACKAGE_DIR)
  out = {}
  for dirpath, _, files in os.walk(PACKAGE_DIR):
    for f in files:
      if f.endswith(".py"):
        parts = os.path.relpath(os.path.join(dirpath, f[:-3]), root).split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(dirpath, f)
  return out


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
  """module -> {efficient_attn module it imports: line}, over every import statement in the module
  (module-level or inside a function). `from X import Y` is an import of X.Y where X.Y is a module."""
  modules = package_modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    edges = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package `level - 1` steps up
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      for t in targets:
        if t in modules and t != name:
          edges.setdefault(t, node.lineno)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
  """One import cycle [a, b, ..., a], or None (depth-first search, white / grey / black)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "grey"
    stack.append(m)
    for t in sorted(graph.get(m, {})):
      if state.get(t) == "grey":
        return stack[stack.index(t):] + [t]
      if t not in state:
        cycle = visit(t)
        if cycle:
          return cycle
    stack.pop()
    state[m] = "black"
    return None

  for m in sorted(graph):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_every_module_has_a_layer():
  unplaced = sorted(m for m in package_modules() if unit_of(m) is None)
  assert not unplaced, f"modules missing from LAYERS in {__file__}: {unplaced}"


def test_no_import_cycles():
  graph = import_graph()
  cycle = find_cycle(graph)
  if cycle:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    pytest.fail("import cycle: " + " -> ".join(steps + [cycle[-1]]))


def test_imports_point_down():
  bad = []
  for module, edges in sorted(import_graph().items()):
    src = unit_of(module)
    for target, line in sorted(edges.items()):
      dst = unit_of(target)
      if src is None or dst is None or src == dst:
        continue
      if LEVEL[dst] >= LEVEL[src]:
        where = "a peer" if LEVEL[dst] == LEVEL[src] else "a higher layer"
        bad.append(f"{module} line {line} imports {target} ({where})")
  assert not bad, "imports against LAYERS:\n" + "\n".join(bad)


# Fresh interpreters, each importing its steps in order (a unit: its package and every module in it).
# A step is checked for the modules it newly loads; all that earlier steps loaded lies strictly below it
# (or, for data.build, in its own unit), so no step hides an import of a peer or of a higher layer.
CHAINS = (
    ("efficient_attn.errors", "efficient_attn.measure", "efficient_attn.attention"),
    ("efficient_attn.platform", "efficient_attn.sharding", "efficient_attn.moe"),
    ("efficient_attn.data.build", "efficient_attn.data"),
)
# Third-party packages a step must not load: the leaf and the tokenizing worker (`python -m
# efficient_attn.data.build`) start without JAX; the pure maths runs without Flax.
NOT_LOADED = {"efficient_attn.errors": ("jax",), "efficient_attn.data.build": ("jax",),
              "efficient_attn.measure": ("flax",), "efficient_attn.sharding": ("flax",),
              "efficient_attn.attention": ("flax",), "efficient_attn.moe": ("flax",)}
CHILD = """
import importlib, json, sys
loaded = lambda: {m for m in sys.modules if m.startswith("efficient_attn") or m in ("jax", "flax")}
for step in json.loads(sys.argv[1]):
  before = loaded()
  for m in step[1]:
    importlib.import_module(m)
  print(json.dumps([step[0], sorted(loaded() - before)]))
"""


def test_low_units_load_nothing_above_them_in_a_fresh_interpreter():
  modules = sorted(package_modules())
  root = os.path.dirname(PACKAGE_DIR)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  procs = []
  for chain in CHAINS:  # concurrently: most of each child's time is importing JAX
    steps = [(s, [m for m in modules if m == s or m.startswith(s + ".")]) for s in chain]
    procs.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(steps)], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  bad = []
  for chain, proc in zip(CHAINS, procs):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"importing {chain} failed:\n{err[-3000:]}"
    for line in out.splitlines():
      step, new = json.loads(line)
      unit = unit_of(step)
      ours = [m for m in new if m.startswith("efficient_attn")]
      above = [m for m in ours if unit_of(m) is None or unit_of(m) != unit and LEVEL[unit_of(m)] >= LEVEL[unit]]
      third = [p for p in NOT_LOADED.get(step, ()) if p in new]
      if above or third:
        bad.append(f"import {step} loaded {above + third}; all it loaded: {ours}")
  assert not bad, "\n".join(bad)
