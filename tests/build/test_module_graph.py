"""The packages' module graph points one way (no import cycles, lazy imports included), and the reference that every
kernel test trusts shares no code with what it checks."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("rlhfv_kernels", "rlhfv_train", "experiments")


def module_files():
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield module.removesuffix(".__init__"), path, name == "__init__.py"


def imports_of(module, path, is_package):
    """Modules of our packages that `module` imports anywhere in its body (a parent package's __init__ is not
    counted as imported: it runs first in any case)."""
    known = {m for m, _, _ in module_files()}
    here = module if is_package else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if node.module:  # `from . import x` imports x, not the package itself
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != module and not module.startswith(m + ".")}


def graph():
    return {module: imports_of(module, path, is_package) for module, path, is_package in module_files()}


def find_cycle(edges):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read():
    edges = graph()
    assert "rlhfv_kernels._backend" in edges["rlhfv_kernels._ops"]
    assert "rlhfv_kernels._ops" in edges["rlhfv_kernels.triton.ops"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    edges = {m: deps for m, deps in graph().items() if m.startswith(package)}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_reference_is_self_contained():
    """The oracle imports only torch, the output types and the parameters' docs (_param_docs.stamp, which touches
    docstrings only): no validation, backend or loss code of ours."""
    path = os.path.join(ROOT, "rlhfv_kernels", "reference.py")
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert (all(alias.name.endswith("Output") for alias in node.names)
                    or (node.module == "_param_docs" and [a.name for a in node.names] == ["stamp"])), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] == "torch" for alias in node.names), ast.dump(node)


LAYERS = {"files": 0, "data": 0, "models": 1, "run": 2, "eval": 3, "ddpo": 4, "grpo": 4}


def test_the_packages_import_one_way():
    """files, data <- models <- run <- eval <- ddpo / grpo (the trainers never import each other); integrations use data and
    models only; the library imports neither the experiments nor the kernels' private modules."""
    wrong = []
    for module, deps in graph().items():
        parts = module.split(".")
        if parts[0] != "rlhfv_train" or len(parts) < 2:
            continue
        wrong += [f"{module} -> {dep}" for dep in deps if dep.startswith(("experiments", "rlhfv_kernels._"))]
        for dep in deps:
            dep_parts = dep.split(".")
            if dep_parts[0] != "rlhfv_train" or len(dep_parts) < 2 or dep_parts[1] == parts[1]:
                continue
            source, target = parts[1], dep_parts[1]
            if source == "__main__":
                continue
            allowed = ({"data", "models"} if source == "integrations"
                       else {p for p, layer in LAYERS.items() if source in LAYERS and layer < LAYERS[source]})
            if target not in allowed:
                wrong.append(f"{module} -> {dep}")
    assert not wrong
