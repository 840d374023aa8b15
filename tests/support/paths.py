"""Where the tests find the repository and the project's shared data.

The shared data (WikiText-2, the benchmark protocol's texts) lives outside the repository: its
location is ``SPARSEGPT_SHARED_DATA``, by default ``../shared/data`` beside the checkout. Tests
that need it skip with that name when it is missing; the rest fall back to built-in text.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("SPARSEGPT_SHARED_DATA", REPO.parent / "shared" / "data")).expanduser()
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"
