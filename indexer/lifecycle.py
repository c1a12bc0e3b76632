"""Which versions' indexes live on an indexer (serving, being built, previous for a
grace period), the rollout step that switches serving, and the snapshot schedule."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import redis

from indexer import stages
from indexer.versions import Pools, VersionIndex
from lookalike import rollout
from lookalike.errors import LookalikeError
from lookalike.rollout import RolloutController, RolloutState
from lookalike.runtime import Sender
from lookalike.settings import IndexerSettings
from lookalike.status import live_status_keys

log = logging.getLogger(__name__)


class Lifecycle:
    """The versions an :class:`indexer.service.Indexer` holds and when they come and go."""

    settings: IndexerSettings
    pools: Pools
    versions: dict[str, VersionIndex]
    state: RolloutState | None
    started: asyncio.Event
    instance: str
    sender: Sender | None

    # -- which versions live --------------------------------------------------------
    @property
    def serving(self) -> VersionIndex | None:
        return self.versions.get(self.state.serving) if self.state and self.state.serving else None

    def ready(self, version: str) -> bool:
        """Has this replica's index of ``version`` caught up with the serving one?"""
        target, serving = self.versions.get(version), self.serving
        if target is None or not target.caught_up.is_set():
            return False
        return serving is None or stages.covers(target.catalog_position, serving.catalog_position)

    def all_ready(self, client: redis.Redis, version: str) -> bool:
        """Ready here and on every other live replica of the group (blocking)."""
        if not self.ready(version):
            return False
        for key in live_status_keys(client, self.settings.indexer_group):
            if key.endswith(f":{self.instance}"):
                continue
            raw = client.hget(key, "ready_versions")
            if raw is not None and version not in json.loads(raw):
                return False
        return True

    def rollout_step(self, client: redis.Redis | None, controller: RolloutController | None) -> RolloutState | None:
        """Advance the rollout and read the state (blocking). None when Redis is away."""
        desired = rollout.desired_version(self.settings)
        if client is None or controller is None:
            return RolloutState(serving=desired) if desired else None
        try:
            controller.tick(desired, lambda v: self.all_ready(client, v))
            return rollout.read_state(client, self.settings)
        except (redis.RedisError, OSError) as exc:
            log.warning("rollout state unavailable (%s); keeping %s", exc, self.state)
            return self.state if self.state else (RolloutState(serving=desired) if desired else None)

    def reconcile(self, state: RolloutState) -> None:
        """Create the indexes the state needs and drop the ones it no longer does."""
        if state != self.state:
            log.info("rollout state: serving %s, building %s, previous %s", state.serving, state.target,
                     state.previous)
        self.state = state
        live = state.active(time.time(), self.settings.rollout_grace_s)
        for version in live:
            if version not in self.versions:
                vi = VersionIndex(self.settings, version, self.pools, owner=self.instance)
                assert self.sender is not None, "reconcile runs inside run()"
                vi.task = asyncio.create_task(vi.run_feed(self.sender), name=f"feed-{version}")
                vi.task.add_done_callback(self._feed_done)
                self.versions[version] = vi
                log.info("index of model %s: started", version)
        for version in [v for v in self.versions if v not in live]:
            vi = self.versions.pop(version)
            if vi.task is not None:
                vi.task.cancel()
            log.info("index of model %s: dropped (%d items); no longer serving or building", version, len(vi))

    def _feed_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("feed %s stopped: %r; it restarts on the next rollout tick", task.get_name(), task.exception())
            for version, vi in list(self.versions.items()):
                if vi.task is task:
                    del self.versions[version]

    async def run_rollout(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            client: redis.Redis | None = rollout.redis_client(s)
            controller: RolloutController | None = RolloutController(client, s)  # type: ignore[arg-type]
        except (redis.RedisError, ValueError) as exc:
            log.warning("no Redis for the rollout state (%s): serving the champion only", exc)
            client = controller = None
        try:
            while True:
                state = await loop.run_in_executor(None, self.rollout_step, client, controller)
                if state is not None:
                    self.reconcile(state)
                    self.started.set()
                elif not self.started.is_set():
                    log.warning("no model to serve yet: no champion in %s and none pinned", s.models_path)
                await asyncio.sleep(s.rollout_poll_s)
        finally:  # stopping: end the feeds (their consumers close) rather than leave them pending
            feeds = [vi.task for vi in self.versions.values() if vi.task is not None]
            for task in feeds:
                task.cancel()
            await asyncio.gather(*feeds, return_exceptions=True)

    # -- snapshots --------------------------------------------------------------------
    async def run_snapshots(self) -> None:
        """Snapshot each version on a schedule and on mutation counts, as that version's one
        writer (a Redis lease per namespace: another replica holding it writes for both);
        Redis being away only delays it. Leases are released on the way out."""
        s = self.settings
        loop = asyncio.get_running_loop()
        last: dict[str, float] = {}
        try:
            while True:
                await asyncio.sleep(0.5)
                for version, vi in list(self.versions.items()):
                    last.setdefault(version, time.monotonic())
                    if not vi.caught_up.is_set():
                        continue
                    try:
                        if not await loop.run_in_executor(self.pools.snapshot, vi.keep_lease):
                            continue  # another replica writes this namespace's snapshots
                        changed = vi.applied_since_snapshot
                        interval_over = time.monotonic() - last[version] >= s.snapshot_interval_s
                        due = changed >= s.snapshot_every_items or (changed and interval_over)
                        if not (due or interval_over):
                            continue
                        if not due and not await loop.run_in_executor(self.pools.snapshot, vi.snapshot_lost):
                            last[version] = time.monotonic()
                            continue
                        await loop.run_in_executor(self.pools.snapshot, vi.snapshot)
                    except (redis.RedisError, OSError, LookalikeError) as exc:
                        log.warning("snapshot of %s failed (%s); queries go on from memory, next try in %.0fs",
                                    version, exc, s.snapshot_interval_s)
                    last[version] = time.monotonic()
        finally:
            for vi in list(self.versions.values()):
                vi.release_lease()
