"""`lookalike demo`: stack up, model trained or reused, catalog ingested, queries answered.

The model is the store's champion, or, in a store without one, the model shipped in
``training/shipped`` (``--train``: the default recipe is trained instead, ~14 minutes on a
2-core box). Queries are "shopper photos": held-out catalog items (not ingested) stretched
back to the 3:4 portrait shape of real product shots and resized, so the demo asks for
products the index has never seen, in the geometry users send. (The shipped model learnt
from every labelled item, these included; what it does on unseen products is its recipe's
held-out figure.)
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from PIL import Image

from control.services import LocalServices, indexer_alive
from control.stack import LocalStack
from feedback.report import trigger_line, trigger_records
from lookalike import rollout
from lookalike.artifacts import ModelStore
from lookalike.catalog import CatalogItem, iter_catalog
from lookalike.settings import ClientSettings, CommonSettings, FeedbackSettings, StackSettings
from lookalike.status import wait_for_index
from lookalike.topics import ensure_topics
from producers.catalog_feed import CatalogFeed
from producers.gallery import image_loader, open_image, render_rows
from producers.query_client import QueryClient
from producers.shoppers import shopper_photo

log = logging.getLogger(__name__)


def run_demo(data: Path, *, limit: int | None, queries: int, gallery: Path, epochs: int | None = None,
             train: bool = False, seed: int = 7) -> int:
    settings = ClientSettings()
    external = "LOOKALIKE_KAFKA_BOOTSTRAP" in os.environ
    stack_settings = StackSettings()
    t0 = time.monotonic()
    if not external:
        print("== stack: Apache Kafka (KRaft) + Redis on loopback")
        LocalStack(stack_settings).up()
    ensure_topics(settings)

    from training.cli import main as train_main

    if train or epochs:
        print("== model: reuse the champion, or train the default recipe")
        code = train_main(["--reuse", "--data", str(data), *(["--epochs", str(epochs)] if epochs else [])])
    else:
        print("== model: reuse the champion, or install the shipped one (training/shipped/README.md)")
        code = train_main(["--reuse", "--shipped", "--data", str(data)])
    if code != 0:
        return code

    items = list(iter_catalog(data))
    rng = random.Random(seed)
    rng.shuffle(items)
    held_out, catalog = items[:queries], items[queries:]
    if limit:
        catalog = catalog[:limit]

    print("== services: worker, indexer, feedback aggregator, trainer")
    services = LocalServices(stack_settings)
    services.up()

    print(f"== catalog: publishing {len(catalog)} items from {data}")
    started = time.monotonic()
    feed = CatalogFeed(settings)
    for item in held_out:  # a rerun must not find the held-out items in the catalog
        feed.remove(item.item_id)
    feed.publish_items(catalog)
    feed.flush()
    indexer = services.daemon("indexer")
    # The store's champion is what should answer. A stack that served another model before
    # (an older champion, or another LOOKALIKE_HOME's store) switches to it by a rollout,
    # once its index is built: wait for that, not just for an index of the catalog's size.
    champion = rollout.desired_version(settings)
    state = rollout.read_state(rollout.redis_client(settings), settings)
    if state is not None and state.serving and state.serving != champion:
        print(f"   the stack serves model {state.serving}; waiting for the rollout to {champion}")
    status = wait_for_index(len(catalog), timeout_s=900, settings=settings, check=lambda: indexer_alive(indexer),
                            model_version=champion)
    took = time.monotonic() - started
    print(f"   indexed {status.items} items in {took:.1f}s ({len(catalog) / took:.0f} items/s), "
          f"model {status.model_version}")

    print(f"== queries: {len(held_out)} shopper photos of products the index has never seen")
    served = ModelStore(CommonSettings().models_path).card(champion)
    if (served.training.get("final_fit") or {}).get("trained_on") == "all":
        print(f"   (model {served.version} learnt from every labelled item, these too; the figures of products "
              "it has not seen are its recipe's, measured on the held-out split: docs/training.md)")
    rows: list[tuple[Image.Image | None, dict[str, Any]]] = []
    latencies = []
    hits_same_type = 0
    with QueryClient(settings) as client:
        for item in held_out:
            photo = shopper_photo(item.image_path)
            t = time.perf_counter()
            reply = client.ask(photo, k=5, timeout_s=30)
            latencies.append((time.perf_counter() - t) * 1000)
            rows.append((open_image(photo), reply))
            hits_same_type += print_reply(item, reply)
        more = catalog[0]
        reply = client.ask(None, item_id=more.item_id, k=5, timeout_s=30)
        print(f"\n-- more like catalog item {more.item_id} ({more.label})")
        print_reply(more, reply)
        rows.append((image_loader(data / "images")(more.item_id), reply))

    gallery.parent.mkdir(parents=True, exist_ok=True)
    render_rows(rows, image_loader(data / "images")).save(gallery)
    latencies.sort()
    print(f"\n== {hits_same_type}/{5 * len(held_out)} results share the query's articleType; "
          f"latency publish->reply: median {latencies[len(latencies) // 2]:.0f} ms, max {latencies[-1]:.0f} ms")
    print(f"== gallery: {gallery}")
    from control.page import page_url, wait_healthy

    url = page_url()
    print(f"== shopper's page: {url} (`lookalike page` opens it)" if wait_healthy(url)
          else f"== the gateway did not answer at {url}; see `lookalike services status`")
    triggers = trigger_records(limit=1, settings=FeedbackSettings())
    print("== retraining: " + (f"latest trigger {trigger_line(triggers[0])}" if triggers
                               else "no trigger raised"))
    print(f"== done in {time.monotonic() - t0:.0f}s. The stack and services keep running: "
          "`make down` stops them, `lookalike query IMAGE` asks more, `lookalike metrics` shows the feedback "
          "(the queries above recorded their impressions), `make loop` runs the feedback loop.")
    return 0


def print_reply(item: CatalogItem, reply: dict[str, Any]) -> int:
    """Print a reply's results; returns how many share the query item's label."""
    if reply["status"] != "ok":
        print(f"\n-- query {item.item_id}: ERROR {reply['error']}")
        return 0
    print(f"\n-- query: {item.item_id} {item.label} \"{item.metadata.get('title', '')}\" "
          f"({reply['timings_ms'].get('total', float('nan')):.0f} ms in the pipeline)")
    same = 0
    for rank, hit in enumerate(reply["results"], start=1):
        label = hit["metadata"].get("articleType", "")
        same += label == item.label
        print(f"   {rank}. {hit['item_id']:>6}  {hit['score']:.3f}  {label:<14} {hit['metadata'].get('title', '')[:50]}")
    return same
