"""The import ladder: every import inside nemojax points down a floor (or stays inside its own package), and no
module imports itself back through others.

Floors, lowest first (one row of `FLOORS` each). A module belongs to the unit named by its first component under
nemojax (`nemojax.nn.moe` -> "nn", `nemojax.config` -> "config"); it may import its own unit and any unit on a
lower floor. Units on the same floor are siblings and do not import each other (quant does not import compress).
Placements beyond the target ladder (lowp <- config <- nn <- models <- model <- train / interop <- infer <-
compress, elastic, quant, align, eval <- jobs / cli):

- compress sits one floor below quant, elastic, align and eval: QAD is distillation with a fake-quantized
  student, and Elastic training distils nested submodels, so those methods build on compress's pruning and
  distillation; compress imports none of them.
- errors: the package's exception types (CheckpointError) import nothing, so every floor can raise and catch
  them; lowest floor. locks (folder lock files, used by training and by checkpoint saves) one floor up: it raises
  errors' CheckpointError and needs nothing else.
- families: the registry of model families and layer kinds imports nothing of nemojax (its built-in entries are
  loaded by module name on first lookup), and config validates patterns against it, so it sits below config.
- presets, data, config_files: beside config, one floor up (presets are ModelConfigs; data pipelines and the
  loader of ml_collections config files need nothing of the model).
- kinds: the built-in layer-kind entries describe nn modules, so they sit beside models.
- jobs (the `nemojax` command's jobs and the demo's figures) below cli, which runs them; cli and __init__ (the
  public API) at the top.

Imports are read with `ast` from the source, all of them: module level, inside functions (lazy imports), inside
`if TYPE_CHECKING:`. An import of a package (`from nemojax import data`) counts as an import of that package's
`__init__`. `pallas_kernels` depends on JAX alone: nothing in it imports nemojax.

`EXCEPTIONS` lists the upward imports that are known and allowed for now, each with its reason; an excepted import
is excused in the cycle check too (a cycle that needs it is the same debt). The test also fails when one of them
is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOORS: tuple[tuple[str, ...], ...] = (
    ("lowp", "errors"),
    ("families", "locks"),
    ("config",),
    ("presets", "data", "config_files"),
    ("nn",),
    ("models", "kinds"),
    ("model",),
    ("train", "interop"),
    ("infer",),
    ("compress",),
    ("quant", "elastic", "align", "eval"),
    ("jobs",),
    ("cli", "__init__"),
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}

# (importing module, imported module) -> why it is allowed for now.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(source: str, name: str, is_package: bool, is_module=_is_module) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in `source`, the module `name` (a package when
    `is_package`). `from a import b` imports a.b when that is a module, else a."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                child = f"{origin}.{alias.name}"
                found.append((child if is_module(child) else origin, node.lineno))
    return found


def unit(module: str) -> str:
    """nemojax.nn.moe -> "nn"; nemojax.config -> "config"; nemojax -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward(source_module: str, target: str) -> bool:
    """Whether `source_module` importing `target` (both nemojax modules) goes up or sideways on the ladder."""
    a, b = unit(source_module), unit(target)
    for u in (a, b):
        if u not in FLOOR:
            raise ValueError(f"nemojax.{u} has no floor: place it in FLOORS (tests/test_import_ladder.py)")
    return a != b and FLOOR[b] >= FLOOR[a]


def package_imports(package: str) -> dict[str, list[tuple[str, int]]]:
    """module -> its imports of `package` modules, for every .py file of the package."""
    graph = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = module_name(path)
        found = imports_of(path.read_text(), name, path.name == "__init__.py")
        graph[name] = [(t, line) for t, line in found if t == package or t.startswith(package + ".")]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def nemojax_imports() -> dict[str, list[tuple[str, int]]]:
    return package_imports("nemojax")


def test_every_unit_has_a_floor(nemojax_imports):
    missing = sorted({unit(m) for m in nemojax_imports} - set(FLOOR))
    assert not missing, f"units without a floor (place them in FLOORS): {missing}"


def test_no_upward_imports(nemojax_imports):
    offending = [f"{m}:{line} imports {t} ({unit(m)} is floor {FLOOR[unit(m)]}, {unit(t)} floor {FLOOR[unit(t)]})"
                 for m, found in nemojax_imports.items() for t, line in dict.fromkeys(found)
                 if m != "nemojax" and upward(m, t) and (m, t) not in EXCEPTIONS]
    assert not offending, "imports that go up or sideways on the ladder:\n" + "\n".join(offending)


def test_exceptions_are_still_needed(nemojax_imports):
    present = {(m, t) for m, found in nemojax_imports.items() for t, _ in found}
    stale = [pair for pair in EXCEPTIONS if pair not in present]
    assert not stale, f"these exceptions no longer occur; delete them from EXCEPTIONS: {stale}"


def test_no_import_cycles(nemojax_imports):
    graph = {m: {t for t, _ in found if t in nemojax_imports and (m, t) not in EXCEPTIONS}
             for m, found in nemojax_imports.items()}
    found = cycles(graph)
    assert not found, "import cycles (modules that import each other, directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_pallas_kernels_import_no_nemojax():
    offending = [f"{m}:{line} imports {t}" for m, found in package_imports("pallas_kernels").items()
                 for path in [ROOT.joinpath(*m.split("."))]
                 for t, line in imports_of((path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
                                           .read_text(), m, path.is_dir())
                 if t == "nemojax" or t.startswith("nemojax.")]
    assert not offending, "pallas_kernels must depend on JAX alone:\n" + "\n".join(offending)


def test_checker_catches_hand_made_cases():
    """The checker on hand-written sources: a lazy upward import inside a function, a relative import, a package
    import, a sideways import between sibling units, and a two-module cycle."""
    source = ("import jax\n"
              "from nemojax.lowp import fake\n"
              "def f():\n"
              "    from nemojax.quant import transform\n"
              "    return transform\n"
              "from . import linear\n"
              "from nemojax import data\n")
    modules = {"nemojax.lowp.fake", "nemojax.quant.transform", "nemojax.nn.linear", "nemojax.data"}
    found = imports_of(source, "nemojax.nn.moe", False, is_module=modules.__contains__)
    assert found == [("jax", 1), ("nemojax.lowp.fake", 2), ("nemojax.nn.linear", 6), ("nemojax.data", 7),
                     ("nemojax.quant.transform", 4)]
    assert [t for t, _ in found if t.startswith("nemojax") and upward("nemojax.nn.moe", t)] == [
        "nemojax.quant.transform"]
    assert upward("nemojax.quant.aware", "nemojax.elastic.masks")  # siblings on one floor
    assert upward("nemojax.compress.distill", "nemojax.quant.aware")
    assert not upward("nemojax.jobs.minitron", "nemojax.infer.validation")
    assert not upward("nemojax.infer.generate", "nemojax.infer.speculative")  # inside one unit
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    with pytest.raises(ValueError, match="nemojax.vision has no floor"):
        upward("nemojax.vision.vit", "nemojax.nn.linear")
