"""The import graph of normops: data flows one way (STYLE.md), so no module imports one that imports
it back, and the Triton kernels import nothing of normops but themselves.

The graph comes from the source, not from running it: every ``normops/**/*.py`` and ``kernels/*.py``
(installed as ``normops.kernels``) parsed with ``ast``, relative imports resolved against the
importing module's package. ``from pkg import name`` is an edge to ``pkg.name`` where that is a
module, else to ``pkg``. Importing a submodule also runs its parent packages' ``__init__``; those
implicit edges are left out, as Python itself resolves them before the submodule.
"""
import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sources():
    """{module name: (path, is a package __init__)} for normops and normops.kernels."""
    paths = {p: p.relative_to(ROOT).with_suffix("").parts for p in (ROOT / "normops").rglob("*.py")
             if "_launcher" not in p.parts}  # the console script's launcher: a top-level module, not normops
    paths.update({p: ("normops", "kernels", p.stem) for p in (ROOT / "kernels").glob("*.py")})
    out = {}
    for path, parts in paths.items():
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


MODULES = _sources()


def _imports(nodes):
    """The import statements among ``nodes``: at module level, those directly in the module body and in
    its top-level ``if``/``try`` blocks (they run at import); else every one, inside functions too."""
    stack, found = list(nodes), []
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            stack.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name, module_level=True):
    """The normops modules that module ``name`` imports: at module level only (what runs when it is
    imported), or anywhere in it (functions' lazy imports too)."""
    path, package = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = _imports(tree.body) if module_level else [n for n in ast.walk(tree)
                                                       if isinstance(n, (ast.Import, ast.ImportFrom))]
    here = name.split(".") if package else name.split(".")[:-1]
    targets = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
            continue
        base = here[:len(here) - node.level + 1] if node.level else []
        module = ".".join(base + ([node.module] if node.module else []))
        targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names)
    return {t for t in targets if t in MODULES and t != name}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package():
    """The parse finds the modules and their imports, so the tests below cannot pass on an empty graph."""
    assert {"normops", "normops.check", "normops.models.runner", "normops.kernels.row_norm"} <= set(MODULES)
    assert "normops.models.train" in imports_of("normops.models.resnet")
    assert "normops.backends" in imports_of("normops.check")
    assert imports_of("normops.models.runner") >= {f"normops.models.{m}" for m in
                                                   ("resnet", "transformer", "unet", "cyclegan", "lstm")}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_at_module_level():
    """What runs at import: a cycle here makes a module see a half-initialized one, and which name is
    missing depends on which module was imported first."""
    assert cycles({m: imports_of(m) for m in MODULES}) == []


def test_no_import_cycle_counting_imports_inside_functions():
    """A lazy import inside a function only hides a cycle: the models and the runner over them once
    imported each other this way (models/train.py imported every model, every model imported it)."""
    assert cycles({m: imports_of(m, module_level=False) for m in MODULES}) == []


def test_kernels_import_nothing_of_normops_but_kernels_and_core():
    """The kernels sit on the bottom floor (STYLE.md): of normops, only normops.kernels.* and
    normops.core below them, lazily or not."""
    above = {m: sorted(t for t in imports_of(m, module_level=False)
                       if not t.startswith("normops.kernels") and t != "normops.core")
             for m in MODULES if m.startswith("normops.kernels")}
    assert {m: t for m, t in above.items() if t} == {}


def test_core_imports_nothing_of_normops():
    assert [t for t in imports_of("normops.core", module_level=False) if t.startswith("normops")] == []


def test_no_private_name_imported_across_modules():
    """`from module import _name` reaches into another module's internals: what is shared is public."""
    private = []
    for path in sorted(ROOT.glob("normops/**/*.py")) + sorted(ROOT.glob("kernels/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []
