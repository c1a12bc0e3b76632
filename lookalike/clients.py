"""Kafka and Redis client configuration for the clients Lookalike uses.

confluent-kafka (producers, query client, admin), aiokafka (the indexer's catalog
feed) and faust (the stream processors) each spell the same settings differently;
these functions are the one place that translates :class:`CommonSettings`, security
included (TLS, SASL/SCRAM: docs/security.md). Secrets leave their ``SecretStr`` only
here, straight into the client; :func:`redacted` is what may be logged.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from lookalike.settings import CommonSettings

if TYPE_CHECKING:
    import faust

# Room for the largest allowed image plus headers and the record envelope.
ENVELOPE_BYTES = 256 * 1024


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


def ssl_context(settings: CommonSettings) -> ssl.SSLContext:
    """The TLS context of the Python clients (aiokafka, faust): the configured CA (else the
    system's), the client certificate for mutual TLS, hostname checking as configured."""
    cafile = str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if settings.kafka_ssl_cert_file:
        context.load_cert_chain(str(settings.kafka_ssl_cert_file), str(settings.kafka_ssl_key_file),
                                password=_secret(settings.kafka_ssl_key_password))
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def producer_config(settings: CommonSettings, **extra: Any) -> dict[str, Any]:
    """An idempotent producer: acks=all, no duplicates on retry, low latency."""
    return confluent_config(
        settings,
        **{"enable.idempotence": True, "acks": "all", "linger.ms": 2, "compression.type": "none", **extra},
    )


def aiokafka_config(settings: CommonSettings) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if uses_tls(settings):
        config["ssl_context"] = ssl_context(settings)
    if settings.kafka_sasl_mechanism:
        config.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=_secret(settings.kafka_sasl_password),
        )
    return config


def faust_credentials(settings: CommonSettings) -> Any:
    """faust's ``broker_credentials``: SASL (over TLS for SASL_SSL), TLS alone, or None."""
    import faust

    context = ssl_context(settings) if uses_tls(settings) else None
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username, password=_secret(settings.kafka_sasl_password),
            mechanism=settings.kafka_sasl_mechanism, ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_app(settings: CommonSettings, app_id: str, **extra: Any) -> faust.App:
    """A faust app with Lookalike's conventions: raw keys and values (the contracts are
    bytes and headers), no web server, topics created by ``lookalike topics create`` and not
    declared by faust, acks from all replicas, and a session timeout short enough that a
    member killed with -9 hands its partitions over quickly (faust's default is 60 s)."""
    import faust

    app = faust.App(
        app_id,
        broker=faust_broker_url(settings),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 4,
        # faust keeps table state in ``{app_id}-data`` under datadir, by default the working
        # directory; Lookalike's apps have no tables, so it goes under LOOKALIKE_HOME instead.
        datadir=str(settings.home / "faust"),
        broker_credentials=faust_credentials(settings),
        **extra,
    )
    app.transport = idempotent_transport()(app.conf.broker_consumer, app)
    return app


@cache
def idempotent_transport() -> type:
    """faust's aiokafka transport with an idempotent producer: faust enables idempotence only
    for exactly-once transactions, but a retried send must not duplicate a vector or a reply
    in at-least-once mode either (acks=all comes from ``producer_acks=-1``)."""
    from faust.transport.drivers import aiokafka as driver

    class IdempotentProducer(driver.Producer):
        def _settings_extra(self) -> Mapping[str, Any]:
            return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}

    class IdempotentTransport(driver.Transport):
        Producer = IdempotentProducer

    return IdempotentTransport


def faust_broker_url(settings: CommonSettings) -> str:
    """faust's broker URL: ``kafka://h1:9092;h2:9092``."""
    return "kafka://" + ";".join(host.strip() for host in settings.kafka_bootstrap.split(","))


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
