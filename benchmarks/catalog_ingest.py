"""Catalog ingestion into the vector topic: the worker's catalog path against the bare model.

    python -m benchmarks.catalog_ingest --images DIR --items 4000            # through Kafka
    python -m benchmarks.catalog_ingest --images DIR --direct                # no broker
    python -m benchmarks.catalog_ingest --images DIR --direct --device cuda  # on a GPU machine

The worker's own code is measured, with the worker's settings (``LOOKALIKE_*``: threads,
catalog batch size, layout) and the model store's champion (``--models``, ``--version``):

* ``kafka`` (default): the catalog images are published to a catalog topic of this run's own
  (``bench-ingest-{run}.*``, removed at the end), then :meth:`workers.app.Worker.catalog_loop`
  consumes them, embeds them and produces their vectors to the version's vector topic, as the
  service does. Rate: vectors acknowledged by the broker per second, from the first one to
  the last (the consumer group's start-up is left out);
* ``--direct``: the same messages handed to :meth:`workers.app.EmbeddingWorker.catalog_batch`
  in catalog-sized batches, no broker: what decode + embed + building the records cost,
  interleaved with as many bare forward passes (``ratio_to_interleaved_bare``).

Either way, the bare model's batched forward rate (random input already preprocessed, the
same batch size, threads and layout) is measured just before and just after in the same
process, and the ratio to their mean is reported: on a shared box the ratio within one run
is the honest figure, not the images/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from benchmarks.model_rate import forward_rate
from lookalike.cleanup import remove_prefix
from lookalike.clients import confluent_config, producer_config
from lookalike.settings import WorkerSettings
from lookalike.topics import TopicSpec, ensure_topics
from workers.app import EmbeddingWorker, ModelSet, Worker
from workers.stages import Source as Origin

METADATA = b'{"title": "bench"}'


def read_images(folder: Path, items: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    if not files:
        raise SystemExit(f"no images in {folder}")
    return [files[i % len(files)].read_bytes() for i in range(items)]


def bare_rate(models: ModelSet, version: str, settings: WorkerSettings, budget_s: float) -> float:
    embedder = models.get(version)
    return float(np.median(forward_rate(embedder, settings.catalog_batch_max, channels_last=settings.channels_last,
                                        budget_s=budget_s)))


def direct(worker: EmbeddingWorker, version: str, images: list[bytes], batch: int,
           block: int = 4) -> dict[str, Any]:
    """catalog_batch on prepared events, in this thread, interleaved with the bare model.

    Every ``block`` catalog batches are followed by as many bare forward passes of the same
    size (random preprocessed input, already a tensor): a neighbour's job that slows one
    slows the other too, so their ratio holds on a shared box where the images/s do not."""
    embedder = worker.models.get(version)
    size = embedder.card.preprocess.size
    x = embedder.to_input(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    events = [(f"bench-{i}".encode(), data, {"metadata": METADATA}, Origin("catalog", i % 4, i))
              for i, data in enumerate(images)]
    worker.catalog_batch(events[:batch], version)  # warm-up: first calls allocate
    embedder.forward(x)
    vectors, ingest_s, bare_s, bare_images = 0, 0.0, 0.0, 0
    for i in range(0, len(events), batch * block):
        started = time.perf_counter()
        for j in range(i, min(i + batch * block, len(events)), batch):
            out, _dead = worker.catalog_batch(events[j:j + batch], version)
            vectors += len(out)
        ingest_s += time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(block):
            embedder.forward(x)
        bare_s += time.perf_counter() - started
        bare_images += block * batch
    return {"vectors": vectors, "seconds": round(ingest_s, 3), "images_per_s": round(vectors / ingest_s, 1),
            "interleaved_bare_images_per_s": round(bare_images / bare_s, 1),
            "ratio_to_interleaved_bare": round((vectors / ingest_s) / (bare_images / bare_s), 3)}


async def through_kafka(settings: WorkerSettings, models: ModelSet, version: str, images: list[bytes],
                        timeout_s: float) -> dict[str, Any]:
    """Publish, then run the worker's catalog loop until every vector is acknowledged."""
    producer = Producer(producer_config(settings, **{"linger.ms": 20}))
    for i, data in enumerate(images):
        while True:
            try:
                producer.produce(settings.catalog_topic, key=f"bench-{i}".encode(), value=data,
                                 headers=[("metadata", METADATA)])
                break
            except BufferError:
                producer.poll(0.1)
    producer.flush(60)
    vectors_topic = f"{settings.catalog_vectors_topic}.{version}"
    worker = Worker(settings, models)
    task = asyncio.create_task(worker.catalog_loop(version))
    watcher = Consumer(confluent_config(settings, **{"group.id": f"{settings.worker_group}-watch"}))
    first: tuple[float, int] | None = None
    done = 0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and done < len(images):
            await asyncio.sleep(0.05)
            try:
                meta = watcher.list_topics(vectors_topic, timeout=5).topics.get(vectors_topic)
                if meta is None or meta.error is not None:
                    continue
                done = sum(watcher.get_watermark_offsets(TopicPartition(vectors_topic, p), timeout=5,
                                                         cached=False)[1] for p in meta.partitions)
            except KafkaException:  # a new topic's leaders may still be moving: look again
                continue
            if done and first is None:
                first = (time.perf_counter(), done)
        finished = time.perf_counter()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        worker.embedding.catalog_thread.shutdown()
        worker.sender.close()
        watcher.close()
    if first is None or done < len(images):
        raise SystemExit(f"only {done} of {len(images)} vectors within {timeout_s} s")
    counted = done - first[1]
    elapsed = finished - first[0]
    return {"vectors": done, "seconds": round(elapsed, 3), "images_per_s": round(counted / elapsed, 1),
            "vectors_topic": vectors_topic}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of catalog images")
    parser.add_argument("--items", type=int, default=4000, help="images to ingest (the folder's files, repeated)")
    parser.add_argument("--direct", action="store_true", help="no broker: catalog_batch on prepared messages")
    parser.add_argument("--models", type=Path, help="a model store (default: the worker's)")
    parser.add_argument("--version", help="a model version instead of the champion")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the worker's setting")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds for each bare-model measure")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)

    prefix = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {
        "catalog_topic": f"{prefix}.catalog", "catalog_vectors_topic": f"{prefix}.vectors",
        "deadletter_topic": f"{prefix}.deadletter", "worker_group": prefix,
    }
    if args.models:
        overrides["model_dir"] = args.models
    if args.device:
        overrides["device"] = args.device
    settings = WorkerSettings(**overrides)
    images = read_images(args.images, args.items)
    models = ModelSet(settings)
    version = args.version or models.serving
    if version is None:
        raise SystemExit(f"no model in {settings.models_path}: train one (`lookalike train`)")
    embedder = models.get(version)
    result: dict[str, Any] = {
        "mode": "direct" if args.direct else "kafka", "model_version": version, "device": str(embedder.device),
        "items": len(images), "batch": settings.catalog_batch_max, "channels_last": settings.channels_last,
    }
    bare_before = bare_rate(models, version, settings, args.budget)
    if args.direct:
        worker = EmbeddingWorker(settings, models)
        result["ingest"] = direct(worker, version, images, settings.catalog_batch_max)
    else:
        ensure_topics(settings, [TopicSpec(settings.catalog_topic, settings.partitions),
                                 TopicSpec(settings.deadletter_topic, 1)])
        try:
            result["ingest"] = asyncio.run(through_kafka(settings, models, version, images, args.timeout))
        finally:
            left = remove_prefix(settings, prefix)  # its topics, the worker's group and the watcher's
            if left:
                print(f"{prefix}: not removed: {left.summary()}", file=sys.stderr)
    bare_after = bare_rate(models, version, settings, args.budget)
    bare = (bare_before + bare_after) / 2
    result["bare_model_images_per_s"] = {"before": round(bare_before, 1), "after": round(bare_after, 1)}
    result["ratio_to_bare"] = round(result["ingest"]["images_per_s"] / bare, 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
