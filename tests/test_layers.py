"""The package's shape (docs/ARCHITECTURE.md): no import circle, no arrow back up the layers, and a
thin command line.

Read from the source with `ast`, so every import counts - those at module level and those inside
functions (a lazy import still ties two modules together) - except the ones under
`if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_lm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# What cli.py may import besides the library: typer and rich, and the standard library's plumbing
# for a command line - argv and the exit status, paths as option types, type hints, --json output,
# and building prepare's options from their dataclass (data.prepare.PrepareOptions). Nothing that
# measures, computes or decides (no resource, os, time, math...).
CLI_ALLOWED = {"typer", "rich", "__future__", "sys", "pathlib", "typing", "json", "dataclasses", "inspect"}

MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}

# The layers of docs/ARCHITECTURE.md's picture, bottom up. A module imports from its own layer or
# those below, never from above; a new module has to be placed here (and in the picture).
LAYERS = [
    ("helpers", ["moe_lm", "moe_lm.errors", "moe_lm.checks", "moe_lm.config", "moe_lm.signals", "moe_lm.files",
                 "moe_lm.device", "moe_lm.stats", "moe_lm.plots"]),
    ("model and data", ["moe_lm.distributed", "moe_lm.model", "moe_lm.model.transformer", "moe_lm.model.moe",
                        "moe_lm.model.dispatch", "moe_lm.model.cpu_kernel", "moe_lm.model.gemm", "moe_lm.model.routing", "moe_lm.model.losses", "moe_lm.model.lm_loss",
                        "moe_lm.model.accounting", "moe_lm.data", "moe_lm.data.sources", "moe_lm.data.tokenizer",
                        "moe_lm.data.bpe_worker", "moe_lm.data.shards", "moe_lm.hf_format", "moe_lm.routing_page"]),
    ("training's parts, reading runs", ["moe_lm.training", "moe_lm.training.load", "moe_lm.training.alarm",
                                        "moe_lm.training.display", "moe_lm.training.metrics",
                                        "moe_lm.training.checkpoint", "moe_lm.training.step",
                                        "moe_lm.training.evaluator", "moe_lm.training.runs", "moe_lm.loading"]),
    ("the commands' library side", ["moe_lm.data.prepare", "moe_lm.training.trainer", "moe_lm.evaluation",
                                    "moe_lm.compare", "moe_lm.export", "moe_lm.generate", "moe_lm.bench"]),
    ("the command line", ["moe_lm.cli", "moe_lm.__main__"]),
]
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import statement of module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def edges(name: str) -> set[str]:
    """The moe_lm modules that module `name` imports (`from . import checks` imports moe_lm.checks)."""
    out = set()
    for target, names, _ in imports(name):
        if not (target == "moe_lm" or target.startswith("moe_lm.")):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        out.update(subs or [target])
        if subs and len(subs) < len(names):  # names taken from the package itself too
            out.add(target)
    out.discard(name)
    return out


def cycles() -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), by Tarjan."""
    graph = {m: sorted(edges(m)) for m in MODULES}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_the_reader_sees_lazy_imports_and_resolves_relative_ones():
    # guards the two tests below against passing because they read nothing
    assert "moe_lm.training.trainer" in MODULES and "moe_lm.cli" in MODULES
    assert "moe_lm.config" in edges("moe_lm.training.trainer")
    assert "moe_lm.training.trainer" in edges("moe_lm.cli")  # imported inside the train command


def test_no_module_imports_a_module_that_imports_it_back():
    assert cycles() == []


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYER)) == [] and sorted(set(LAYER) - set(MODULES)) == []


def test_no_module_imports_from_a_layer_above_its_own():
    up = [f"{m} ({LAYERS[LAYER[m]][0]}) imports {e} ({LAYERS[LAYER[e]][0]})"
          for m in sorted(MODULES) for e in sorted(edges(m)) if LAYER[e] > LAYER[m]]
    assert up == []


def test_the_command_line_imports_only_the_library_typer_and_rich():
    found = []
    for target, names, line in imports("moe_lm.cli"):
        root = target.split(".")[0]
        if root == "moe_lm":
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if private or any(part.startswith("_") for part in target.split(".")):
                found.append(f"line {line}: private {target} {private}")
        elif root not in CLI_ALLOWED:
            found.append(f"line {line}: {target}")
    source = MODULES["moe_lm.cli"].read_text(encoding="utf-8")
    assert "importlib" not in source and "__import__" not in source  # no import the reader cannot see
    assert found == []
