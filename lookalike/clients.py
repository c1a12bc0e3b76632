"""Kafka and Redis client configuration for the clients Lookalike uses.

Every Kafka client is confluent-kafka (the services' consumer runtime, producers, the
query client, admin calls); these functions are the one place that translates
:class:`CommonSettings` for it, security included (TLS, SASL/SCRAM: docs/security.md).
Secrets leave their ``SecretStr`` only here, straight into the client; :func:`redacted`
is what may be logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from lookalike.settings import CommonSettings

# Room for the largest allowed image plus headers and the record envelope.
ENVELOPE_BYTES = 256 * 1024

# How long a fetch may wait at the broker for a first record (``fetch.wait.max.ms``). With
# ``fetch.min.bytes`` 1 the broker answers as soon as a record arrives, so this is only how
# often an idle consumer asks again: at 20 ms the demo's ~10 idle consumers kept the broker
# at 0.33 cores doing nothing (docs/benchmarks.md), and a record's latency is the same.
LONG_POLL_MS = 500


def max_message_bytes(settings: CommonSettings) -> int:
    return max(settings.max_image_bytes, settings.max_query_image_bytes) + ENVELOPE_BYTES


SECRET_KEYS = ("password", "sasl_plain_password", "broker_credentials", "ssl.key.password")


def redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    """A client config fit for a log line: secrets replaced by ``**********``."""
    return {key: "**********" if any(word in key for word in SECRET_KEYS) and value else value
            for key, value in config.items()}


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def uses_tls(settings: CommonSettings) -> bool:
    return settings.kafka_security_protocol in {"SSL", "SASL_SSL"}


def confluent_config(settings: CommonSettings, **extra: Any) -> dict[str, Any]:
    """librdkafka properties: bootstrap, security, message size."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
        "message.max.bytes": max_message_bytes(settings),
    }
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username or ""
        config["sasl.password"] = _secret(settings.kafka_sasl_password) or ""
    if uses_tls(settings):
        if settings.kafka_ssl_ca_file:
            config["ssl.ca.location"] = str(settings.kafka_ssl_ca_file)
        if settings.kafka_ssl_cert_file:
            config["ssl.certificate.location"] = str(settings.kafka_ssl_cert_file)
            config["ssl.key.location"] = str(settings.kafka_ssl_key_file)
            if settings.kafka_ssl_key_password:
                config["ssl.key.password"] = _secret(settings.kafka_ssl_key_password)
        config["ssl.endpoint.identification.algorithm"] = "https" if settings.kafka_ssl_check_hostname else "none"
    config.update(extra)
    return config


def producer_config(settings: CommonSettings, **extra: Any) -> dict[str, Any]:
    """An idempotent producer: acks=all, no duplicates on retry, low latency."""
    return confluent_config(
        settings,
        **{"enable.idempotence": True, "acks": "all", "linger.ms": 2, "compression.type": "none", **extra},
    )


def redis_client(settings: CommonSettings, *, asyncio: bool = False, **kwargs: Any) -> Any:
    """A Redis client for ``redis_url``, with AUTH (``redis_username``/``redis_password``, or
    credentials in the URL) and, for ``rediss://`` URLs, TLS trusting ``redis_ssl_ca_file``."""
    import redis
    import redis.asyncio as aioredis

    url = settings.redis_url.get_secret_value()
    if settings.redis_password is not None:
        kwargs.setdefault("password", settings.redis_password.get_secret_value())
        if settings.redis_username:
            kwargs.setdefault("username", settings.redis_username)
    if url.startswith("rediss://") and settings.redis_ssl_ca_file:
        kwargs.setdefault("ssl_ca_certs", str(settings.redis_ssl_ca_file))
    return (aioredis.Redis if asyncio else redis.Redis).from_url(url, **kwargs)
