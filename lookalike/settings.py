"""Settings, one frozen class per service, read once from ``LOOKALIKE_*`` variables.

Every service shares :class:`CommonSettings` (where Kafka and Redis are, topic names,
message limits) and adds its own knobs. Nothing here does work at import time;
call ``WorkerSettings()`` (etc.) at start-up and pass the object down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
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

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:16379/0")

    catalog_topic: str = "lookalike.catalog"
    queries_topic: str = "lookalike.queries"
    replies_topic: str = "lookalike.replies"
    deadletter_topic: str = "lookalike.deadletter"
    catalog_vectors_topic: str = "lookalike.catalog.vectors"
    query_vectors_topic: str = "lookalike.queries.vectors"
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)

    max_image_bytes: int = Field(8 * MiB, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_k: int = Field(100, ge=1, le=10_000)
    default_k: int = Field(5, ge=1)
    reply_topic_prefix: str = "lookalike."

    # How soon the group notices a member that died without leaving (kill -9, lost host) and
    # hands its partitions to the others; faust's default is 60 s.
    session_timeout_s: float = Field(10.0, ge=6.0)
    home: Path = Field(default_factory=default_home)
    model_dir: Path | None = None
    model_version: str | None = None  # pin a version; None: the store's champion (worker) / any (indexer)
    metrics_host: str = "127.0.0.1"  # where /metrics and /healthz listen (0.0.0.0 in containers)
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with request ids

    @property
    def models_path(self) -> Path:
        return self.model_dir or self.home / "models"


class WorkerSettings(CommonSettings):
    """The embedding worker: micro-batching and where the model runs."""

    worker_group: str = "lookalike-worker"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0)  # 0: torch's default
    query_batch_max: int = Field(16, ge=1)
    query_batch_wait_ms: int = Field(5, ge=0)
    catalog_batch_max: int = Field(64, ge=1)
    catalog_batch_wait_ms: int = Field(100, ge=0)
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
    min_position_wait_s: float = Field(5.0, ge=0)  # how long a query may wait for its min-position
    status_digest: bool = False  # publish a SHA-256 of the live item ids (verification; costs a sort)
    indexer_metrics_port: int = Field(9411, ge=0, le=65535)  # /metrics and /healthz; 0: off


class ClientSettings(CommonSettings):
    """The query client and the catalog feed."""

    reply_timeout_s: float = Field(10.0, gt=0)
    client_id: str = "lookalike-client"


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
