"""The package's dependency directions (WORKSPACE.md draws the map).

Every module's imports, top-level and inside functions alike, are read with `ast`; a package
may import only packages of a lower layer. So the core (attention, models, diffusion, ...)
never imports the official adapter, the sampling or training applications or a project, and
no two packages import each other.
"""

import ast
import gc
import pathlib

import magi_jax

ROOT = pathlib.Path(magi_jax.__file__).parent

# A package may import the packages of lower layers only (and itself).
LAYERS = (
    ("errors", "json_file"),
    ("configs", "parallel", "formats", "media", "cli", "compile_cache"),
    ("attention",),
    ("models",),
    ("text", "data"),
    ("diffusion",),
    ("official",),       # mirrors the PyTorch release: layouts, strict load / export, parity
    ("convert",),        # checkpoints in and out: orbax, official (detected), random weights
    ("train",),
    ("generate",),       # sampling: official / converted weights and training runs
    ("serve",),          # the streaming web app over generate
    ("aot",),
    ("device_plan",),    # what fits on this machine: runtime, memory plan, compiler figure
    ("proj",),           # projects on top of the library (the bouncing-shapes demo)
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _parse(path: pathlib.Path) -> ast.AST:
  """ast.parse with the garbage collector held off: CPython 3.11 raises "AST constructor
  recursion depth mismatch" when a finalizer runs mid-parse (seen in CI after an earlier test
  of the worker left orbax coroutines to be collected)."""
  gc.disable()
  try:
    return ast.parse(path.read_text(), filename=str(path))
  finally:
    gc.enable()


def _package(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path):
  """(line, imported magi_jax module) of every import statement in the file."""
  tree = _parse(path)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "magi_jax":
        for alias in node.names:
          yield node.lineno, f"magi_jax.{alias.name}"
      elif node.module.startswith("magi_jax."):
        yield node.lineno, node.module
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("magi_jax."):
          yield node.lineno, alias.name


def _edges():
  for path in sorted(ROOT.rglob("*.py")):
    here = _package(_module_name(path)) or "__init__"
    for line, target in _imports(path):
      yield path.relative_to(ROOT.parent), line, here, _package(target)


def test_every_package_has_a_layer():
  packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  packages |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
  assert packages - set(LAYER) == set(), "add the new package to LAYERS"
  assert set(LAYER) - packages == set(), "LAYERS names a package that no longer exists"


def test_no_relative_imports():
  for path in ROOT.rglob("*.py"):
    for node in ast.walk(_parse(path)):
      assert not (isinstance(node, ast.ImportFrom) and node.level), (
          f"{path.relative_to(ROOT.parent)}:{node.lineno}: use absolute magi_jax imports")


def test_imports_point_down_the_layers():
  wrong = [f"{path}:{line}: {here} (layer {LAYER[here]}) imports {there} (layer {LAYER[there]})"
           for path, line, here, there in _edges()
           if here in LAYER and there != here and LAYER[there] >= LAYER[here]]
  assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_core_never_imports_the_adapter_or_a_project():
  core = {name for name, i in LAYER.items() if i < LAYER["official"]}
  wrong = [f"{path}:{line}: {here} imports {there}" for path, line, here, there in _edges()
           if here in core and there in ("official", "proj", "train", "generate", "aot")]
  assert not wrong, "\n".join(wrong)
  assert {"attention", "parallel", "models", "diffusion", "data", "media", "text"} <= core


def test_the_layer_test_sees_a_violation(tmp_path):
  """The import reader finds an edge written inside a function (the lazy-import form)."""
  bad = tmp_path / "m.py"
  bad.write_text("def f():\n  from magi_jax.proj.bouncing import world\n"
                 "  import magi_jax.train.step\nfrom magi_jax import official\n")
  assert sorted(_imports(bad)) == [(2, "magi_jax.proj.bouncing"), (3, "magi_jax.train.step"),
                                   (4, "magi_jax.official")]
