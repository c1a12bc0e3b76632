"""The Kafka ACLs each Lookalike component needs, least privilege, as data.

docs/security.md shows them as ``kafka-acls.sh`` commands (``lookalike acls SERVICE
--principal User:NAME`` prints them for your topic names, ``--apply`` creates them), and
the security integration test runs the pipeline on a broker with an authorizer and
exactly these ACLs. Topics and groups use prefixed patterns where a family of names is
meant (reply topics, consumer groups of blue/green replicas), literal ones otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from lookalike.settings import CommonSettings

Service = Literal["worker", "indexer", "feedback", "trainer", "gateway", "query-client", "catalog-feed", "admin"]
SERVICES: tuple[Service, ...] = ("worker", "indexer", "feedback", "trainer", "gateway", "query-client", "catalog-feed",
                                 "admin")
# Each service's consumer-group prefix when none is given (the settings' defaults).
DEFAULT_GROUPS: dict[str, str] = {"worker": "lookalike-worker", "indexer": "lookalike-indexer",
                                  "feedback": "lookalike-feedback", "trainer": "lookalike-trainer"}


@dataclass(frozen=True)
class Grant:
    resource: Literal["topic", "group", "cluster"]
    name: str
    pattern: Literal["literal", "prefixed"]
    operation: Literal["READ", "WRITE", "DESCRIBE", "CREATE", "DESCRIBE_CONFIGS"]
    why: str


def topic_namespace(settings: CommonSettings) -> str:
    """The common prefix of the deployment's topic names up to a '.', e.g. ``lookalike.``."""
    names = [settings.catalog_topic, settings.queries_topic, settings.replies_topic, settings.deadletter_topic,
             settings.catalog_vectors_topic, settings.query_vectors_topic]
    common = os.path.commonprefix(names)  # noqa: RUF071 (characters are what topic prefixes are made of)
    return common[: common.rfind(".") + 1] if "." in common else common


def grants(service: Service, settings: CommonSettings, *, group: str | None = None) -> list[Grant]:
    """What ``service`` needs. ``group``: its consumer group (worker_group / indexer_group /
    feedback_group / trainer_group), used as a prefix. No service uses transactions; the
    idempotent producers need no cluster grant (Write on a topic implies IdempotentWrite
    since Kafka 3.0, KIP-679; the security integration test produces with exactly these)."""
    s = settings
    ns = topic_namespace(s)
    describe = Grant("topic", ns, "prefixed", "DESCRIBE", "see which topics exist (start-up checks, reply-to)")

    def replies(why: str) -> list[Grant]:
        out = [Grant("topic", s.reply_topic_prefix, "prefixed", "WRITE", why)]
        if not s.replies_topic.startswith(s.reply_topic_prefix):
            out.append(Grant("topic", s.replies_topic, "literal", "WRITE", why))
        return out

    if service == "worker":
        return [
            describe,
            Grant("topic", s.catalog_topic, "literal", "READ", "catalog images to embed"),
            Grant("topic", s.queries_topic, "literal", "READ", "queries to embed"),
            Grant("topic", f"{s.catalog_vectors_topic}.", "prefixed", "WRITE",
                  "catalog vectors, one topic per model version (lookalike/rollout.py)"),
            Grant("topic", f"{s.catalog_vectors_topic}.", "prefixed", "CREATE",
                  "a new model version's vector topic, when the worker is first to need it"),
            Grant("topic", s.query_vectors_topic, "literal", "WRITE", "query vectors"),
            Grant("topic", s.deadletter_topic, "literal", "WRITE", "refused catalog records"),
            *replies("error replies to refused queries (reply-to topics)"),
            Grant("group", group or "lookalike-worker", "prefixed", "READ", "its consumer groups"),
        ]
    if service == "indexer":
        return [
            describe,
            Grant("topic", f"{s.catalog_vectors_topic}.", "prefixed", "READ",
                  "each live model version's catalog feed (assigned, no group)"),
            Grant("topic", f"{s.catalog_vectors_topic}.", "prefixed", "CREATE",
                  "a new model version's vector topic, when the indexer is first to need it"),
            Grant("topic", s.query_vectors_topic, "literal", "READ", "query vectors to answer"),
            Grant("topic", s.query_vectors_topic, "literal", "WRITE",
                  "index shards: a \"more like this\" item resolved to its vector, for every shard"),
            Grant("topic", s.partials_topic, "literal", "READ", "index shards: partial answers to merge"),
            Grant("topic", s.partials_topic, "literal", "WRITE", "index shards: this shard's partial answers"),
            *replies("replies (reply-to topics)"),
            Grant("group", group or "lookalike-indexer", "prefixed", "READ", "its consumer groups"),
        ]
    if service == "feedback":  # python -m feedback (feedback/service.py)
        return [
            Grant("topic", s.feedback_topic, "literal", "READ", "shoppers' feedback and impressions"),
            Grant("topic", s.replies_topic, "literal", "READ", "replies, to join feedback to what was shown"),
            Grant("topic", s.query_vectors_topic, "literal", "READ", "query vectors, for drift"),
            Grant("topic", f"{s.catalog_vectors_topic}.", "prefixed", "READ",
                  "every version's catalog vectors (a pattern subscription), for drift"),
            Grant("topic", s.triggers_topic, "literal", "WRITE", "retraining triggers"),
            Grant("topic", s.deadletter_topic, "literal", "WRITE", "refused feedback records"),
            Grant("group", group or DEFAULT_GROUPS["feedback"], "prefixed", "READ",
                  "its groups (feedback, {group}.catalog-vectors)"),
        ]
    if service == "trainer":  # python -m training.service
        return [
            Grant("topic", s.triggers_topic, "literal", "READ", "retraining triggers"),
            Grant("topic", s.models_topic, "literal", "WRITE", "the gate's decisions"),
            Grant("group", group or DEFAULT_GROUPS["trainer"], "prefixed", "READ", "its consumer group"),
        ]
    if service == "gateway":  # python -m gateway: each replica its own reply topic, assigned, no group
        own_replies = f"{s.reply_topic_prefix.rstrip('.')}.gateway-"
        return [
            Grant("topic", s.queries_topic, "literal", "WRITE", "publish the HTTP callers' queries"),
            Grant("topic", s.feedback_topic, "literal", "WRITE", "POST /v1/feedback"),
            Grant("topic", own_replies, "prefixed", "CREATE", "each replica makes its reply topic at start"),
            Grant("topic", own_replies, "prefixed", "READ", "and reads its replies from it"),
            Grant("topic", s.catalog_topic, "literal", "READ", "item pictures for the page"),
        ]
    if service == "query-client":
        return [
            Grant("topic", s.queries_topic, "literal", "WRITE", "publish queries"),
            Grant("topic", s.replies_topic, "literal", "READ", "read replies (give each client its own reply "
                  "topic under the reply prefix to keep clients from reading each other's answers)"),
            Grant("topic", s.feedback_topic, "literal", "WRITE",
                  "impressions of the results it was shown, and shoppers' feedback (docs/feedback.md)"),
        ]
    if service == "catalog-feed":
        return [Grant("topic", s.catalog_topic, "literal", "WRITE", "publish catalog items and tombstones")]
    if service == "admin":  # `lookalike topics create`
        return [
            Grant("topic", ns, "prefixed", "CREATE", "create the topics"),
            Grant("topic", ns, "prefixed", "DESCRIBE", "see which exist"),
            Grant("topic", ns, "prefixed", "DESCRIBE_CONFIGS", "check their configuration"),
        ]
    raise ValueError(f"unknown service {service!r}; one of {SERVICES}")


