"""Log limits of `sparsegpt serve`: a flood of connections must not become a flood of log lines
("Too many open files" and crashed requests logged once per interval, with a count of the rest)."""

from __future__ import annotations

import errno
import logging
import time


class RateLimitedFilter(logging.Filter):
    """Lets one record about running out of file descriptors through per interval (without its
    traceback, with a count of the ones held back): a flood of connections must not become a
    flood of log lines."""

    def __init__(self, interval_s: float = 60.0):
        super().__init__()
        self.interval_s, self.last, self.held = interval_s, float("-inf"), 0

    @staticmethod
    def _exhaustion(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                return True
            exc = exc.__cause__ or exc.__context__
        message = record.getMessage()
        return (
            "Too many open files" in message or "out of system resource" in message or record.name == limited_log.name
        )

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._exhaustion(record):
            return True
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.held += 1
            return False
        self.last = now
        if self.held:
            record.msg, record.args = f"{record.getMessage()} ({self.held} more like it in the last interval)", ()
            self.held = 0
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


limited_log = logging.getLogger("sparsegpt.serve.limits")


def install_log_limits(interval_s: float = 60.0) -> RateLimitedFilter:
    """One shared filter on the loggers that report accept() failures and crashed requests, and their handlers."""
    limit = RateLimitedFilter(interval_s)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", limited_log.name):
        logger = logging.getLogger(name)
        logger.addFilter(limit)
        for handler in logger.handlers:
            handler.addFilter(limit)
    return limit
