"""The import rules of the README's architecture section, and the size of the rooms.

- ``worker/engine`` imports nothing of ``app``, ``worker`` (outside the engine), Celery, the web
  framework or the database: it runs alone from the CLI and from Python.
- ``app`` never imports ``worker``, except the job spec (``worker.engine.contract.spec``, torch-free);
  ``app/cli.py`` dispatches to the worker and the engine lazily, inside its subcommands.
- The API process and the worker's main process load no torch (only the task does, in the
  pool's child), and neither does the spec.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.support.paths import REPO

ENGINE_FORBIDDEN = ("app", "worker", "celery", "fastapi", "starlette", "sqlalchemy", "redis", "kombu")
MAX_MODULE_LINES = 420


def imports(package: str) -> list[tuple[str, int, str]]:
    """(file, line, imported module) of every import statement under ``package``."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(REPO)), node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((str(path.relative_to(REPO)), node.lineno, node.module or ""))
    return found


def test_the_engine_imports_nothing_of_the_service():
    bad = [
        (f, line, m)
        for f, line, m in imports("worker/engine")
        if m.split(".")[0] in ENGINE_FORBIDDEN and not m.startswith("worker.engine")
    ]
    assert bad == []


CONTRACT = "worker.engine.contract"  # the torch-free contract the API and the workers share
# What the worker (outside its engine) may use of the service: the database, settings, Redis streams and
# the job's files and store; never the web layer (routes, pages, the edge, the API's services).
WORKER_USES_OF_APP = (
    "app",
    "app.config",
    "app.db",
    "app.models",
    "app.crud",
    "app.streams",
    "app.queue",
    "app.storage",
    "app.s3_store",
    "app.job_files",
    "app.mirror",
    "app.packagers",
    "app.archive",
    "app.paths",
    "app.model_links",
    "app.routing_tiers",
    "app.workers",
)


def test_app_imports_of_the_worker_are_the_contract_only():
    bad = [
        (f, line, m)
        for f, line, m in imports("app")
        if (m == "worker" or m.startswith("worker.") or m.split(".")[0] == "torch")
        and not m.startswith(CONTRACT + ".")
        and m != CONTRACT
        and f != "app/cli.py"
    ]
    assert bad == []


def test_the_workers_imports_of_the_app_are_its_data_layer_only():
    bad = [
        (f, line, m)
        for f, line, m in imports("worker")
        if (m == "app" or m.startswith("app."))
        and not any(m == a or m.startswith(a + ".") and a != "app" for a in WORKER_USES_OF_APP)
    ]
    assert bad == [], "the worker uses the web layer: " + repr(bad)


def test_the_contract_is_torch_free_and_imports_only_itself():
    bad = [
        (f, line, m)
        for f, line, m in imports("worker/engine/contract")
        if m.split(".")[0] in ("torch", "transformers", "app", "celery", "sqlalchemy", "fastapi", "redis")
        or (m.startswith("worker.") and not m.startswith(CONTRACT) and m != "worker.engine.errors")
    ]
    assert bad == []


def test_api_worker_main_process_and_spec_load_no_torch():
    code = (
        "import sys, worker.engine.contract.spec\n"
        "assert 'torch' not in sys.modules\n"
        "import app.main, app.serve, app.cli, worker.celery_app, worker.tasks, worker.reporter\n"
        "app.main.create_app()\n"
        "bad = [m for m in ('torch', 'transformers', 'worker.engine.pipeline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_module_of_app_or_worker_is_oversized():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for package in ("app", "worker")
        for p in (REPO / package).rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


# Imports made inside a function on purpose, and why (the only edges left out of the cycle check)
LAZY_ON_PURPOSE = {
    ("app.storage", "app.s3_store"): "boto3 is optional: S3Store is imported only when an s3:// store is configured",
}


def _module_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (``from a.b import c`` names a.b.c when c is a module)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        name = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [
                    f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                    for a in node.names
                ]
            else:
                continue
            edges.update(
                t for t in targets if t.split(".")[0] == package and t != name and (name, t) not in LAZY_ON_PURPOSE
            )
    return graph


def _is_module(dotted: str) -> bool:
    path = REPO / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that comes back to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue  # a package's __init__ or a name the graph does not hold
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles_in_app_or_worker():
    """No module imports, even inside a function, a module that imports it back (directly or
    through others): a cycle hidden by a function-level import still makes the two one unit."""
    for package in ("app", "worker"):
        cycle = _a_cycle(_module_graph(package))
        assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


MAX_FUNCTION_LINES = 60


def test_a_long_function_says_why():
    """A function over ~60 lines carries a comment saying why it is long ("# Long on purpose: ...")."""
    unexplained = []
    for package in ("app", "worker"):
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                    if length > MAX_FUNCTION_LINES and "# Long on purpose:" not in body:
                        unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert unexplained == []
