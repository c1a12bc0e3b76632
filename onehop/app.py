"""Queries embedded and answered in the indexer: one Kafka hop instead of two.

With ``LOOKALIKE_QUERY_EMBEDDING=indexer``, ``python -m onehop`` runs in place of ``python -m
indexer``: an indexer that also reads the queries topic itself (in
the workers' consumer group, so the query partitions are shared by whoever embeds queries),
embeds a micro-batch with the worker's own query stage (:class:`workers.app.EmbeddingWorker`:
the same checks, signatures, rate limits, decoding and model), searches its index and
produces the replies. The query vector no longer crosses Kafka to reach the index; it is
still published to the query-vector topic, after the fact and marked ``answered``, for the
feedback aggregator's drift samples, and no indexer answers it again.

A query that would have to wait (for its version's index to catch up, or for its
``min-position``) is not answered here: its query vector is published unmarked, and the
indexers' query loop answers it, where each query waits alone (:mod:`indexer.answering`).
So a waiting query holds no other, as on the two-hop path; it just takes that path.

The wire contract is unchanged: the same queries topic, headers and replies. What differs
is where the work runs: an indexer process holds the model (torch), and a query answered
here has no ``hop`` timing. Only without index shards: with shards every shard would embed
every query. See docs/scaling.md ("One hop").
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from indexer.answering import Out
from lookalike import contracts as c
from lookalike.runtime import Loop, Output, Record, Source
from lookalike.settings import WorkerSettings
from workers.app import QUERY_FETCH_MAX, EmbeddingWorker, ModelSet

if TYPE_CHECKING:
    from indexer.service import Indexer

# Batches handled at once: one embeds while the other's replies wait for the broker's
# acknowledgement. Nothing else waits in a batch (a query that must wait for its index or its
# min-position takes the two-hop path: OneHop.handle); more would only split the load into
# smaller batches for the one inference thread, and batching is the capacity.
IN_FLIGHT = 2


class OneHop:
    """The query path of an indexer that embeds its own queries."""

    def __init__(self, indexer: Indexer, settings: WorkerSettings | None = None) -> None:
        self.indexer = indexer
        self.settings = settings or WorkerSettings()
        self.models = ModelSet(self.settings)
        self.embedding = EmbeddingWorker(self.settings, self.models)

    def follow(self) -> None:
        """Embed with the model the indexer serves (its rollout state), and let go of others."""
        state = self.indexer.state
        if state is not None and state != self.models.state:
            self.models.state = state
            self.models.forget([state.serving] if state.serving else [])

    async def handle(self, records: list[Record]) -> list[Output]:
        """Queries -> their replies (and error replies), and their query vectors: marked
        answered, or, for a query that would have to wait for its index or its min-position,
        unmarked, so that the indexers' query loop answers it and it holds no other query."""
        self.follow()
        vectors, errors = await self.embedding.embed_query_records(records, "indexer")
        by_key = {r.key: r for r in records}
        out = [dataclasses.replace(e, answers=by_key.get(e.key)) for e in errors]
        topic = self.indexer.settings.query_vectors_topic
        now: list[tuple[bytes, bytes | None, dict[str, bytes]]] = []
        vector_records: list[Output] = []
        for key, value, headers in vectors:
            if self.indexer.ready_now(named := dict(headers)):
                now.append((key, value, named))
                vector_records.append(Output(topic, key, value, [*headers, (c.H_ANSWERED, b"1")]))
            else:
                vector_records.append(Output(topic, key, value, headers, answers=by_key.get(key)))
        if now:
            loop = asyncio.get_running_loop()
            replies = await loop.run_in_executor(self.indexer.pools.search, self.answer_all, now)
            out += [Output(dest, k, v, h or None, answers=by_key.get(key))
                    for (key, _, _), answered in zip(now, replies, strict=True) for dest, k, v, h in answered]
        return out + vector_records  # the replies are produced first

    def answer_all(self, queries: Sequence[tuple[bytes, bytes | None, dict[str, bytes]]]) -> list[list[Out]]:
        """Each query's reply, from the index of its model version (in the search pool)."""
        return [self.indexer.answer(key, value, headers) for key, value, headers in queries]

    def loop(self) -> Loop:
        s, sender = self.settings, self.indexer.sender
        assert sender is not None, "the loops start inside Indexer.run()"
        loop = Loop(name="embed-answer-queries", service="indexer", sender=sender,
                    source=Source(s, group=s.worker_group, name="queries"), topics=[s.queries_topic],
                    handle=self.handle, on_error=self.embedding.query_failed, in_flight=IN_FLIGHT,
                    batch_max=s.query_batch_max, batch_wait_s=s.query_batch_wait_ms / 1000,
                    triage=self.embedding.late, fetch_max=max(s.query_batch_max, QUERY_FETCH_MAX))
        self.embedding.queued = loop.batches.__len__
        return loop
