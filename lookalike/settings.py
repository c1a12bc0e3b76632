"""Settings, one frozen class per service, read once from ``LOOKALIKE_*`` variables.

Every service shares :class:`CommonSettings` (where Kafka and Redis are, topic names,
message limits) and adds its own knobs. Nothing here does work at import time;
call ``WorkerSettings()`` (etc.) at start-up and pass the object down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def default_data() -> Path:
    """The sample catalog folder: ``LOOKALIKE_DATA``, else the dataset beside the checkout."""
    return Path(os.environ.get("LOOKALIKE_DATA", "../shared/datasets/fashion-9k"))


def default_home() -> Path:
    """Where state that outlives a process lives: stack data, models, caches."""
    return Path(os.environ.get("LOOKALIKE_HOME", Path.home() / ".lookalike"))


class CommonSettings(BaseSettings):
    """What every component needs: brokers, Redis, topics and message limits."""

    # hide_input_in_errors: a validation error must not print the (secret-bearing) input.
    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", frozen=True, extra="ignore", hide_input_in_errors=True)

    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None  # or read it from this file (a mounted secret, docker-compose.yml)
    # TLS towards Kafka (SSL, SASL_SSL): the CA bundle to trust (else the system's), a client
    # certificate and key for mutual TLS, and hostname checking (keep it on outside tests).
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:16379/0")
    # Redis AUTH when the password is not in the URL (Redis 6 ACL user: redis_username), and
    # the CA to trust for rediss:// URLs (TLS).
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None  # or read it from this file
    redis_ssl_ca_file: Path | None = None

    # Where queries are embedded: "worker" (a worker embeds, its query vector crosses a second
    # Kafka hop to the indexer) or "indexer" (run `python -m onehop` in place of `python -m
    # indexer`: it embeds and answers its own queries, one hop; onehop/app.py; one index shard
    # only, and it needs the model store). Set it on both: with "indexer" the workers embed the
    # catalog only, and a plain indexer refuses to start.
    query_embedding: Literal["worker", "indexer"] = "worker"
    catalog_topic: str = "lookalike.catalog"
    queries_topic: str = "lookalike.queries"
    replies_topic: str = "lookalike.replies"
    deadletter_topic: str = "lookalike.deadletter"
    catalog_vectors_topic: str = "lookalike.catalog.vectors"  # + ".{model version}": one topic per version
    query_vectors_topic: str = "lookalike.queries.vectors"
    partials_topic: str = "lookalike.queries.partials"  # index shards' partial answers (indexer/shards.py)
    feedback_topic: str = "lookalike.feedback"
    triggers_topic: str = "lookalike.triggers"
    models_topic: str = "lookalike.models"  # the trainer's gate decisions
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)
    # How long compaction keeps a tombstone on the compacted topics (catalog, vectors): set on
    # them explicitly (Kafka's default is also 24 h); a snapshot older than this is not used.
    delete_retention_ms: int = Field(24 * 3600 * 1000, ge=60_000)

    max_image_bytes: int = Field(8 * MiB, ge=1024)  # a catalog image
    max_query_image_bytes: int = Field(8 * MiB, ge=1024)  # a query image (the limit of the queries topic)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_k: int = Field(100, ge=1, le=10_000)
    default_k: int = Field(5, ge=1)
    # A query without a deadline-ms header must be answered within this long of its record's
    # timestamp; later, the worker and the indexer answer it deadline_exceeded without working
    # on it (docs/contracts.md). 0: no deadline for such queries.
    query_deadline_ms: int = Field(30_000, ge=0)
    # reply-to topics a query may name: only reply topics, never the pipeline's own (catalog,
    # vectors), and what the services' Write ACL covers (docs/security.md).
    reply_topic_prefix: str = "lookalike.replies"

    # How soon the group notices a member that died without leaving (kill -9, lost host) and
    # hands its partitions to the others (Kafka's default is 45 s).
    session_timeout_s: float = Field(10.0, ge=6.0)
    home: Path = Field(default_factory=default_home)
    model_dir: Path | None = None
    model_version: str | None = None  # pin a version; None: follow the model store's champion
    # Blue/green rollout (lookalike/rollout.py): how often services read the rollout state, and
    # how long the previous version's index keeps answering queries its model embedded.
    rollout_poll_s: float = Field(1.0, gt=0)
    rollout_grace_s: float = Field(30.0, ge=0)
    metrics_host: str = "127.0.0.1"  # where /metrics and /healthz listen (0.0.0.0 in containers)
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with request ids

    @property
    def models_path(self) -> Path:
        return self.model_dir or self.home / "models"

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """``kafka_sasl_password_file`` / ``redis_password_file``: the secret is the file's
        content (one trailing newline dropped), unless the secret itself is set too."""
        if not isinstance(data, dict):
            return data
        for secret, path in (("kafka_sasl_password", "kafka_sasl_password_file"), ("redis_password", "redis_password_file")):
            if data.get(path) and data.get(secret) is None:
                try:
                    text = Path(data[path]).read_text("utf-8")
                except OSError as exc:
                    raise ValueError(f"{path} {data[path]}: {exc.strerror}") from None
                data = {**data, secret: text.removesuffix("\n")}
        return data

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> CommonSettings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"kafka_security_protocol={self.kafka_security_protocol} needs kafka_sasl_mechanism, "
                             "kafka_sasl_username and kafka_sasl_password")
        if not sasl and self.kafka_sasl_mechanism:
            raise ValueError(f"kafka_sasl_mechanism is set but kafka_security_protocol is {self.kafka_security_protocol}")
        if bool(self.kafka_ssl_cert_file) != bool(self.kafka_ssl_key_file):
            raise ValueError("kafka_ssl_cert_file and kafka_ssl_key_file go together (mutual TLS)")
        return self


class WorkerSettings(CommonSettings):
    """The embedding worker: micro-batching and where the model runs."""

    worker_group: str = "lookalike-worker"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0)  # catalog batches; 0: torch's default (all cores)
    # Queries have their own inference thread (never behind a catalog batch) and torch thread
    # count: 1 gives a batch of one the shortest tail on a shared CPU (docs/benchmarks.md).
    query_torch_threads: int = Field(1, ge=0)  # 0: as torch_threads
    # The catalog's inference threads yield the CPU to queries (and to the broker and indexer).
    catalog_nice: int = Field(10, ge=0, le=19)  # 0: the process's priority
    channels_last: bool = True  # the model's layout: faster convolutions on CPU (docs/benchmarks.md)
    # What the model computes in: "auto" is float16 on CUDA, bfloat16 on a CPU with AMX (2-3x
    # float32's images/s there; the vectors agree to a cosine of 1 - 3e-5), else float32.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    query_batch_max: int = Field(16, ge=1)
    query_batch_wait_ms: int = Field(0, ge=0)  # how long a query may wait for company; 0: none
    catalog_batch_max: int = Field(64, ge=1)
    catalog_batch_wait_ms: int = Field(100, ge=0)
    # A catalog batch's images are decoded by this many threads (Pillow lets go of the GIL
    # while it decodes), at the catalog's niceness, each straight down to the model's input.
    catalog_decode_threads: int = Field(2, ge=1, le=64)
    # The decoded pixels that may exist at once across those threads (3-8 bytes each while a
    # picture is converted): a batch of decompression bombs waits its turn instead of taking
    # 64 x 120 MB; one picture over it is refused as bad_image (docs/security.md).
    catalog_decode_budget_pixels: int = Field(40_000_000, ge=1024)
    # Where a catalog batch's JPEGs are decoded: "device" on the model's device (nvJPEG on a
    # GPU: lookalike/device_decode.py), "pillow" on the decode threads; "auto": the device
    # when the model runs on CUDA.
    catalog_decode: Literal["auto", "pillow", "device"] = "auto"
    # Who may ask (docs/security.md): signed queries with per-client keys, and a token
    # bucket per client in Redis. Off for the local demo, on in docker-compose.yml.
    query_auth: bool = False
    query_keys: dict[str, SecretStr] = Field(default_factory=dict)  # client id -> key (JSON in the variable)
    query_keys_file: Path | None = None  # or a JSON file {"client id": "key", ...}, e.g. a mounted secret
    query_replay_window_s: float = Field(300.0, gt=0)  # signed-at may be this far from the worker's clock
    rate_limit: bool = False
    rate_limit_per_s: float = Field(20.0, gt=0)  # tokens a client earns per second
    rate_limit_burst: int = Field(40, ge=1)  # bucket size: queries a client may send at once
    # Redis must answer a take within this, else this process's own bucket decides and Redis is
    # left alone for rate_limit_redis_retry_s (lookalike/ratelimit.py): a hung Redis costs one
    # timeout per retry period, not a stall per query.
    rate_limit_redis_timeout_s: float = Field(0.25, gt=0, le=5)
    rate_limit_redis_retry_s: float = Field(5.0, gt=0)
    worker_metrics_port: int = Field(9410, ge=0, le=65535)  # /metrics and /healthz; 0: off


class IndexerSettings(CommonSettings):
    """The HNSW indexer that answers queries."""

    indexer_group: str = "lookalike-indexer"
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(200, ge=8)
    # 64 gave recall@5 0.934 at 1M clustered vectors, 128 gives 0.991 at 206x the QPS of exact
    # search (docs/benchmarks.md); on the 9.6k catalog both give 0.998.
    hnsw_ef_search: int = Field(128, ge=8)
    initial_capacity: int = Field(1024, ge=16)
    status_interval_s: float = Field(1.0, gt=0)
    snapshots: bool = True
    snapshot_interval_s: float = Field(30.0, gt=0)  # at most this long between snapshots while items change
    snapshot_every_items: int = Field(10_000, ge=1)  # or as soon as this many mutations were applied
    snapshot_keep: int = Field(3, ge=1)
    snapshot_chunk_bytes: int = Field(16 * MiB, ge=1024)
    # Manifests are authenticated with this key (never stored in Redis): the key itself, or a
    # file holding it; neither set: <home>/secrets/snapshot.key, made on first use (docs/durability.md).
    snapshot_key: SecretStr | None = None
    snapshot_key_file: Path | None = None
    # One snapshot writer per namespace: a Redis lease, renewed every third of this.
    snapshot_lease_ttl_s: float = Field(30.0, ge=1)
    # A snapshot older than delete_retention_ms minus this may miss tombstones: replay instead.
    snapshot_retention_margin_s: float = Field(3600.0, ge=0)
    min_position_wait_s: float = Field(5.0, ge=0)  # how long a query may wait for its min-position
    catch_up_wait_s: float = Field(30.0, ge=0)  # how long a query may wait for a (re)starting index; then not_ready
    query_concurrency: int = Field(256, ge=1)  # queries handled at once, each waiting alone
    max_reply_bytes: int = Field(1_000_000, ge=16 * 1024)  # a reply's budget: results beyond it lose metadata
    status_digest: bool = False  # publish a SHA-256 of the live item ids (verification; costs a sort)
    indexer_metrics_port: int = Field(9411, ge=0, le=65535)  # /metrics and /healthz; 0: off
    # Index shards (indexer/shards.py): this instance owns catalog partitions p with
    # p % index_shards == index_shard; every shard answers every query and the partial
    # answers are merged. 1: one index with every partition, replies straight from it.
    index_shards: int = Field(1, ge=1)
    index_shard: int = Field(0, ge=0)
    shard_deadline_ms: float = Field(250.0, gt=0)  # a reply is sent without a shard this late (partial: true)
    gather_max_age_s: float = Field(60.0, gt=0)  # partial answers older than this are dropped unmerged

    @model_validator(mode="after")
    def _shard_in_range(self) -> IndexerSettings:
        if self.index_shard >= self.index_shards:
            raise ValueError(f"index_shard {self.index_shard} is not below index_shards {self.index_shards}")
        if self.query_embedding == "indexer" and self.sharded:
            raise ValueError("query_embedding 'indexer' needs one index shard: with shards, every shard would "
                             "embed every query (embed once, in the workers: query_embedding 'worker')")
        return self

    @property
    def sharded(self) -> bool:
        return self.index_shards > 1

    @property
    def query_group(self) -> str:
        """The consumer group of this instance's query feed, and its snapshot
        namespace: each shard reads every query, so each shard has its own group."""
        return f"{self.indexer_group}.shard-{self.index_shard}" if self.sharded else self.indexer_group

    @property
    def gather_group(self) -> str:
        """The group of the shards' gatherers: they share the partial-answer topic's partitions."""
        return f"{self.indexer_group}.gather"

    def owns(self, partition: int) -> bool:
        """Is catalog partition ``partition`` in this instance's shard?"""
        return partition % self.index_shards == self.index_shard


