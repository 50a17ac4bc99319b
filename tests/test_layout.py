"""The layout: floors drawn from the imports, held against the README's list; module sizes.

A room is a top-level module or a subpackage of bepa_jax; its floor is one above the highest
room it imports (function-level imports included). No cycles, at most 7 floors, no library
imports a command, and the README's layout block names every room on its floor.
"""
import ast
import os
import re

from tests.conftest import REPO

PKG = os.path.join(REPO, "bepa_jax")


def _room(module: str) -> str | None:
  parts = module.split(".")
  if parts[0] != "bepa_jax" or len(parts) < 2:
    return None
  name = parts[1]
  return name + "/" if os.path.isdir(os.path.join(PKG, name)) else name + ".py"


def _imports() -> dict[str, set[str]]:
  """room -> rooms it imports, from every .py file under bepa_jax/."""
  out: dict[str, set[str]] = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(d, f)
      rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
      if rel == "bepa_jax.__init__":  # the package's face: imports nothing
        continue
      room = _room(rel if not rel.endswith("__init__") else rel[:-len(".__init__")] + ".x")
      if room is None:
        continue
      deps = out.setdefault(room, set())
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                   if node.module == "bepa_jax"]
        for n in names:
          target = _room(n)
          if target and target != room:
            deps.add(target)
  return out


def _floors(graph: dict[str, set[str]]) -> dict[str, int]:
  floors: dict[str, int] = {}

  def floor(room, path=()):
    assert room not in path, f"import cycle: {' -> '.join(path + (room,))}"
    if room not in floors:
      floors[room] = 1 + max((floor(d, path + (room,)) for d in graph.get(room, ())), default=0)
    return floors[room]
  for room in graph:
    floor(room)
  return floors


def _readme_floors() -> dict[str, int]:
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  block = text[text.index("## Layout"):]
  block = block[block.index("```") + 3:]
  block = block[:block.index("```")]
  floors, current = {}, 0
  for line in block.splitlines():
    m = re.match(r"F(\d)\s", line)
    if m:
      current = int(m.group(1))
    head = line[4:].split("  ")[0] if line.strip() else ""
    for name in re.findall(r"[a-z_]+(?:\.py|/)", head):
      floors[name] = current
  return floors


def test_no_cycle_at_most_seven_floors_and_the_readme_lists_each_room_on_its_floor():
  graph = _imports()
  floors = _floors(graph)
  assert max(floors.values()) <= 7, floors
  readme = _readme_floors()
  assert readme == floors, {k: (readme.get(k), floors.get(k))
                            for k in set(readme) | set(floors) if readme.get(k) != floors.get(k)}


def test_libraries_never_import_a_command_or_a_room_above_them():
  graph = _imports()
  floors = _floors(graph)
  for room, deps in graph.items():
    if room != "cli/":
      assert "cli/" not in deps, f"{room} imports bepa_jax.cli"
    for d in deps:
      assert floors[d] < floors[room], f"{room} (floor {floors[room]}) imports {d} ({floors[d]})"


def test_modules_under_450_lines_and_functions_under_80():
  long_modules, long_functions = [], []
  for d, _, files in os.walk(PKG):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(d, f)
      rel = os.path.relpath(path, REPO)
      text = open(path, encoding="utf-8").read()
      if len(text.splitlines()) > 450 and rel != os.path.join("bepa_jax", "config", "defaults.py"):
        long_modules.append(rel)
      for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
            node.end_lineno - node.lineno + 1 > 80) and node.name != "get_config":
          long_functions.append(f"{rel}:{node.name}")
  assert not long_modules and not long_functions, (long_modules, long_functions)
