"""The gateway's settings: where it listens, who may call it, how long it waits."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from lookalike.contracts import valid_topic_name
from lookalike.settings import CommonSettings, MiB


def default_instance() -> str:
    """A replica's name: the host name (a container's id under docker compose), Kafka-topic safe."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in socket.gethostname())
    return name[:64] or "gateway"


class GatewaySettings(CommonSettings):
    """``python -m gateway``: one replica of the HTTP gateway."""

    gateway_host: str = "127.0.0.1"  # 0.0.0.0 in containers
    gateway_port: int = Field(8480, ge=0, le=65535)  # 0: any free port (logged at start-up)
    # Each replica reads its own reply topic, ``{reply prefix}.gateway-{instance}``: replicas
    # behind a load balancer never see each other's replies. Give every replica its own name.
    gateway_instance: str = Field(default_factory=default_instance)
    gateway_reply_topic: str | None = None  # overrides the name above
    gateway_deadline_s: float = Field(10.0, gt=0)  # a query without a reply by then gets 504
    # API keys, client id -> key (JSON), and/or a JSON file of the same. A request with a key
    # is signed as that client (per-client rate limits and audit in the worker).
    gateway_api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    gateway_api_keys_file: Path | None = None
    # Requests without an API key (the shopper's page: a browser cannot keep a secret) act as
    # this client; empty: every request needs an API key.
    gateway_public_client: str = "web"
    # Signing keys, client id -> HMAC key, the same as the worker's LOOKALIKE_QUERY_KEYS: a
    # client with one has its queries signed, the others send an unsigned client-id claim.
    query_keys: dict[str, SecretStr] = Field(default_factory=dict)
    query_keys_file: Path | None = None
    gateway_cors_origins: list[str] = Field(default_factory=list)  # JSON list; ["*"]: any origin
    gateway_max_feedback_bytes: int = Field(64 * 1024, ge=1024)  # a POST /v1/feedback body
    gateway_max_feedback_events: int = Field(100, ge=1)
    # Item pictures for the page come from the catalog topic (compacted: the latest image per
    # item), kept in memory up to this many bytes, least recently used dropped first; an image
    # larger than gateway_image_max_item_bytes is kept as a JPEG thumbnail instead.
    gateway_images: bool = True
    gateway_image_cache_bytes: int = Field(128 * MiB, ge=0)
    gateway_image_max_item_bytes: int = Field(256 * 1024, ge=1024)
    gateway_thumbnail_px: int = Field(320, ge=32, le=2048)

    @property
    def reply_topic(self) -> str:
        if self.gateway_reply_topic:
            return self.gateway_reply_topic
        return f"{self.reply_topic_prefix.rstrip('.')}.gateway-{self.gateway_instance}"

    @property
    def max_body_bytes(self) -> int:
        """A query image, plus room for a multipart envelope."""
        return self.max_query_image_bytes + 64 * 1024

    @model_validator(mode="after")
    def _reply_topic_is_valid(self) -> GatewaySettings:
        if not valid_topic_name(self.reply_topic):
            raise ValueError(f"the gateway's reply topic {self.reply_topic!r} is not a valid topic name: "
                             "set LOOKALIKE_GATEWAY_INSTANCE (letters, digits, - and _)")
        return self
