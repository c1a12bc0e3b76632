"""The `lookalike` command line: stack, services, topics, training, feed, queries, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lookalike.settings import default_data


def _stack(args: argparse.Namespace) -> int:
    from lookalike.stack.local import main as stack_main

    return stack_main([args.action])


def _services(args: argparse.Namespace) -> int:
    from lookalike.services import LocalServices
    from lookalike.settings import StackSettings

    services = LocalServices(StackSettings())
    if args.action == "up":
        services.up()
    elif args.action == "down":
        services.down()
    for name, line in services.status().items():
        print(f"{name:8} {line}")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from lookalike.settings import CommonSettings
    from lookalike.topics import ensure_topics, topic_specs

    settings = CommonSettings()
    created = ensure_topics(settings)
    for spec in topic_specs(settings):
        print(f"{spec.name:32} {spec.partitions} partitions {'(created)' if spec.name in created else ''}")
    return 0


def _feed(args: argparse.Namespace) -> int:
    from itertools import islice

    from lookalike.catalog import iter_catalog
    from lookalike.settings import ClientSettings
    from producers.catalog_feed import CatalogFeed

    feed = CatalogFeed(ClientSettings())
    for item_id in args.remove or []:
        feed.remove(item_id)
    if args.folder:
        feed.publish_items(islice(iter_catalog(Path(args.folder)), args.limit))
    report = feed.flush()
    print(f"published {report.published}, removed {report.removed}, failed {report.failed}")
    return 1 if report.failed else 0


def _query(args: argparse.Namespace) -> int:
    from lookalike.errors import ReplyTimeout
    from lookalike.settings import ClientSettings
    from producers.gallery import image_loader, open_image, render_rows
    from producers.query_client import QueryClient

    image = Path(args.image).read_bytes() if args.image else None
    if image is None and args.item_id is None:
        print("give an IMAGE or --item-id", file=sys.stderr)
        return 2
    with QueryClient(ClientSettings()) as client:
        try:
            reply = client.ask(image, k=args.k, item_id=args.item_id, timeout_s=args.timeout)
        except ReplyTimeout as exc:
            print(f"timeout: {exc}", file=sys.stderr)
            return 3
    if args.json:
        print(client.last_reply_bytes.decode("utf-8"))  # the reply exactly as it came
    elif reply["status"] == "ok":
        for rank, hit in enumerate(reply["results"], start=1):
            meta = hit["metadata"]
            print(f"{rank}. {hit['item_id']:>8}  {hit['score']:.3f}  {meta.get('articleType', '')}  {meta.get('title', '')}")
        print(f"model {reply['model_version']}  index {reply['index_version']}  timings {reply['timings_ms']}")
    else:
        print(f"error {reply['error']['code']}: {reply['error']['message']}")
    if args.gallery:
        query_image = open_image(image) if image else image_loader(args.images)(args.item_id)
        render_rows([(query_image, reply)], image_loader(args.images)).save(args.gallery)
        print(f"gallery: {args.gallery}")
    return 0 if reply["status"] == "ok" else 1


def _status(args: argparse.Namespace) -> int:
    from lookalike.services import indexer_status

    for status in indexer_status():
        print(json.dumps(status))
    return 0


def _health(args: argparse.Namespace) -> int:
    from lookalike.health import check, heartbeat_path
    from lookalike.settings import CommonSettings

    healthy, reason = check(heartbeat_path(CommonSettings(), args.service))
    print(f"{args.service}: {'healthy' if healthy else 'UNHEALTHY'} ({reason})")
    return 0 if healthy else 1


def _models(args: argparse.Namespace) -> int:
    from lookalike.artifacts import ModelStore
    from lookalike.errors import ModelArtifactError
    from lookalike.registry import Registry
    from lookalike.settings import CommonSettings

    store = ModelStore(CommonSettings().models_path)
    registry = Registry(store, margin=args.margin)
    try:
        if args.action == "promote":
            if not args.version:
                print("promote needs a VERSION", file=sys.stderr)
                return 2
            decision = registry.propose(args.version)
            print(f"{'promoted' if decision.accepted else 'refused'}: {decision.reason}")
            return 0 if decision.accepted else 1
        if args.action == "rollback":
            decision = registry.rollback()
            print(f"champion is {decision.champion_after} again (was {decision.champion_before})")
            return 0
    except ModelArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.action == "decisions":
        for decision in registry.decisions():
            print(json.dumps(decision))
        return 0
    aliases: dict[str, list[str]] = {}
    for alias, version in store.aliases().items():
        aliases.setdefault(version, []).append(alias)
    for version in store.versions():
        card = store.card(version)
        metrics = {k: v for k, v in card.metrics.items() if isinstance(v, int | float)}
        print(f"{version}  {','.join(aliases.get(version, [])):20} {card.spec.arch:8} dim {card.embedding_dim}  "
              f"{json.dumps(metrics)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lookalike.demo import run_demo

    return run_demo(Path(args.data), limit=args.limit, queries=args.queries, gallery=Path(args.gallery),
                    epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local Kafka + Redis stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)

    p = sub.add_parser("services", help="the worker and indexer as local daemons")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_services)

    p = sub.add_parser("topics", help="create the topics that are missing")
    p.add_argument("action", choices=["create"])
    p.set_defaults(func=_topics)

    sub.add_parser("train", help="train a model (see `lookalike train --help`)", add_help=False)
    sub.add_parser("evaluate", help="evaluation report of a stored model (see `lookalike evaluate --help`)",
                   add_help=False)
    sub.add_parser("bench", help="benchmarks against the running stack (see `lookalike bench --help`)",
                   add_help=False)

    p = sub.add_parser("feed", help="publish a catalog folder (Kaggle layout or plain images)")
    p.add_argument("folder", nargs="?")
    p.add_argument("--limit", type=int)
    p.add_argument("--remove", nargs="*", metavar="ITEM_ID", help="publish tombstones for these items")
    p.set_defaults(func=_feed)

    p = sub.add_parser("query", help="ask for the items most similar to an image")
    p.add_argument("image", nargs="?")
    p.add_argument("--item-id", help="more like this catalog item (no image needed)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the reply JSON exactly")
    p.add_argument("--gallery", type=Path, help="write a PNG of the query and its results")
    p.add_argument("--images", type=Path, default=default_data() / "images", help="where result images are")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_query)

    p = sub.add_parser("status", help="what the indexers report")
    p.set_defaults(func=_status)

    p = sub.add_parser("health", help="exit 0 when the service's heartbeat is fresh (container healthchecks)")
    p.add_argument("service", choices=["worker", "indexer"])
    p.set_defaults(func=_health)

    p = sub.add_parser("models", help="stored models, the promotion gate, rollback")
    p.add_argument("action", choices=["list", "promote", "rollback", "decisions"])
    p.add_argument("version", nargs="?", help="for promote: the challenger (version or alias)")
    p.add_argument("--margin", type=float, default=0.005, help="P@5 a challenger must gain (default %(default)s)")
    p.set_defaults(func=_models)

    p = sub.add_parser("demo", help="the whole path on the sample catalog")
    p.add_argument("--data", default=str(default_data()), help="catalog folder (env LOOKALIKE_DATA)")
    p.add_argument("--limit", type=int)
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--epochs", type=int, help="training epochs (default: the training config's)")
    p.add_argument("--gallery", default="out/demo-gallery.png")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from training.cli import main as train_main

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return train_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from training.evaluate import main as evaluate_main

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return evaluate_main(argv[1:])
    if argv[:1] == ["bench"]:
        from benchmarks.run import main as bench_main

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
