"""One exception tree for Lookalike.

Callers that must tell failures apart catch the specific subclass; everything else
catches :class:`LookalikeError`. Errors about a message carry a stable ``code`` that
goes into error replies and dead-letter headers, so clients can branch on it.
"""

from __future__ import annotations


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

    code = "invalid_message"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadImage(InvalidMessage):
    """The image bytes are not a decodable, allowed image."""

    code = "bad_image"


class MessageTooLarge(InvalidMessage):
    """The message is larger than the topic's limit."""

    code = "too_large"


class BadHeader(InvalidMessage):
    """A header is missing, malformed, or has a value outside its allowed range."""

    code = "bad_header"


class BadKey(InvalidMessage):
    """The message key is missing or not valid UTF-8."""

    code = "bad_key"


class UnknownItem(InvalidMessage):
    """A "more like this" query names an item that is not in the index."""

    code = "unknown_item"


class ModelMismatch(InvalidMessage):
    """A vector was made by another model version than the index serves."""

    code = "model_mismatch"


class Unauthorized(InvalidMessage):
    """A query is unsigned, signed with a wrong or unknown key, altered, or outside the replay window."""

    code = "unauthorized"


class RateLimited(InvalidMessage):
    """A client sent more queries than its token bucket allows."""

    code = "rate_limited"
