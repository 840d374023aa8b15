"""The artifact through the shared store, measured: the archive of a model directory hashed
locally (what a worker does without SPARSEGPT_STORAGE_URL) against the same archive streamed
into an S3 server while it is made and hashed (app.storage.S3Store.put_stream), and read back
whole and as a 16 MiB range. One run, one machine; the store is moto's server mode on loopback
(started here), so it shows the service's own overhead, not a network's.

    .venv/bin/python -m benchmarks.storage [MODEL_DIR]   (default models/smollm2-135m)
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

from app import archive
from app.storage import S3Store

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    model = Path(argv[0]) if argv else REPO / "models" / "smollm2-135m"
    if not (model / "config.json").exists():
        print(f"no model directory at {model} (run benchmarks/prepare_model.py)")
        return 1
    import os

    from tests.support.cluster import S3Server

    server = S3Server(Path(tempfile.mkdtemp(prefix="bench-s3-")))
    server.start()
    try:
        os.environ.update(server.env())
        server.client().create_bucket(Bucket="bench")
        store = S3Store("s3://bench/run")
        name = "sparsegpt-job-1"
        t0 = time.perf_counter()
        size, sha_local = archive.digest(model, name)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        url, size_s3, sha_s3 = store.put_stream(f"artifacts/1/{name}.tar", archive.iter_tar(model, name))
        put_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = hashlib.sha256()
        for chunk in store.iter_range(url):
            back.update(chunk)
        get_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        part = b"".join(store.iter_range(url, size // 2, size // 2 + 16 * 2**20))
        range_s = time.perf_counter() - t0
    finally:
        server.stop()
    assert (size_s3, sha_s3) == (size, sha_local) and back.hexdigest() == sha_local and len(part) == 16 * 2**20
    mb = size / 1e6
    print(f"archive of {model.name}: {mb:.0f} MB, sha256 {sha_local[:16]}... (the same through the store)")
    print(f"local hash (no store):            {local_s:6.2f} s  {mb / local_s:7.0f} MB/s")
    print(
        f"streamed into the store + hashed: {put_s:6.2f} s  {mb / put_s:7.0f} MB/s  ({put_s / local_s:.1f}x the "
        "local hash)"
    )
    print(f"read back whole:                  {get_s:6.2f} s  {mb / get_s:7.0f} MB/s")
    print(f"16 MiB range from the middle:     {range_s:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
