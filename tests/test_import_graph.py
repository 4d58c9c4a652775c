"""The package's layers point one way: no import cycle (imports inside functions count),
and no model module imports porting (porting stands on the models, not under them)."""
import ast
import pathlib

import bitdance_jax

ROOT = pathlib.Path(bitdance_jax.__file__).parent
MODEL_MODULES = ("bitdance_jax.nn", "bitdance_jax.c2i.model", "bitdance_jax.c2i.config",
                 "bitdance_jax.t2i.model", "bitdance_jax.tokenizer.model")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("bitdance_jax",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its file). ``from pkg import x``
    is an edge to ``pkg.x`` when that is a module, else to ``pkg``; the parents a dotted
    import runs implicitly are not edges (every module would reach ``bitdance_jax``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        edges.add(f"{base}.{a.name}")
                    elif base in modules:
                        edges.add(base)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _is_model(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in MODEL_MODULES)


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_counts_imports_inside_functions():
    graph = import_graph()
    assert "bitdance_jax.porting.cli" in graph["bitdance_jax.hub"]   # imported late in hub.resolve


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_do_not_import_porting():
    bad = sorted(f"{a} -> {b}" for a, edges in import_graph().items() if _is_model(a)
                 for b in edges if b == "bitdance_jax.porting" or b.startswith("bitdance_jax.porting."))
    assert not bad, "model modules import porting: " + "; ".join(bad)