class ClientSettings(CommonSettings):
    """The query client and the catalog feed."""

    reply_timeout_s: float = Field(10.0, gt=0)
    client_id: str = "lookalike-client"
    client_key: SecretStr | None = None  # set: queries are signed as client_id (docs/security.md)


class FeedbackSettings(CommonSettings):
    """The feedback aggregator (``python -m feedback``): windows, the reply join, the trigger policy.

    ``feedback_group`` is the consumer group and the Redis namespace the aggregator, the
    trainer and ``lookalike metrics`` share. A trigger knob set to 0 turns that reason off.
    """

    feedback_group: str = "lookalike-feedback"
    indexer_group: str = "lookalike-indexer"  # whose status in Redis gives the catalog size
    bucket_s: int = Field(60, ge=1)  # metric windows are made of buckets this long
    keep_hours: float = Field(24.0, gt=0)  # buckets expire from Redis after this
    reply_ttl_s: int = Field(24 * 3600, ge=1)  # how long a reply can be joined to its feedback
    pending_ttl_s: int = Field(3600, ge=1)  # feedback that came before its reply waits this long
    dedup_ttl_s: int = Field(24 * 3600, ge=1)  # one (request, item, event) counts once within this
    query_samples_per_bucket: int = Field(200, ge=1)  # query vectors kept per bucket for drift
    catalog_sample_rate: float = Field(0.05, gt=0, le=1)  # catalog vectors kept for drift (by item-id hash)
    catalog_sample_max: int = Field(5000, ge=1)
    max_pairs: int = Field(100_000, ge=1)  # (query item, item, label) pairs kept for the trainer
    policy_interval_s: float = Field(5.0, gt=0)
    trigger_min_feedback: int = Field(1000, ge=0)  # new click/cart/purchase/dismiss events since the last training
    trigger_drop_metric: Literal["ctr_at_5", "purchase_rate", "add_to_cart_rate"] = "ctr_at_5"
    trigger_drop_fraction: float = Field(0.2, ge=0, le=1)  # recent < baseline * (1 - this)
    trigger_baseline_minutes: float = Field(60.0, gt=0)  # the serving model's first minutes
    trigger_recent_minutes: float = Field(15.0, gt=0)
    trigger_min_impressions: int = Field(200, ge=1)  # in each window, for the drop to count
    trigger_catalog_growth: float = Field(0.2, ge=0)  # (items now - items at training) / items at training
    trigger_drift: float = Field(0.1, ge=0, le=2)  # 1 - cos(mean query vector, mean catalog vector)
    trigger_drift_minutes: float = Field(60.0, gt=0)
    trigger_drift_min_queries: int = Field(100, ge=1)
    trigger_cooldown_s: float = Field(3600.0, ge=0)  # no trigger this soon after a training ended
    trigger_pending_ttl_s: int = Field(1800, ge=1)  # an unanswered trigger is emitted again after this


