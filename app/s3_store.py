"""The S3 store (app/storage.py's interface): uploads, artifacts, reports and checkpoints in an
S3-compatible store every machine reaches (``SPARSEGPT_STORAGE_URL=s3://bucket/prefix``).

The API keeps uploaded calibration files there (the row's location is the object's URL), workers
fetch them into a content-addressed cache under their own data directory, stream an artifact's
package into the store while it is produced (a multipart upload, hashed in the same pass: no
archive file on any disk) and the report beside it, and the API streams downloads from it (HTTP
Range maps to the object's Range). Retention and DELETE remove the objects. The endpoint and
credentials come from the usual AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) through boto3.

Keys under the prefix: ``uploads/<sha256>.<txt|jsonl>``, ``artifacts/<job id>/<archive file>``,
``artifacts/<job id>/sparsegpt_report.json`` and ``checkpoints/<job id>/``. The data directory
stays local scratch space (the free-space check looks at it only).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from app.storage import READ_BYTES, SCHEME, StorageError, Store, file_sha256, is_stored

PART_BYTES = 8 * 1024 * 1024  # a multipart upload's parts (S3's minimum is 5 MiB but the last)
PARTS_PER_STEP = 1000  # parts grow by PART_BYTES every this many (S3 takes 10,000: 440 GB at most)
PARTS_IN_FLIGHT = 4  # parts uploading at once (memory: this many + 1 parts)


class S3Store(Store):
    """One bucket and key prefix, through a boto3 client (thread-safe, created once per process).
    Uploads fetched to this machine are cached in ``cache_dir``; files no job used for
    ``cache_max_age_s`` leave it (the store keeps the upload itself)."""

    def __init__(self, url: str, *, cache_dir: Path | None = None, cache_max_age_s: float = 0):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"SPARSEGPT_STORAGE_URL {url!r}: use s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.cache_dir, self.cache_max_age_s = cache_dir, cache_max_age_s
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.client(
                    "s3",
                    endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
                    config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
                )
            return self._client

    # --- names ---------------------------------------------------------------------------------

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(name)}"

    def location(self, name: str) -> str:
        return self.url(name)

    def holds(self, location: str | None) -> bool:
        try:
            self.key_of(location or "")
        except ValueError:
            return False
        return True

    def key_of(self, url: str) -> str:
        """The key of an object URL of this bucket (ValueError for anything else)."""
        parsed = urlparse(url)
        key = parsed.path.lstrip("/")
        if (
            parsed.scheme != "s3"
            or parsed.netloc != self.bucket
            or not key.startswith(self.key(""))
            or ".." in key.split("/")
        ):
            raise ValueError(f"{url!r} is not in this server's store ({self.url('')})")
        return key

    # --- objects ------------------------------------------------------------------------------

    def put_file(self, name: str, path: Path) -> str:
        try:
            self.client.upload_file(str(path), self.bucket, self.key(name))
        except Exception as err:  # botocore's ClientError, connection errors
            raise StorageError(f"could not store {self.url(name)}: {_reason(err)}") from err
        return self.url(name)

    def put_bytes(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, ContentType=content_type)
        except Exception as err:
            raise StorageError(f"could not store {self.url(name)}: {_reason(err)}") from err
        return self.url(name)

    def put_stream(
        self,
        name: str,
        chunks: Iterable[bytes],
        content_type: str = "application/octet-stream",
        part_bytes: int = PART_BYTES,
    ) -> tuple[str, int, str]:
        """Upload ``chunks`` as they come (multipart: parts of ``part_bytes``, larger by as much
        every ``PARTS_PER_STEP`` parts, ``PARTS_IN_FLIGHT`` uploading at once): (url, size, sha256).
        Nothing of it stays in the store if anything fails."""
        from concurrent.futures import ThreadPoolExecutor

        key, sha, size = self.key(name), hashlib.sha256(), 0
        try:
            started = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, ContentType=content_type)
            upload_id = started["UploadId"]
        except Exception as err:
            raise StorageError(f"could not start storing {self.url(name)}: {_reason(err)}") from err
        futures: list = []
        buffer = bytearray()

        def send(body: bytes) -> None:
            while len([f for f in futures if not f.done()]) >= PARTS_IN_FLIGHT:
                next(f for f in futures if not f.done()).result()
            for done in (f for f in futures if f.done()):
                done.result()  # a failed part fails the upload now
            number = len(futures) + 1
            futures.append(pool.submit(self._part, key, upload_id, number, body))

        try:
            with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="s3-part") as pool:
                for chunk in chunks:
                    sha.update(chunk)
                    size += len(chunk)
                    buffer += chunk
                    while len(buffer) >= (step := part_bytes * (1 + len(futures) // PARTS_PER_STEP)):
                        send(bytes(buffer[:step]))
                        del buffer[:step]
                if buffer or not futures:
                    send(bytes(buffer))
                parts = [f.result() for f in futures]
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as err:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:
                pass
            if isinstance(err, Exception) and not isinstance(err, (OSError, StorageError)):
                raise StorageError(f"could not store {self.url(name)}: {_reason(err)}") from err
            raise
        return self.url(name), size, sha.hexdigest()

    def _part(self, key: str, upload_id: str, number: int, body: bytes) -> dict:
        answer = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def iter_range(self, url: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The object's bytes [start, end) as they arrive."""
        key = self.key_of(url)
        extra = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
        except Exception as err:
            raise StorageError(f"could not read {url}: {_reason(err)}") from err
        try:
            while True:
                chunk = body.read(READ_BYTES)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def size(self, url: str) -> int | None:
        """The object's size, None when it does not exist."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key_of(url))["ContentLength"])
        except Exception as err:
            if _status(err) in (403, 404):
                return None
            raise StorageError(f"could not look up {url}: {_reason(err)}") from err

    def fetch(self, url: str, target: Path) -> Path:
        """Download the object to ``target`` (through a temporary file beside it)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            self.client.download_file(self.bucket, self.key_of(url), str(temporary))
            os.replace(temporary, target)
        except Exception as err:
            temporary.unlink(missing_ok=True)
            raise StorageError(f"could not fetch {url}: {_reason(err)}") from err
        return target

    def list(self, name: str) -> dict[str, int]:
        """{name relative to ``<prefix>/<name>/``: size} of the objects under it."""
        key = self.key(name.rstrip("/") + "/")
        found: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key):
                found.update({o["Key"][len(key) :]: int(o["Size"]) for o in page.get("Contents", [])})
        except Exception as err:
            raise StorageError(f"could not list {self.url(name)}/: {_reason(err)}") from err
        return found

    def delete(self, url: str) -> None:
        if not is_stored(url):
            return  # a path on some machine: no object of this store
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key_of(url))
        except Exception as err:
            raise StorageError(f"could not delete {url}: {_reason(err)}") from err

    def delete_prefix(self, name: str) -> int:
        """Every object under ``<prefix>/<name>/``; returns how many were deleted."""
        key = self.key(name.rstrip("/") + "/")
        deleted = 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
                    deleted += len(objects)
        except Exception as err:
            raise StorageError(f"could not delete {self.url(name)}/: {_reason(err)}") from err
        return deleted

    # --- the Store interface's artifacts, files and mirrors -------------------------------------

    def publish(self, name: str, model_dir: Path, packager, prefix: str) -> tuple[str, int, str]:
        return self.put_stream(name, packager.iter_bytes(model_dir, prefix), content_type=packager.media_type)

    def read(self, location: str, packager, prefix: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return self.iter_range(location, start, end)

    def intact(self, location: str, size: int) -> bool:
        try:
            return self.size(location) == size
        except ValueError as err:  # not this store's URL
            raise StorageError(str(err)) from None

    def local_file(self, location: str, sha256: str | None = None) -> Path:
        """A stored upload in this machine's cache (``<data dir>/cache/uploads/``), fetched once;
        its sha256 checked against its name (content-addressed) when it arrives. A path (a row
        from before the store was configured) is that path."""
        if not is_stored(location):
            return Path(location)
        if self.cache_dir is None:
            raise StorageError(f"{location}: this store has no cache directory to fetch it into")
        name = self.key_of(location).rsplit("/", 1)[-1]
        target = self.cache_dir / name
        _prune_cache(target.parent, self.cache_max_age_s, keep=target)
        if target.is_file():
            os.utime(target)  # used now: kept another retention period
            return target
        self.fetch(location, target)
        expected = sha256 or name.split(".", 1)[0]
        if file_sha256(target) != expected:
            target.unlink(missing_ok=True)
            raise StorageError(f"{location}: its content does not match its sha256 {expected}")
        return target

    def mirror(self, directory: Path, name: str, *, named: Callable[[dict], list[str]], state: str, interval_s: float):
        from app.mirror import DirectoryMirror

        return DirectoryMirror(self, name, directory, named=named, state=state, interval_s=interval_s)


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None) or {}
    try:
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    except (TypeError, ValueError):
        return None


def _reason(err: Exception) -> str:
    response = getattr(err, "response", None) or {}
    error = response.get("Error") or {}
    if error:
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    return f"{type(err).__name__}: {err}"[:300]


def _prune_cache(directory: Path, max_age_s: float, *, keep: Path) -> None:
    if max_age_s <= 0 or not directory.is_dir():
        return
    before = time.time() - max_age_s
    for path in directory.iterdir():
        try:
            if path != keep and path.is_file() and path.stat().st_mtime < before:
                path.unlink()
        except OSError:  # another job of this machine removed or fetched it meanwhile
            pass
