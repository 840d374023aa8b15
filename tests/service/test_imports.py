"""The import rules of DESIGN.md: the API never imports the worker or torch; the worker's
main process does not import torch either (only the task does, in the pool's child)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_app_never_imports_worker():
    offenders = []
    for path in (REPO / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "worker" or n.startswith(("worker.", "torch")) or n == "torch" for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    # app/cli.py dispatches to the worker and the engine lazily, inside its subcommands.
    assert [o for o in offenders if not o.startswith("app/cli.py")] == []


def test_api_and_worker_main_process_load_no_torch():
    code = (
        "import sys, app.main, app.serve, app.cli, worker.celery_app, worker.tasks, worker.reporter\n"
        "app.main.create_app()\n"
        "bad = [m for m in ('torch', 'transformers', 'worker.engine.pipeline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_dispatches_prune_to_the_engine():
    result = subprocess.run([sys.executable, "-m", "app.cli", "prune", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "sparsity" in result.stdout
    result = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert all(cmd in result.stdout for cmd in ("serve", "worker", "prune", "users"))


def test_users_add_prints_the_token_once_and_stores_its_hash(tmp_path):
    import os
    import sqlite3

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",) and not k.startswith("SPARSEGPT_")}
    env["SPARSEGPT_DATA_DIR"] = str(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "-m", "app.cli", "users", *args], cwd=REPO, env=env,
                                       capture_output=True, text=True)
    added = run("add", "alice", "--admin")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("sgpt_") and len(token) > 40
    assert run("add", "alice").returncode == 1
    assert "alice\tadmin" in run("list").stdout
    import hashlib

    rows = sqlite3.connect(tmp_path / "sparsegpt.db").execute("SELECT name, token_hash FROM users").fetchall()
    assert rows == [("alice", hashlib.sha256(token.encode()).hexdigest())]
