"""What the edge (app.guard) says about JSON: the bodies it refuses with a 422 before a route
runs (NaN, Infinity, numbers that overflow, lone surrogates, nesting too deep, not UTF-8), and
the 422 detail of FastAPI's validation errors, in plain words that echo no input."""

from __future__ import annotations

import json
import math

from starlette.requests import Request
from starlette.responses import JSONResponse

from worker.engine.contract.spec_fields import plain_message


class BadJSON(ValueError):
    """A JSON body with something this service does not take (NaN, overflow, lone surrogates)."""


def printable(value: str, limit: int = 64) -> str:
    """A value quoted in a refusal (a Host, an Origin, a number): printable ASCII, truncated."""
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in value[:limit])
    return text + ("..." if len(value) > limit else "")


def _reject_constant(name: str) -> float:
    raise BadJSON(f"{name} is not a JSON number: send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"the number {printable(text, 24)} is out of range (larger than a double)")
    return value


def _lone_surrogate(value) -> bool:
    """Whether any string (or key) holds a lone surrogate; walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def json_problem(body: bytes) -> str | None:
    """Why this JSON body is refused (NaN, Infinity, overflowing numbers, lone surrogates,
    nesting too deep, not UTF-8), or None: valid JSON, or not JSON at all (the route says so)."""
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except BadJSON as err:
        return str(err)
    except json.JSONDecodeError:
        return None
    except UnicodeDecodeError as err:
        return f"the body is not UTF-8 (byte {err.start})"
    except RecursionError:
        return "the JSON is nested too deeply"
    except ValueError as err:  # an integer over Python's digit limit
        return f"a number in the JSON is too long ({printable(str(err), 80)})"
    if body.isascii() and b"\\u" not in body:
        return None  # no escapes and no raw non-ASCII: no surrogate can be there
    if _lone_surrogate(value):
        return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair): send valid Unicode"
    return None


def _clean(value: object, limit: int) -> str:
    text = str(value)
    text = text[:limit] + ("..." if len(text) > limit else "")
    return text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"


def validation_details(errors) -> list[dict]:
    """A 422's detail: where and what in plain words (the form and the CLI say the same), never
    the input itself (it may be a file or a megabyte of JSON), messages truncated; at most 50."""
    details = []
    for error in list(errors)[:50]:
        loc = [part if isinstance(part, int) else _clean(part, 64) for part in tuple(error.get("loc", ()))[:12]]
        msg = plain_message(error)  # the spec's plain words; a short input at most 60 characters
        ctx = error.get("ctx") or {}
        if error.get("type") == "json_invalid" and isinstance(ctx.get("error"), str):
            msg = f"{msg}: {ctx['error']}"
        details.append({"loc": loc, "msg": _clean(msg, 300), "type": _clean(error.get("type", ""), 64)})
    return details


async def validation_error_handler(request: Request, exc) -> JSONResponse:
    """FastAPI's RequestValidationError as a 422 that echoes no input."""
    return JSONResponse({"detail": validation_details(exc.errors())}, 422)
