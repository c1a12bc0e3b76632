"""Reply error codes -> HTTP statuses: the one place the gateway decides them.

The body of every answer to a query is the reply document of docs/contracts.md, ok or
error, exactly as the pipeline wrote it; only the status line is the gateway's. Errors
the gateway finds itself (no image in the request, a body over the limit, no reply before
the deadline) get a reply document of the same schema, with the codes below.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lookalike import contracts as c

# The gateway's own codes (docs/contracts.md lists them with the pipeline's).
TIMEOUT = "timeout"  # no reply before the gateway's deadline
UNAVAILABLE = "unavailable"  # the query could not be delivered to Kafka

HTTP_STATUS: dict[str, int] = {
    "bad_image": 400,
    "bad_header": 400,
    "bad_key": 400,
    "invalid_message": 400,
    "unauthorized": 401,
    "unknown_item": 404,
    "too_large": 413,
    "rate_limited": 429,
    "empty_index": 503,
    "not_ready": 503,
    "model_mismatch": 503,  # a model switch is in progress: asking again in a moment works
    UNAVAILABLE: 503,
    "overloaded": 503,  # shed by a worker over capacity: Retry-After 1
    "deadline_exceeded": 504,  # reached the worker or indexer after the gateway's deadline
    TIMEOUT: 504,
    "internal": 500,
    "bad_vector": 500,
}
UNKNOWN_CODE_STATUS = 500  # "treat an unknown code like internal" (docs/contracts.md)
_RETRY_IN = re.compile(r"retry in ([0-9]+(?:\.[0-9]+)?)s")


def http_status(reply: dict[str, Any]) -> int:
    """The HTTP status of a reply document: 200 when ok, else by its error code."""
    if reply.get("status") == "ok":
        return 200
    error = reply.get("error") or {}
    return HTTP_STATUS.get(str(error.get("code")), UNKNOWN_CODE_STATUS)


def retry_after_s(reply: dict[str, Any]) -> int | None:
    """Seconds for a ``Retry-After`` header: a rate-limited reply says when; a 503 a second."""
    error = reply.get("error") or {}
    if error.get("code") == "rate_limited":
        found = _RETRY_IN.search(str(error.get("message", "")))
        return max(1, math.ceil(float(found.group(1)))) if found else 1
    if http_status(reply) == 503:
        return 1
    return None


def gateway_error(request_id: str, code: str, message: str) -> dict[str, Any]:
    """A reply document for an error the gateway found before (or instead of) the pipeline."""
    return c.error_reply(request_id, code, message)
