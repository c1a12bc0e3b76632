"""The `lookalike` command line: stack, services, topics, training, feed, queries, shoppers, demo, the loop."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lookalike.settings import CommonSettings, default_data


def _stack(args: argparse.Namespace) -> int:
    from control.stack.local import main as stack_main

    if args.action in ("gc", "counts"):
        from confluent_kafka import KafkaException
        from redis.exceptions import RedisError

        settings = _stack_servers()
        try:
            return _stack_gc(args) if args.action == "gc" else _stack_counts(settings)
        except (KafkaException, RedisError) as exc:
            print(f"error: cannot reach Kafka at {settings.kafka_bootstrap} or Redis "
                  f"({type(exc).__name__}: {exc}); is the stack up (lookalike stack up)?", file=sys.stderr)
            return 2
    return stack_main([args.action])


def _stack_counts(settings: CommonSettings) -> int:
    from lookalike.cleanup import counts

    print(counts(settings, timeout_s=10.0))
    return 0


def _stack_servers() -> CommonSettings:
    """The servers the tests would use: ``LOOKALIKE_KAFKA_BOOTSTRAP`` (and ``LOOKALIKE_REDIS_URL``)
    when set, else the local stack's ports (``LOOKALIKE_STACK_*``; the client settings' defaults
    are the default stack's, not necessarily this one's)."""
    import os

    from control.stack.local import LocalStack

    if os.environ.get("LOOKALIKE_KAFKA_BOOTSTRAP"):
        return CommonSettings()
    stack = LocalStack()
    return CommonSettings(kafka_bootstrap=stack.kafka.bootstrap, redis_url=stack.redis.url)


def _stack_gc(args: argparse.Namespace) -> int:
    """List (by default) or remove (``--apply``) what runs left under the throwaway prefixes."""
    from lookalike import cleanup
    from lookalike.errors import ConfigError

    settings = _stack_servers()
    prefixes = args.prefix or list(cleanup.THROWAWAY_PREFIXES)
    try:
        found = cleanup.find(settings, prefixes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Kafka {settings.kafka_bootstrap}, Redis {settings.redis_url.get_secret_value().rsplit('@', 1)[-1]}; "
          f"prefixes {' '.join(prefixes)}")
    for prefix in prefixes:
        print(f"  {prefix:16} {found.under(prefix).summary()}")
    for what, names in (("topic", found.topics), ("group", found.groups), ("key", found.keys)):
        shown = names if args.verbose or len(names) <= 20 else names[:20]
        for name in shown:
            print(f"  {what:5} {name}")
        if len(shown) < len(names):
            print(f"  ... {len(names) - len(shown)} more {what}s (-v lists them all)")
    if not args.apply:
        print(f"dry run: {found.summary()} would be removed (--apply removes them)")
        return 0
    left = cleanup.remove(settings, found)
    print(f"removed: {found.summary()}" + (f"; still there: {left.summary()} ({' '.join(left.groups + left.topics)})"
                                          if left else ""))
    print(cleanup.counts(settings))
    return 1 if left else 0


def _services(args: argparse.Namespace) -> int:
    from control.services import LocalServices
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
    with QueryClient(ClientSettings(), impressions_for=args.user, impressions=not args.no_impressions) as client:
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
        print(f"request {reply['request_id']}  " + (f"impressions recorded for user {client.session_id}: "
              f"lookalike feedback click --request-id {reply['request_id']} --item-id ITEM --user {client.session_id}"
              if client.impressions_for else "no impressions recorded"))
    else:
        print(f"error {reply['error']['code']}: {reply['error']['message']}")
    if args.gallery:
        query_image = open_image(image) if image else image_loader(args.images)(args.item_id)
        render_rows([(query_image, reply)], image_loader(args.images)).save(args.gallery)
        print(f"gallery: {args.gallery}")
    return 0 if reply["status"] == "ok" else 1


def _status(args: argparse.Namespace) -> int:
    from feedback.report import trigger_line, trigger_records
    from lookalike import rollout
    from lookalike.settings import CommonSettings
    from lookalike.status import indexer_status

    statuses = indexer_status()
    settings = CommonSettings()
    client = rollout.redis_client(settings)
    state = rollout.read_state(client, settings)
    events = rollout.read_events(client, settings, count=5)
    if args.json:
        print(json.dumps({"indexers": [s.model_dump(mode="json") for s in statuses],
                          "rollout": state.to_redis() if state else None, "events": events,
                          "triggers": trigger_records(limit=5)}, indent=2))
        return 0
    if not statuses:
        print("no indexer is reporting (is `lookalike services up` running?)")
    rows = [("instance", "shard", "model", "items", "caught up", "catalog position", "snapshot", "age")]
    for s in statuses:
        position = " ".join(f"{p}:{o}" for p, o in sorted(s.catalog_position.items())) or "-"
        snapshot = f"{s.snapshot_items} items, {time.time() - s.snapshot_at:.0f}s ago" if s.snapshot else "none"
        rows.append((s.instance, s.shard, s.model_version or "-", str(s.items), "yes" if s.caught_up else "no",
                     position, snapshot, f"{time.time() - s.updated_at:.1f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if state is not None:
        building = f", building {state.target}" if state.target else ""
        print(f"\nrollout: serving {state.serving}{building}; previous {state.previous or '-'}")
    for event in events:
        print(f"  {event}")
    latest = trigger_records(limit=1)
    print(f"\nlast retraining trigger: {trigger_line(latest[0]) if latest else 'none'}")
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
    from feedback.report import trigger_line, trigger_records

    triggers = trigger_records(limit=5)
    if triggers:
        print("\nretraining triggers, newest first:")
        print("\n".join(f"  {trigger_line(r)}" for r in triggers))
    return 0


def _feedback(args: argparse.Namespace) -> int:
    from lookalike.errors import InvalidMessage
    from lookalike.settings import ClientSettings
    from producers.feedback import FeedbackProducer

    producer = FeedbackProducer(ClientSettings())
    try:
        for item_id in args.item_id:
            producer.emit(args.event, request_id=args.request_id, item_id=item_id, user_id=args.user,
                          timestamp_ms=args.timestamp)
    except InvalidMessage as exc:
        print(f"error {exc.code}: {exc}", file=sys.stderr)
        return 2
    failed = producer.flush()
    print(f"sent {producer.sent - failed} {args.event} event(s) for request {args.request_id}")
    return 1 if failed else 0


def _metrics(args: argparse.Namespace) -> int:
    from feedback.report import metrics_report, render_table
    from lookalike.settings import FeedbackSettings

    settings = FeedbackSettings()
    report = metrics_report(settings, model_version=args.model_version, minutes=args.minutes)
    print(json.dumps(report, indent=1) if args.json else render_table(report))
    if args.plot:
        from feedback.plots import plot_series
        from feedback.report import metrics_series

        series = metrics_series(settings, model_version=args.model_version, minutes=args.minutes)
        print(f"figures: {plot_series(series, args.plot, settings.bucket_s)}")
    return 0


def _trainer(args: argparse.Namespace) -> int:
    from training.service import main as trainer_main

    trainer_main()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from control.demo import run_demo

    if args.loop:
        from control.loop import LoopOptions, run_loop

        return run_loop(LoopOptions(data=Path(args.data), rate=args.rate, trigger_feedback=args.trigger_feedback,
                                    champion_epochs=args.champion_epochs, trainer_epochs=args.trainer_epochs,
                                    catalog_items=args.catalog_items, out=Path(args.out), keep=args.keep))
    return run_demo(Path(args.data), limit=args.limit, queries=args.queries, gallery=Path(args.gallery),
                    epochs=args.epochs, train=args.train)


def _page(args: argparse.Namespace) -> int:
    from control.page import open_page

    return open_page(browser=not args.no_browser)


def _shoppers(args: argparse.Namespace) -> int:
    from control.shoppers import run_shoppers

    return run_shoppers(Path(args.data), rate=args.rate, lanes=args.lanes, duration_s=args.duration,
                        queries=args.queries, seed=args.seed)


def _acls(args: argparse.Namespace) -> int:
    from lookalike.acls import bindings, grants, kafka_acls_commands, topic_namespace, wait_until_enforced
    from lookalike.settings import CommonSettings, IndexerSettings, TrainerSettings, WorkerSettings

    group = {"worker": lambda: WorkerSettings().worker_group, "indexer": lambda: IndexerSettings().indexer_group,
             "feedback": lambda: TrainerSettings().feedback_group,
             "trainer": lambda: TrainerSettings().trainer_group}.get(args.service, lambda: None)()
    settings = CommonSettings()
    wanted = grants(args.service, settings, group=group)
    if any(g.operation == "WRITE" and g.pattern == "prefixed" and topic_namespace(settings).startswith(g.name)
           for g in wanted):
        print(f"warning: LOOKALIKE_REPLY_TOPIC_PREFIX={settings.reply_topic_prefix!r} covers every topic; "
              "the reply Write ACL is not least privilege", file=sys.stderr)
    if not args.apply:
        print("\n".join(kafka_acls_commands(args.principal, wanted, settings.kafka_bootstrap)))
        return 0
    from confluent_kafka.admin import AdminClient

    from lookalike.clients import confluent_config

    admin = AdminClient(confluent_config(settings))  # as the admin principal these settings authenticate
    acl_bindings = bindings(args.principal, wanted)
    for future in admin.create_acls(acl_bindings, request_timeout=30).values():
        future.result(timeout=30)
    wait_until_enforced(admin, acl_bindings)
    print(f"{len(wanted)} ACLs for {args.principal} ({args.service})")
    return 0


def _keys(args: argparse.Namespace) -> int:
    import json

    from lookalike.auth import new_key
    from lookalike.credentials import write_secret

    path = Path(args.file)
    keys = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    if args.client_id in keys and args.if_missing:
        return 0
    keys[args.client_id] = new_key()
    write_secret(path, (json.dumps(keys, indent=2) + "\n").encode(), mode=0o600)  # 0600 from its first byte
    print(f"LOOKALIKE_CLIENT_ID={args.client_id} LOOKALIKE_CLIENT_KEY={keys[args.client_id]}")
    return 0


def _secrets(args: argparse.Namespace) -> int:
    """``secrets init``: make the compose deployment's secrets; ``secrets provision``: SCRAM
    users, topics and ACLs on the broker, as the admin these settings authenticate."""
    import json

    from lookalike import credentials

    if args.action == "init":
        owners = {}
        for spec in args.owner or []:
            folder, _, ids = spec.partition("=")
            uid, _, gid = ids.partition(":")
            owners[folder] = (int(uid), int(gid or uid))
        made = credentials.init(Path(args.root), owners=owners, rotate=args.rotate or [])
        print(f"secrets under {args.root}: {len(made)} file(s) written" + (f" ({', '.join(made)})" if made else ""))
        return 0
    from lookalike.settings import IndexerSettings, TrainerSettings, WorkerSettings

    users = json.loads(Path(args.users_file).read_text("utf-8"))
    trainer = TrainerSettings()
    groups = {"worker": WorkerSettings().worker_group, "indexer": IndexerSettings().indexer_group,
              "feedback": trainer.feedback_group, "trainer": trainer.trainer_group}
    counts = credentials.provision(trainer, users, groups=groups)
    print("SCRAM users, topics and ACLs provisioned: " + ", ".join(f"{n} ({c} ACLs)" for n, c in counts.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local Kafka + Redis stack; what tests and benchmarks left on it")
    p.add_argument("action", choices=["up", "down", "status", "gc", "counts"],
                   help="gc: list the leftovers under the throwaway prefixes (--apply removes them); "
                        "counts: the broker's topics and groups and Redis' keys, one line")
    p.add_argument("--apply", action="store_true", help="gc: remove what it lists")
    p.add_argument("--prefix", action="append", metavar="P",
                   help="gc: only names under P (repeatable; default: the tests' and benchmarks' prefixes)")
    # also after the action (`stack gc -v`, as gc's own hint says); SUPPRESS keeps a `-v` given
    # before `stack` from being reset to False here
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="gc: list every name (the first 20 of each kind otherwise)")
    p.set_defaults(func=_stack)

    p = sub.add_parser("services", help="the worker, indexer, feedback aggregator and trainer as local daemons")
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
    p.add_argument("--user", help="the user or session id the impressions are recorded for (default: a new one)")
    p.add_argument("--no-impressions", action="store_true", help="do not record the results as shown")
    p.set_defaults(func=_query)

    p = sub.add_parser("status", help="what the indexers report, and the rollout state")
    p.add_argument("--json", action="store_true", help="the typed status records as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("health", help="exit 0 when the service's heartbeat is fresh (container healthchecks)")
    p.add_argument("service", choices=["worker", "indexer", "feedback"])
    p.set_defaults(func=_health)

    p = sub.add_parser("models", help="stored models, the promotion gate, rollback")
    p.add_argument("action", choices=["list", "promote", "rollback", "decisions"])
    p.add_argument("version", nargs="?", help="for promote: the challenger (version or alias)")
    p.add_argument("--margin", type=float, default=0.005, help="P@5 a challenger must gain (default %(default)s)")
    p.set_defaults(func=_models)

    p = sub.add_parser("feedback", help="publish feedback events (what a shopper did with a result)")
    p.add_argument("event", choices=["impression", "click", "add_to_cart", "purchase", "dismiss"])
    p.add_argument("--request-id", required=True, help="the request id of the reply that showed the item")
    p.add_argument("--item-id", required=True, nargs="+", help="the item(s) the event is about")
    p.add_argument("--user", required=True, help="user or session id (the record key)")
    p.add_argument("--timestamp", type=int, help="milliseconds since the epoch (default: now)")
    p.set_defaults(func=_feedback)

    p = sub.add_parser("metrics", help="feedback metrics per model version (CTR@5, purchase rate, ...)")
    p.add_argument("--model-version", help="only this model version")
    p.add_argument("--minutes", type=float, help="the last N minutes (default: everything kept)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, metavar="FILE", help="draw the per-version figures over time into FILE (PNG)")
    p.set_defaults(func=_metrics)

    p = sub.add_parser("shoppers", help="simulated shoppers against the running stack (docs/feedback.md#shoppers)")
    p.add_argument("--data", default=str(default_data()), help="where the product photos come from")
    p.add_argument("--rate", type=float, default=2.0, help="queries per second (default %(default)s)")
    p.add_argument("--lanes", type=int, default=2, help="shoppers asking at the same time (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default %(default)s)")
    p.add_argument("--queries", type=int, help="stop after this many queries instead")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_shoppers)

    p = sub.add_parser("trainer", help="run the trainer service in the foreground (retrains on triggers)")
    p.set_defaults(func=_trainer)

    p = sub.add_parser("acls", help="the Kafka ACLs a component needs (docs/security.md)")
    p.add_argument("service", choices=["worker", "indexer", "feedback", "trainer", "gateway", "query-client",
                                       "catalog-feed", "admin"])
    p.add_argument("--principal", required=True, help="e.g. User:lookalike-worker")
    p.add_argument("--apply", action="store_true", help="create them (these settings must authenticate an admin)")
    p.set_defaults(func=_acls)

    p = sub.add_parser("secrets", help="the compose deployment's secrets (docs/running.md)")
    p.add_argument("action", choices=["init", "provision"])
    p.add_argument("--root", default="/init", help="init: the folder the secret volumes are mounted under")
    p.add_argument("--owner", action="append", metavar="FOLDER=UID[:GID]",
                   help="init: who owns a folder's files (default kafka=1000, redis=999, *=10001)")
    p.add_argument("--rotate", action="append", metavar="NAME",
                   help="init: make anew an identity's Kafka password, `redis`, or `signing-key-demo`/`-web` (docs/running.md)")
    p.add_argument("--users-file", default="/secrets/scram-users.json", help="provision: the SCRAM users' passwords")
    p.set_defaults(func=_secrets)

    p = sub.add_parser("keys", help="add a query-signing key for a client to a keys file")
    p.add_argument("client_id")
    p.add_argument("--file", required=True, help="the JSON keys file the worker reads (LOOKALIKE_QUERY_KEYS_FILE)")
    p.add_argument("--if-missing", action="store_true", help="leave an existing key alone")
    p.set_defaults(func=_keys)

    p = sub.add_parser("demo", help="the whole path on the sample catalog")
    p.add_argument("--data", default=str(default_data()), help="catalog folder (env LOOKALIKE_DATA)")
    p.add_argument("--limit", type=int)
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--epochs", type=int, help="train the default recipe this many epochs (implies --train)")
    p.add_argument("--train", action="store_true",
                   help="with no champion in the store, train the default recipe instead of installing the shipped model")
    p.add_argument("--gallery", default="out/demo-gallery.png")
    loop = p.add_argument_group("the feedback loop (--loop, docs/feedback.md#the-loop-watched)")
    loop.add_argument("--loop", action="store_true", help="run the loop on the running stack instead of the demo")
    loop.add_argument("--rate", type=float, default=3.0, help="shopper queries per second (default %(default)s)")
    loop.add_argument("--trigger-feedback", type=int, default=150, help="labelled events that trigger (%(default)s)")
    loop.add_argument("--champion-epochs", type=int, default=1, help="the loop champion's recipe (%(default)s)")
    loop.add_argument("--trainer-epochs", type=int, default=3, help="the trainer's retraining of it (%(default)s)")
    loop.add_argument("--catalog-items", type=int, default=2000, help="the loop's catalog (%(default)s)")
    loop.add_argument("--out", default="out", help="where the table and the PNGs go (%(default)s)")
    loop.add_argument("--keep", action="store_true", help="keep the run's topics and Redis keys")
    p.set_defaults(func=_demo)

    p = sub.add_parser("page", help="open the shopper's web page (served by the gateway) in a browser")
    p.add_argument("--no-browser", action="store_true", help="only check the gateway and print the URL")
    p.set_defaults(func=_page)
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