def bindings(principal: str, service_grants: list[Grant], host: str = "*") -> list:
    """confluent-kafka AclBindings (ALLOW) for ``principal``, e.g. ``User:lookalike-worker``."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    return [
        AclBinding(ResourceType[g.resource.upper()], g.name, ResourcePatternType[g.pattern.upper()], principal, host,
                   AclOperation[g.operation], AclPermissionType.ALLOW)
        for g in service_grants
    ]


def kafka_acls_commands(principal: str, service_grants: list[Grant], bootstrap: str = "BROKER:9092") -> list[str]:
    """The same grants as ``kafka-acls.sh`` command lines."""
    lines = []
    for g in service_grants:
        target = "--cluster" if g.resource == "cluster" else f"--{g.resource} {g.name}"
        operation = "".join(part.capitalize() for part in g.operation.split("_"))
        lines.append(f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config admin.properties --add "
                     f"--allow-principal {principal} --operation {operation} {target} "
                     f"--resource-pattern-type {g.pattern}   # {g.why}")
    return lines


def wait_until_enforced(admin: object, acl_bindings: list, timeout_s: float = 30.0) -> None:
    """Block until the broker's authorizer lists every binding (``describe_acls`` is answered
    from the broker's own ACL cache). With KRaft, ``create_acls`` returns once the controller
    committed them; a client that starts right after could still be refused for a moment."""
    import time

    from confluent_kafka.admin import AclBindingFilter, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    def key(b) -> tuple:  # type: ignore[no-untyped-def]
        return (b.restype, b.name, b.resource_pattern_type, b.principal, b.operation, b.permission_type)

    wanted = {key(b) for b in acl_bindings}
    principals = {b.principal for b in acl_bindings}
    deadline = time.monotonic() + timeout_s
    missing = wanted
    while True:
        listed = set()
        for principal in principals:
            found = admin.describe_acls(  # type: ignore[attr-defined]
                AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal, None, AclOperation.ANY,
                                 AclPermissionType.ANY), request_timeout=10).result(timeout=15)
            listed |= {key(b) for b in found}
        missing = wanted - listed
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} ACL(s) not enforced by the broker within {timeout_s:g}s")
        time.sleep(0.2)
