"""The test session's Hugging Face Hub cache: the state of a server that fetched a few Hub models
and the built-in datasets once (their config.json, and a file of each dataset), so that jobs naming
them are accepted at submit on this offline machine (the API refuses a Hub model or a built-in set
that is neither reachable nor cached: app/services/specs.py). The jobs the tests queue with them
never run: nothing here holds weights or text.

``HF_HUB_CACHE`` points at it for the whole session (tests/conftest.py sets it before anything
imports huggingface_hub); a test that needs an empty cache sets its own HF_HOME / HF_HUB_CACHE.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# Hub ids the tests submit and expect to be queued (never run); outside/secretmodel's seeded config
# (no weights) lets a job reach the worker, which must not load the directory of that name beside it
# (tests/worker/test_local_dirs.py)
MODELS = ("facebook/opt-125m", "org/name", "org/model", "org/m", "outside/secretmodel")
DATASETS = (
    "allenai/c4",
    "Salesforce/wikitext",
    "ptb-text-only/ptb_text_only",
)  # worker.engine.contract.hub.DATASET_REPOS
REVISION = "0" * 40


def seed(root: Path | None = None) -> Path:
    """A hub cache holding MODELS' config.json and a marker file of each of DATASETS."""
    root = Path(root or tempfile.mkdtemp(prefix="sparsegpt-test-hub-"))
    for repo in MODELS:
        org, _, name = repo.partition("/")
        base = root / f"models--{org}--{name}"
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(REVISION)
        snapshot = base / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps({"model_type": "opt", "_seeded_by": "tests"}))
    for repo in DATASETS:
        org, _, name = repo.partition("/")
        base = root / f"datasets--{org}--{name}" / "snapshots" / REVISION
        base.mkdir(parents=True, exist_ok=True)
        (base / "README.md").write_text("seeded by tests/support/hub_cache.py\n")
    return root
