"""One exception tree for Lookalike.

Callers that must tell failures apart catch the specific subclass; everything else
catches :class:`LookalikeError`. Errors about a message carry a stable ``code`` that
goes into error replies and dead-letter headers, so clients can branch on it.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every code an error reply or a dead letter can carry: the contract's one list. The
    reply schema's enum is checked against it (tests/unit/test_contracts.py); the codes of
    events that get no reply (feedback, triggers) are in ``NO_REPLY_CODES``."""

    BAD_IMAGE = "bad_image"
    TOO_LARGE = "too_large"
    BAD_HEADER = "bad_header"
    BAD_KEY = "bad_key"
    UNKNOWN_ITEM = "unknown_item"
    MODEL_MISMATCH = "model_mismatch"
    BAD_VECTOR = "bad_vector"
    EMPTY_INDEX = "empty_index"
    NOT_READY = "not_ready"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    INVALID_MESSAGE = "invalid_message"
    INTERNAL = "internal"
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the query's deadline passed before it was embedded or searched
    OVERLOADED = "overloaded"  # the worker would finish the query after its deadline: shed, not embedded
    TIMEOUT = "timeout"  # the HTTP gateway's deadline passed (gateway/)
    UNAVAILABLE = "unavailable"  # the HTTP gateway could not reach Kafka (gateway/)
    BAD_FEEDBACK = "bad_feedback"  # a feedback or trigger event that is not UTF-8 JSON, or not what its schema allows


NO_REPLY_CODES = frozenset({ErrorCode.BAD_FEEDBACK})  # dead letters and logs only


def code_of(exc: BaseException) -> ErrorCode:
    """The contract code of any exception: its own where it has one, else ``internal``."""
    try:
        return ErrorCode(getattr(exc, "code", None) or ErrorCode.INTERNAL)
    except ValueError:
        return ErrorCode.INTERNAL


class LookalikeError(Exception):
    """Base of every error raised on purpose by Lookalike."""


class ConfigError(LookalikeError):
    """Settings or files needed to start are missing or inconsistent."""


class StackError(LookalikeError):
    """The local Kafka/Redis stack could not be started, stopped or reached."""


class ModelArtifactError(LookalikeError):
    """A model artifact is missing, corrupt, or does not match what the caller needs."""


class ReplyTimeout(LookalikeError):
    """No reply arrived for a query before its deadline."""


class InvalidMessage(LookalikeError):
    """A message cannot be processed. ``code`` is stable and part of the contract."""

    code: ErrorCode = ErrorCode.INVALID_MESSAGE

    def __init__(self, message: str, *, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)  # an unknown code is a bug here, not a new contract


class BadImage(InvalidMessage):
    """The image bytes are not a decodable, allowed image."""

    code = ErrorCode.BAD_IMAGE


class MessageTooLarge(InvalidMessage):
    """The message is larger than the topic's limit."""

    code = ErrorCode.TOO_LARGE


class BadHeader(InvalidMessage):
    """A header is missing, malformed, or has a value outside its allowed range."""

    code = ErrorCode.BAD_HEADER


class BadKey(InvalidMessage):
    """The message key is missing or not valid UTF-8."""

    code = ErrorCode.BAD_KEY


class UnknownItem(InvalidMessage):
    """A "more like this" query names an item that is not in the index."""

    code = ErrorCode.UNKNOWN_ITEM


class ModelMismatch(InvalidMessage):
    """A vector was made by another model version than the index serves."""

    code = ErrorCode.MODEL_MISMATCH


class Unauthorized(InvalidMessage):
    """A query is unsigned, signed with a wrong or unknown key, altered, or outside the replay window."""

    code = ErrorCode.UNAUTHORIZED


class RateLimited(InvalidMessage):
    """A client sent more queries than its token bucket allows."""

    code = ErrorCode.RATE_LIMITED


class DeadlineExceeded(InvalidMessage):
    """A query arrived (at the worker or the indexer) after its deadline: answered at once, not worked on."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Overloaded(InvalidMessage):
    """A query the worker could only finish after its deadline at its present pace: shed before embedding."""

    code = ErrorCode.OVERLOADED
