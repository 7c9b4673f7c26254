"""The layering the architecture page draws, checked on the source: which package may import which,
no import cycles, no private names across modules, and every module saying what it is for."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imaging", "shards", "data_prep", "pipeline")
# What each layer may import from the project: imaging and shards are the shared bottom layer;
# data_prep writes shards and pipeline reads them, neither importing the other except for the
# demo, which the trainer prepares on first use.
ALLOWED = {
    "imaging": {"imaging"},
    "shards": {"shards"},
    "data_prep": {"data_prep", "imaging", "shards"},
    "pipeline": {"pipeline", "imaging", "shards", "data_prep.demo"},
}

# Inside the trainer: the parts of pipeline each part may use (besides itself and the layers above).
PIPELINE_PARTS = {
    "pipeline.config": set(),
    "pipeline.models": set(),
    "pipeline.data": {"pipeline.config"},
    "pipeline.ops": {"pipeline.config", "pipeline.models"},  # models: the k8s grace period from the model's size
    "pipeline.train": {"pipeline.config", "pipeline.models", "pipeline.data", "pipeline.ops"},
    "pipeline.inference": {"pipeline.config", "pipeline.models", "pipeline.data", "pipeline.ops", "pipeline.train"},
    "pipeline.commands": set(),  # runs each tool by its module's name (googlenet COMMAND), imports none
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports(name: str, path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every project import in a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # "from package import module"
                    found.append((sub, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return found


def allowed(importer: str, imported: str) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in ALLOWED[importer.split(".")[0]])


def test_each_layer_imports_only_the_layers_below_it():
    crossing = [f"{path.relative_to(ROOT)}:{line}: {imported}"
                for name, path in MODULES.items() for imported, _, line in imports(name, path)
                if not allowed(name, imported)]
    assert not crossing, "imports across layers:\n" + "\n".join(crossing)


def test_the_trainer_parts_import_only_the_parts_below_them():
    crossing = []
    for name, path in MODULES.items():
        part = ".".join(name.split(".")[:2])
        if not name.startswith("pipeline.") or part not in PIPELINE_PARTS:
            continue
        for imported, _, line in imports(name, path):
            other = ".".join(imported.split(".")[:2])
            if imported.startswith("pipeline.") and other != part and other not in PIPELINE_PARTS[part]:
                crossing.append(f"{path.relative_to(ROOT)}:{line}: {imported}")
    assert not crossing, "imports against the trainer's layering:\n" + "\n".join(crossing)
    assert set(PIPELINE_PARTS) >= {".".join(n.split(".")[:2]) for n in MODULES if n.startswith("pipeline.")}


def test_no_import_cycles():
    graph = {name: {i for i, _, _ in imports(name, path, top_level_only=True) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    graph_all = {name: {i for i, _, _ in imports(name, path) if i in MODULES and i != name}
                 for name, path in MODULES.items()}
    for g, kind in ((graph, "at import time"), (graph_all, "including imports inside functions")):
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node):
            state[node] = 1
            stack.append(node)
            for nxt in sorted(g[node]):
                if state.get(nxt) == 1:
                    pytest.fail(f"import cycle {kind}: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
                if nxt not in state:
                    visit(nxt)
            stack.pop()
            state[node] = 2

        for node in sorted(g):
            if node not in state:
                visit(node)


def test_no_private_names_across_modules():
    private = [f"{path.relative_to(ROOT)}:{line}: {n} from {imported}"
               for name, path in MODULES.items() for imported, names, line in imports(name, path)
               for n in names if n.startswith("_") and imported != name]
    assert not private, "\n".join(private)


def test_every_module_and_package_says_what_it_is_for():
    missing = [str(path.relative_to(ROOT)) for path in MODULES.values()
               if path.name != "__main__.py" and not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_reading_a_config_loads_neither_pillow_nor_torch_nor_the_c_library():
    code = ("import sys; from pipeline.config import load_config; load_config(None, []); "
            "print(' '.join(m for m in ('PIL', 'torch', 'ctypes', 'imaging.jpeg_region') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
