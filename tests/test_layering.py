"""The package's layers: the core (methods, compression, plumbing, models, accounting) is a library that imports without
the harness's hosts, and no module imports one that imports it back."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dycoke_eval"

CORE = ["dycoke_eval.methods", "dycoke_eval.compression.dispatcher", "dycoke_eval.compression.stages",
        "dycoke_eval.plumbing.attention", "dycoke_eval.plumbing.cache", "dycoke_eval.plumbing.hooks",
        "dycoke_eval.plumbing.counting", "dycoke_eval.models", "dycoke_eval.accounting",
        "dycoke_eval.offline.real_size", "dycoke_eval.timing", "dycoke_eval.config"]  # fmt: skip
BLOCKED = ("lmms_eval", "hydra", "omegaconf", "av")

BLOCKING = f"""
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"imported {{name}}")

sys.meta_path.insert(0, Blocked())
"""  # a program's first lines: importing any of BLOCKED fails, as on a machine without them
PROGRAM = (
    BLOCKING
    + f"""
import importlib, pkgutil
for module in {CORE!r}:
    importlib.import_module(module)
import dycoke_eval.methods as methods
for info in pkgutil.iter_modules(methods.__path__):
    importlib.import_module(f"dycoke_eval.methods.{{info.name}}")
"""
)


def test_the_core_imports_without_lmms_eval_hydra_omegaconf_or_pyav():
    """What `scripts/bench_gpu.py` needs on a GPU machine that has only torch and transformers."""
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file: at module level, in a function, or for typing."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from the importing module's package
                above = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*above, base] if base else above)
            targets += [base, *(f"{base}.{alias.name}" for alias in node.names)]  # `from pkg import module` imports it
    found = set()
    for target in targets:
        while target and target not in modules:  # `from module import name`: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    """Counting every import, lazy ones in functions included: a cycle is a layering fault even where Python tolerates it."""
    modules = module_names()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(cycle) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(cycle))}" for m in cycle) + ")" for cycle in found
    )


def test_every_import_counts_lazy_relative_and_typing_ones_and_a_cycle_is_found(tmp_path):
    module = tmp_path / "groups.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nfrom . import cells\nfrom .models.base import EncodedVideo\n"
        "if TYPE_CHECKING:\n    from dycoke_eval.store import SampleRecord\n"
        "def run():\n    import dycoke_eval.wrapper\n    from dycoke_eval.models import adapter_class\n"
    )
    names = ["cells", "groups", "models", "models.base", "store", "wrapper"]
    modules = {f"dycoke_eval.{name}": Path() for name in names}
    imported = {"cells", "models", "models.base", "store", "wrapper"}
    assert imported_modules("dycoke_eval.groups", module, modules) == {f"dycoke_eval.{name}" for name in imported}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == [["a", "b", "c"]]
