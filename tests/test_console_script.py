"""The ``sparsegpt`` console script: its dispatch and the users command (the import rules are
in tests/test_architecture.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import REPO


def test_cli_dispatches_prune_to_the_engine():
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "prune", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "sparsity" in result.stdout
    result = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert all(cmd in result.stdout for cmd in ("serve", "worker", "prune", "users"))


def test_users_add_prints_the_token_once_and_stores_its_hash(tmp_path):
    import os
    import sqlite3

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",) and not k.startswith("SPARSEGPT_")}
    env["SPARSEGPT_DATA_DIR"] = str(tmp_path)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "users", *args], cwd=REPO, env=env, capture_output=True, text=True
        )

    added = run("add", "alice", "--admin")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("sgpt_") and len(token) > 40
    assert run("add", "alice").returncode == 1
    assert "alice\tadmin" in run("list").stdout
    import hashlib

    rows = sqlite3.connect(tmp_path / "sparsegpt.db").execute("SELECT name, token_hash FROM users").fetchall()
    assert rows == [("alice", hashlib.sha256(token.encode()).hexdigest())]
