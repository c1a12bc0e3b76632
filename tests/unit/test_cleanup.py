"""What `lookalike stack gc` and the tests' teardowns would remove, and what they never may."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException

from lookalike.cleanup import THROWAWAY_PREFIXES, carries, check_prefix, key_carries, key_owner, list_groups, production_names
from lookalike.errors import ConfigError
from lookalike.settings import IndexerSettings
from lookalike.snapshots import snapshot_namespace
from lookalike.status import status_key
from lookalike.topics import naming_env, topic_specs, vectors_topic


def production_topics_and_groups() -> list[str]:
    """A default deployment's names, the derived ones too (per-version vectors, shard groups,
    a gateway's reply topic)."""
    shard = IndexerSettings(index_shards=2, index_shard=1)
    return [*production_names(), *(spec.name for spec in topic_specs(shard)), vectors_topic(shard, "v20250101-abc"),
            shard.query_group, shard.gather_group, f"{shard.reply_topic_prefix}.gateway-host-1"]


def production_keys() -> list[str]:
    s = IndexerSettings()
    # an instance or request id may begin like a throwaway prefix: only the owner counts
    return [f"lookalike:rollout:{s.catalog_topic}", f"lookalike:rollout:{s.catalog_topic}:events",
            status_key(s.indexer_group, "test-host-123"), f"lookalike:indexers:{s.indexer_group}",
            f"{snapshot_namespace(s.query_group, 'v1')}:current",
            "lookalike:feedback:lookalike-feedback:req:bench-1234-r1q0", "lookalike:feedback:lookalike-feedback:totals",
            "lookalike:ratelimit:lookalike-worker:test-client"]


def test_production_names_never_carry_a_throwaway_prefix() -> None:
    for name in production_topics_and_groups():
        assert not carries(name, THROWAWAY_PREFIXES), name
    for key in production_keys():
        assert not key_carries(key, THROWAWAY_PREFIXES), key


def vectors_topic_of(names: dict[str, str], version: str) -> str:
    return f"{names['LOOKALIKE_CATALOG_VECTORS_TOPIC']}.{version}"


def test_a_test_runs_names_all_carry_its_prefix() -> None:
    prefix = "test-0123456789"
    names = naming_env(prefix)
    topics = [v for k, v in names.items() if k.endswith("_TOPIC")]
    groups = [v for k, v in names.items() if k.endswith("_GROUP")]
    assert topics and groups
    assert all(carries(n, [prefix]) for n in [*topics, *groups, vectors_topic_of(names, "v1")])
    group, catalog = names["LOOKALIKE_INDEXER_GROUP"], names["LOOKALIKE_CATALOG_TOPIC"]
    for key in (f"lookalike:rollout:{catalog}", status_key(group, "host-1"), f"lookalike:indexers:{group}",
                f"{snapshot_namespace(group + '.shard-0', 'v1')}:index:0",
                f"lookalike:feedback:{names['LOOKALIKE_FEEDBACK_GROUP']}:req:r1",
                f"lookalike:ratelimit:{names['LOOKALIKE_WORKER_GROUP']}:shop", "test-ratelimit:ab12:shop"):
        assert key_carries(key, THROWAWAY_PREFIXES) and key_carries(key, ["test-"]), key
    # another run's prefix is not this one's
    assert not carries(topics[0], ["test-0123456788"])
    assert not key_carries(f"lookalike:indexers:{group}", ["test-0123456788"])


def test_key_owner_is_the_name_a_key_belongs_to() -> None:
    assert key_owner("lookalike:feedback:test-ab-feedback:req:x") == "test-ab-feedback"
    assert key_owner("test-ratelimit:ab12:shop") == "test-ratelimit"
    assert key_owner("lookalike:short") == "lookalike"


@pytest.mark.parametrize("prefix", ["", "lookalike", "lookalike.", "lookalike-", "lookalike.replies.",
                                    "lookalike-indexer.", "lookalike-worker", "__consumer"])
def test_a_prefix_that_could_reach_production_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError):
        check_prefix(prefix)


def test_the_throwaway_prefixes_are_accepted() -> None:
    assert [check_prefix(p) for p in THROWAWAY_PREFIXES] == list(THROWAWAY_PREFIXES)


class _Listing:
    """What ``AdminClient.list_consumer_groups`` returns: one answer of the broker per call."""

    def __init__(self, answers: list[tuple[list[str], list[KafkaError]]]) -> None:
        self.answers, self.calls = answers, 0

    def list_consumer_groups(self, request_timeout: float) -> Future:  # type: ignore[type-arg]
        names, errors = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        future: Future = Future()  # type: ignore[type-arg]
        future.set_result(SimpleNamespace(valid=[SimpleNamespace(group_id=n) for n in names],
                                          errors=[KafkaException(e) for e in errors]))
        return future


def test_groups_are_listed_again_while_the_coordinator_loads() -> None:
    # What a broker restarted on stored data answered the CI run's first count: no groups, and
    # the error saying why; counted as 0, it made "before" differ from "after".
    loading = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    admin = _Listing([([], [loading]), ([], [loading]), (["g1", "g2"], [])])
    assert list_groups(admin, timeout_s=10) == ["g1", "g2"]  # type: ignore[arg-type]
    assert admin.calls == 3


def test_an_error_still_there_at_the_timeout_is_raised_not_counted_as_zero() -> None:
    admin = _Listing([([], [KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)])])
    with pytest.raises(KafkaException, match="listing consumer groups"):
        list_groups(admin, timeout_s=0.0)  # type: ignore[arg-type]
