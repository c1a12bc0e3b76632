"""What `lookalike stack gc` and the tests' teardowns would remove, and what they never may."""

from __future__ import annotations

import pytest

from lookalike.cleanup import THROWAWAY_PREFIXES, carries, check_prefix, key_carries, key_owner, production_names
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
