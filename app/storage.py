"""The store of a job's lasting files (being reworked: the S3 store moved to app/s3_store.py)."""

from app.s3_store import *  # noqa: F401,F403