class TrainerSettings(FeedbackSettings):
    """The trainer service (``python -m training.service``): retrains on triggers, promotes through the gate."""

    trainer_group: str = "lookalike-trainer"
    trainer_data: Path | None = None  # None: the champion's training data
    trainer_epochs: int = Field(0, ge=0)  # 0: the champion's recipe
    trainer_threads: int = Field(0, ge=0)
    pair_weight: float = Field(1.0, ge=0)  # weight of the feedback-pair loss term
    pair_margin: float = Field(0.2, ge=-1, le=1)  # a dismissed item is pushed below this cosine
    pair_batch: int = Field(32, ge=1)
    gate_metric: str = "period_precision_at_5"  # out-of-period P@5; legacy random-split cards: precision_at_5
    gate_margin: float = 0.005
    lease_ttl_s: float = Field(60.0, ge=1)  # renewed every third of it while training
    max_training_s: int = Field(6 * 3600, ge=60)


class StackSettings(BaseSettings):
    """The local single-node stack run from Maven Central jars and Debian's redis-server."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_STACK_", frozen=True, extra="ignore")

    kafka_version: str = "4.4.0"
    kafka_port: int = 19092
    controller_port: int = 19093
    redis_port: int = 16379
    kafka_heap: str = "768m"
    state_dir: Path = Field(default_factory=lambda: default_home() / "stack")
    start_timeout_s: float = 90.0
    # Secured listeners beside the loopback PLAINTEXT one (docs/security.md): SASL_SSL with
    # SCRAM-SHA-512 and/or TLS, with the broker's key and certificate in a PKCS#12 keystore.
    kafka_sasl_ssl_port: int | None = None
    kafka_ssl_port: int | None = None
    kafka_tls_keystore: Path | None = None
    kafka_tls_keystore_password: SecretStr | None = None
    kafka_tls_truststore: Path | None = None  # PEM CA certificates that sign client certificates (mutual TLS)
    kafka_ssl_client_auth: Literal["none", "requested", "required"] = "none"
    kafka_scram_users: dict[str, SecretStr] = Field(default_factory=dict)  # SCRAM-SHA-512 users, made at format time
    redis_password: SecretStr | None = None  # requirepass (AUTH)
    redis_tls_cert_file: Path | None = None  # set: redis_port speaks TLS only (rediss://)
    redis_tls_key_file: Path | None = None
    redis_tls_ca_file: Path | None = None
    kafka_authorizer: bool = False  # StandardAuthorizer with ACLs; ANONYMOUS (the loopback PLAINTEXT listener) is super user
