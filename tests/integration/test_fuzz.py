"""Hostile input at the live services: a property-based fuzz test (hypothesis).

Hypothesis generates batches of catalog events and queries; most carry exactly one
defect whose refusal code is known in advance (a bad key, a bad header, an absurd ``k``,
a disallowed format, a decompression bomb, an over-size value, hostile metadata, a
reply-to outside the prefix or into Lookalike's own topics, ...), some are valid but
unusual (animated, EXIF-rotated, unicode keys, unknown headers and metadata fields), and
good queries for known items are mixed in between. Randomly mutated images (bytes
flipped, cut, spliced) may or may not still decode: for those alone the expected verdict
comes from :func:`lookalike.imaging.decode_image` run here on the same bytes.

The run is seeded (``LOOKALIKE_FUZZ_SEED``, else a random seed, printed either way), so a
failure can be replayed with the same messages. Every batch goes to a running worker and
indexer on the real broker; the test then checks that every query got exactly the reply
it should (error code, or the right item first),
that the dead-letter topic holds exactly the bad catalog events with their codes, that no
reply leaked into the catalog, that the index holds exactly the good catalog items, and
that both services are still alive.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike import contracts as c
from lookalike.clients import confluent_config, producer_config
from lookalike.errors import InvalidMessage
from lookalike.imaging import decode_image
from tests.conftest import Cluster
from tests.images import encode, picture
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, warm_up

pytestmark = pytest.mark.integration

BATCH = 210  # messages per hypothesis example
EXAMPLES = 5  # examples: 1,050 messages in all
ANCHORS = 12  # known items that good queries must find first
MAX_CATALOG_BYTES = 96 * 1024  # small limits, so over-size payloads are cheap to send
MAX_QUERY_BYTES = 48 * 1024
MAX_PIXELS = 250_000
FUZZ_ENV = {
    "LOOKALIKE_MAX_IMAGE_BYTES": str(MAX_CATALOG_BYTES),
    "LOOKALIKE_MAX_QUERY_IMAGE_BYTES": str(MAX_QUERY_BYTES),
    "LOOKALIKE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
    "LOOKALIKE_MAX_K": "50",
    "LOOKALIKE_STATUS_DIGEST": "1",
    "LOOKALIKE_STATUS_INTERVAL_S": "0.5",
    "LOOKALIKE_SNAPSHOTS": "0",
}
OK = "ok"
DECODES = "decodes?"  # a mutated image: the verdict is decode_image's
BROKER_REFUSES = "refused by the broker"  # never reaches the services: the producer gets the error


# -- the images the strategies draw from (built once) ------------------------------------------

def png(img: Image.Image, **params: object) -> bytes:
    return encode(img, "PNG", **params)


ANCHOR_PICTURES = [picture(7_000 + i, (40, 40)) for i in range(ANCHORS)]
ANCHOR_IDS = [f"anchor-{i}" for i in range(ANCHORS)]
ANCHOR_BYTES = [png(p) for p in ANCHOR_PICTURES]
OTHER_BYTES = [encode(picture(8_000 + i, (40, 40)), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
               for i, fmt in enumerate(["JPEG", "PNG", "WEBP"] * 6)]


def exif_rotated(img: Image.Image) -> bytes:
    """Stored turned a quarter left, with EXIF orientation 6 (turn right to display): upright = ``img``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return png(img.transpose(Image.Transpose.ROTATE_90), exif=exif)


def animated(img: Image.Image, fmt: str) -> bytes:
    frames = [img, Image.new("RGB", img.size, (0, 0, 0)), Image.new("RGB", img.size, (255, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)


def png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def over_pixel_limit() -> bytes:
    return png(Image.new("L", (1000, 300), 255))  # 300,000 px > MAX_PIXELS, a few hundred bytes


BAD_IMAGES = {  # name -> bytes that must be refused as bad_image under the fuzz limits
    "gif": encode(picture(1, (16, 16)), "GIF"),
    "animated-gif": encode(picture(1, (16, 16)), "GIF", save_all=True, append_images=[picture(2, (16, 16))]),
    "bmp": encode(picture(1, (16, 16)), "BMP"),
    "tiff": encode(picture(1, (16, 16)), "TIFF"),
    "bomb-png": png_claiming(50_000, 50_000),
    "over-pixel-limit": over_pixel_limit(),
    "empty": b"",
    "truncated-jpeg": OTHER_BYTES[0][: len(OTHER_BYTES[0]) // 2],
    "header-only-png": ANCHOR_BYTES[0][:33],
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>',
    "jpeg-magic-garbage": b"\xff\xd8\xff\xe0" + b"\x00" * 200,
}


# -- generated messages ------------------------------------------------------------------------

@dataclass
class Message:
    topic: str  # "catalog" or "queries"
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    expected: str  # an error code, OK, or DECODES
    why: str
    anchor: int | None = None  # an ok query that must find this anchor first (or, with item_id, exclude it)
    item_query: bool = False
    reply_to: str | None = None  # where the reply must land (None: the default reply topic)

    position: str = "?"  # partition@offset, once delivered

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep them readable
        size = "null" if self.value is None else f"{len(self.value)} B"
        return f"<{self.topic} {self.position} {self.why} key={self.key!r:.40} value={size} -> {self.expected}>"

    def _repr_pretty_(self, printer, cycle) -> None:  # type: ignore[no-untyped-def]
        printer.text(repr(self))


class Keys:
    """Unique keys, so every reply and dead letter can be told apart."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "splice", "zero"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[pos:]
        elif how == "splice":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[pos : pos + 16] = b"\x00" * len(data[pos : pos + 16])
        if not data:
            break
    return bytes(data)


KEY_DEFECTS = {
    "missing": None,
    "empty": b"",
    "not-utf8": b"\xff\xfe\xfa",
    "cut-utf8": "caf\u00e9".encode()[:-1],
    "surrogate": b"\xed\xa0\x80",
    "newline": b"line\nbreak",
    "del": b"del\x7f",
    "c1-control": "c1\u0085".encode(),
    "too-long": b"x" * 300,
}


def defective_key(kind: str, unique: str) -> bytes | None:
    """A bad key that still identifies its message (except missing and empty ones)."""
    base = KEY_DEFECTS[kind]
    return base if not base else base + unique.encode()


NOISE_HEADERS = st.lists(
    # names Lookalike does not know, one of them not even UTF-8 (Kafka does not check)
    st.tuples(st.sampled_from(["x-trace", "x-\u00fcber", "content-type", "source-topic", "error-code", "X-K",
                               b"\xff\xfe-name"]),
              st.binary(max_size=40)),
    max_size=3,
)

BAD_METADATA = {
    "not-json": b"{title: 'x'}",
    "not-utf8": b'{"title": "\xff"}',
    "nan": b'{"title": "t", "price": NaN}',
    "deep": b'{"a":' * 40 + b"1" + b"}" * 40,
    "lone-surrogate": b'{"title": "\\udc80"}',
    "wrong-type": b'{"title": ["a"]}',
    "not-object": b'["title"]',
    "too-big": b'{"title": "' + b"a" * (c.MAX_METADATA_BYTES + 10) + b'"}',
}

BAD_K = [b"0", b"-1", b"51", b"99999999999999999999999", b"1e3", b"2.5", b" 5", b"5 ", b"+5", b"1_0", b"",
         b"five", "\u0665".encode(), b"\xff", b"9" * 5000]


def catalog_message(draw: st.DrawFn, keys: Keys) -> Message:
    item_id = keys.next("item")
    good_value = draw(st.sampled_from(OTHER_BYTES))
    headers = [(c.H_METADATA, json.dumps({"title": item_id}).encode())]
    kind = draw(st.sampled_from([
        "good", "good-unicode", "good-animated", "good-exif", "good-meta-unknown-fields", "tombstone",
        "bad-key", "bad-image", "too-large", "bad-metadata", "too-many-headers", "mutated", "garbage",
    ]))
    if kind == "good":
        return Message("catalog", item_id.encode(), good_value, headers, OK, kind)
    if kind == "good-unicode":
        key = f"{item_id}-\u00d6l-\U0001d518-\U0001f9e5"
        return Message("catalog", key.encode(), good_value, headers, OK, kind)
    if kind == "good-animated":
        value = animated(picture(draw(st.integers(9_000, 9_100)), (24, 24)), draw(st.sampled_from(["PNG", "WEBP"])))
        return Message("catalog", item_id.encode(), value, headers, OK, kind)
    if kind == "good-exif":
        return Message("catalog", item_id.encode(), exif_rotated(picture(draw(st.integers(9_200, 9_300)), (24, 20))),
                       headers, OK, kind)
    if kind == "good-meta-unknown-fields":
        meta = {"title": item_id, "x-extra": {"nested": [1, 2.5, None, "\u00fc"]}, "year": 2012}
        return Message("catalog", item_id.encode(), good_value,
                       [(c.H_METADATA, json.dumps(meta, ensure_ascii=False).encode()), *draw(NOISE_HEADERS)], OK, kind)
    if kind == "tombstone":  # of an item that never existed: nothing to delete, nothing wrong
        return Message("catalog", item_id.encode(), None, [], OK, kind)
    if kind == "bad-key":
        defect = draw(st.sampled_from(sorted(KEY_DEFECTS)))
        if defect == "missing":  # the broker itself refuses a record without a key on a compacted topic
            return Message("catalog", None, good_value, headers, BROKER_REFUSES, "key missing")
        return Message("catalog", defective_key(defect, item_id), good_value, headers, "bad_key", f"key {defect}")
    if kind == "bad-image":
        name = draw(st.sampled_from(sorted(BAD_IMAGES)))
        return Message("catalog", item_id.encode(), BAD_IMAGES[name], headers, "bad_image", name)
    if kind == "too-large":
        size = draw(st.integers(MAX_CATALOG_BYTES + 1, MAX_CATALOG_BYTES + 4096))
        return Message("catalog", item_id.encode(), good_value + b"\x00" * (size - len(good_value)), headers,
                       "too_large", f"{size} bytes")
    if kind == "bad-metadata":
        name = draw(st.sampled_from(sorted(BAD_METADATA)))
        return Message("catalog", item_id.encode(), good_value, [(c.H_METADATA, BAD_METADATA[name])], "bad_header",
                       f"metadata {name}")
    if kind == "too-many-headers":
        return Message("catalog", item_id.encode(), good_value, [(f"h{i}", b"") for i in range(c.MAX_HEADERS + 1)],
                       "too_large", "headers")
    if kind == "mutated":
        return Message("catalog", item_id.encode(), draw(mutated(good_value)), headers, DECODES, kind)
    return Message("catalog", item_id.encode(), draw(st.binary(min_size=1, max_size=300)), headers, "bad_image", kind)


def query_message(draw: st.DrawFn, keys: Keys, alt_reply_topic: str, prefix: str) -> Message:
    request_id = keys.next("req")
    anchor = draw(st.integers(0, ANCHORS - 1))
    noise = draw(NOISE_HEADERS)
    kind = draw(st.sampled_from([
        "good", "good", "good-exif", "good-animated", "good-k", "good-item", "good-alt-reply", "good-min-position",
        "bad-key", "bad-k", "bad-image", "too-large", "no-image", "unknown-item", "reply-outside-prefix",
        "reply-own-topic", "reply-missing-topic", "reply-bad-name", "bad-min-position", "too-many-headers", "mutated",
        "garbage",
    ]))
    key = request_id.encode()
    if kind == "good":
        return Message("queries", key, ANCHOR_BYTES[anchor], noise, OK, kind, anchor=anchor)
    if kind == "good-exif":
        return Message("queries", key, exif_rotated(ANCHOR_PICTURES[anchor]), noise, OK, kind, anchor=anchor)
    if kind == "good-animated":
        value = animated(ANCHOR_PICTURES[anchor], draw(st.sampled_from(["PNG", "WEBP"])))
        return Message("queries", key, value, noise, OK, kind, anchor=anchor)
    if kind == "good-k":
        k = draw(st.integers(1, 50))
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_K, str(k).encode())], OK, f"k={k}", anchor=anchor)
    if kind == "good-item":
        return Message("queries", key, draw(st.sampled_from([None, b"", b"ignored"])),
                       [(c.H_ITEM_ID, ANCHOR_IDS[anchor].encode())], OK, kind, anchor=anchor, item_query=True)
    if kind == "good-alt-reply":
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_REPLY_TO, alt_reply_topic.encode())], OK, kind,
                       anchor=anchor, reply_to=alt_reply_topic)
    if kind == "good-min-position":
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_MIN_POSITION, b"0:0")], OK, kind, anchor=anchor)
    if kind == "bad-key":
        defect = draw(st.sampled_from(sorted(KEY_DEFECTS)))
        return Message("queries", defective_key(defect, request_id), ANCHOR_BYTES[anchor], noise, "bad_key",
                       f"key {defect}")
    if kind == "bad-k":
        k = draw(st.sampled_from(BAD_K))
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_K, k)], "bad_header", f"k={k[:20]!r}")
    if kind == "bad-image":
        name = draw(st.sampled_from(sorted(BAD_IMAGES)))
        return Message("queries", key, BAD_IMAGES[name], noise, "bad_image", name)
    if kind == "too-large":
        size = draw(st.integers(MAX_QUERY_BYTES + 1, MAX_QUERY_BYTES + 4096))
        return Message("queries", key, ANCHOR_BYTES[anchor] + b"\x00" * (size - len(ANCHOR_BYTES[anchor])), noise,
                       "too_large", f"{size} bytes")
    if kind == "no-image":
        return Message("queries", key, None, noise, "bad_image", kind)
    if kind == "unknown-item":
        return Message("queries", key, None, [(c.H_ITEM_ID, b"never-published")], "unknown_item", kind)
    if kind == "reply-outside-prefix":
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_REPLY_TO, b"somebody.elses.topic")], "bad_header", kind)
    if kind == "reply-own-topic":
        own = draw(st.sampled_from(["catalog", "catalog.vectors", "queries", "queries.vectors", "deadletter"]))
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_REPLY_TO, f"{prefix}.{own}".encode())], "bad_header",
                       f"reply-to {own}")
    if kind == "reply-missing-topic":
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_REPLY_TO, f"{prefix}.nope-{request_id}".encode())],
                       "bad_header", kind)
    if kind == "reply-bad-name":
        name = draw(st.sampled_from([f"{prefix}.has space", f"{prefix}.\u00e9", "\xff", f"{prefix}." + "x" * 300]))
        raw = name.encode("latin-1", "replace") if name == "\xff" else name.encode()
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_REPLY_TO, raw)], "bad_header", kind)
    if kind == "bad-min-position":
        raw = draw(st.sampled_from([b"soon", b"0:-1", b"-1:5", b":", b"0:1:2", b"\xff", b","]))
        return Message("queries", key, ANCHOR_BYTES[anchor], [(c.H_MIN_POSITION, raw)], "bad_header", f"min-position {raw!r}")
    if kind == "too-many-headers":
        return Message("queries", key, ANCHOR_BYTES[anchor], [(f"h{i}", b"1") for i in range(c.MAX_HEADERS + 1)],
                       "too_large", "headers")
    if kind == "mutated":
        return Message("queries", key, draw(mutated(draw(st.sampled_from(OTHER_BYTES)))), noise, DECODES, kind)
    return Message("queries", key, draw(st.binary(min_size=1, max_size=300)), noise, "bad_image", kind)


def verdict(msg: Message, max_bytes: int) -> str:
    """For a mutated image only: what decode_image says about the same bytes."""
    try:
        decode_image(msg.value or b"", max_bytes=max_bytes, max_pixels=MAX_PIXELS)
    except InvalidMessage as exc:
        return exc.code
    return OK


# -- the live side -------------------------------------------------------------------------

@dataclass
class Tally:
    fuzzed: int = 0
    catalog: int = 0
    queries: int = 0
    error_replies: int = 0
    ok_replies: int = 0
    dead_letters: int = 0
    bad_catalog: int = 0
    batches: int = 0
    broker_refused: int = 0  # catalog records without a key: the compacted topic refuses them
    codes: Counter = field(default_factory=Counter)
    good_items: set[str] = field(default_factory=set)


@dataclass
class Fuzzing:
    pipeline: Pipeline
    prefix: str
    alt_reply_topic: str
    producer: Producer
    refused_producer: Producer
    consumer: Consumer
    catalog_published: int = 0
    keys: Keys = field(default_factory=Keys)
    tally: Tally = field(default_factory=Tally)
    replies: dict[str, list[tuple[bytes, dict]]] = field(default_factory=dict)  # topic -> [(key, reply)]
    dead: list[tuple[bytes, str]] = field(default_factory=list)
    catalog_seen: int = 0

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            key = msg.key() or b""
            if msg.topic() == self.pipeline.settings.deadletter_topic:
                code = c.headers_to_dict(msg.headers()).get(c.H_ERROR_CODE, b"?").decode()
                self.dead.append((key, code))
            elif msg.topic() == self.pipeline.settings.catalog_topic:
                self.catalog_seen += 1
            else:
                self.replies.setdefault(msg.topic(), []).append((key, json.loads(msg.value())))


@pytest.fixture(scope="module")
def fuzzing(cluster: Cluster, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzing]:  # type: ignore[no-untyped-def]
    running = start_pipeline(cluster, tiny_model[0], tmp_path_factory.mktemp("fuzz"), FUZZ_ENV)
    try:
        s = running.settings
        prefix = s.catalog_topic.removesuffix(".catalog")
        alt = f"{prefix}.replies.alt"
        admin = AdminClient(confluent_config(s))
        admin.create_topics([NewTopic(alt, 2, 1)])[alt].result(30)
        warm_up(running, png(picture(6_999, (40, 40))))
        feed = running.feed()
        for item_id, data in zip(ANCHOR_IDS, ANCHOR_BYTES, strict=True):
            feed.publish(item_id, data, {"title": item_id})
        feed.flush()
        consumer = Consumer(confluent_config(s, **{"group.id": f"{prefix}-fuzz-reader", "enable.auto.commit": False}))
        topics = [s.replies_topic, alt, s.deadletter_topic, s.catalog_topic]
        consumer.assign([TopicPartition(t, p, 0) for t in topics for p in range(s.partitions)])
        fuzz = Fuzzing(running, prefix, alt, Producer(producer_config(s)),
                       Producer(confluent_config(s, **{"acks": "all", "retries": 0})), consumer,
                       catalog_published=ANCHORS + 1)
        with running.client(reply_to=alt) as client:  # every anchor indexed, the alternative reply topic known
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                reply = client.ask(ANCHOR_BYTES[-1], timeout_s=10, min_position=feed.positions)
                if reply["status"] == "ok":
                    break
                time.sleep(0.5)
            assert reply["status"] == "ok" and reply["results"][0]["item_id"] == ANCHOR_IDS[-1], reply
        fuzz.drain(2.0)  # what the set-up itself wrote (warm-up replies, catalog events) is not fuzz output
        yield fuzz
        consumer.close()
    finally:
        stop_pipeline(running)


def send_and_check(fuzz: Fuzzing, batch: list[Message]) -> None:
    s = fuzz.pipeline.settings
    topic = {"catalog": s.catalog_topic, "queries": s.queries_topic}
    def delivered(msg: Message):  # type: ignore[no-untyped-def]
        def report(err, record) -> None:  # type: ignore[no-untyped-def]
            msg.position = f"{record.partition()}@{record.offset()}" if err is None else f"not delivered: {err}"
        return report

    for msg in batch:
        # A record the broker refuses fails its whole produce request, and an idempotent producer
        # then fails what follows it: those go through a producer of their own.
        producer = fuzz.refused_producer if msg.expected == BROKER_REFUSES else fuzz.producer
        producer.produce(topic[msg.topic], key=msg.key, value=msg.value, headers=msg.headers, on_delivery=delivered(msg))
        producer.poll(0)
        if msg.expected == BROKER_REFUSES:
            producer.flush(30)
    assert fuzz.producer.flush(30) == 0
    refused = [m for m in batch if m.expected == BROKER_REFUSES]
    assert all(m.position.startswith("not delivered") for m in refused), refused
    assert all(m.position[0].isdigit() for m in batch if m.expected != BROKER_REFUSES), "every other message delivered"
    fuzz.tally.broker_refused += len(refused)
    batch = [m for m in batch if m.expected != BROKER_REFUSES]
    fuzz.catalog_published += sum(m.topic == "catalog" for m in batch)

    expected_queries: dict[bytes, Message] = {}
    anonymous_queries = 0  # missing or empty keys: their error replies are keyed by b""
    bad_catalog: list[tuple[bytes, str]] = []
    for msg in batch:
        expected = msg.expected
        if expected == DECODES:
            expected = verdict(msg, MAX_CATALOG_BYTES if msg.topic == "catalog" else MAX_QUERY_BYTES)
            msg.expected = expected
        note(f"{msg.topic} {msg.why} key={msg.key!r:.40} -> {expected}")
        if msg.topic == "queries":
            if msg.key:
                expected_queries[msg.key] = msg
            else:
                anonymous_queries += 1
        elif expected != OK:
            bad_catalog.append((msg.key or b"", expected))
        elif msg.value is not None:
            fuzz.tally.good_items.add(msg.key.decode())  # type: ignore[union-attr]

    dead_before = len(fuzz.dead)
    seen_before = {t: len(r) for t, r in fuzz.replies.items()}
    deadline = time.monotonic() + 90
    while True:
        fuzz.drain(0.5)
        new = {t: r[seen_before.get(t, 0):] for t, r in fuzz.replies.items()}
        answered = {key for replies in new.values() for key, _ in replies}
        anonymous = sum(1 for replies in new.values() for key, _ in replies if key == b"")
        complete = (set(expected_queries) <= answered and anonymous >= anonymous_queries
                    and len(fuzz.dead) - dead_before >= len(bad_catalog))
        if complete or time.monotonic() > deadline:
            break
        assert fuzz.pipeline.alive(), "a service died:\n" + fuzz.pipeline.logs_tail()
    fuzz.drain(1.0)  # anything extra (a second reply, a dead letter too many) shows up now
    new = {t: r[seen_before.get(t, 0):] for t, r in fuzz.replies.items()}

    missing = set(expected_queries) - {key for replies in new.values() for key, _ in replies}
    assert not missing, f"{len(missing)} queries unanswered, e.g. {[expected_queries[k].why for k in list(missing)[:5]]}"
    got = Counter(key for replies in new.values() for key, _ in replies)
    assert got[b""] == anonymous_queries
    assert all(n == 1 for key, n in got.items() if key), "exactly one reply per query"

    for topic_name, replies in new.items():
        for key, reply in replies:
            jsonschema.validate(reply, c.schema("reply"))
            if key == b"":
                assert reply["error"]["code"] == "bad_key"
                fuzz.tally.error_replies += 1
                fuzz.tally.codes["query:bad_key"] += 1
                continue
            msg = expected_queries[key]
            where = msg.reply_to or s.replies_topic
            assert topic_name == where, (msg.why, topic_name)
            if msg.expected == OK:
                assert reply["status"] == "ok", (msg.why, reply)
                ids = [h["item_id"] for h in reply["results"]]
                anchor_id = None if msg.anchor is None else ANCHOR_IDS[msg.anchor]
                if anchor_id is None:  # a mutated image that still decodes: any answer is right
                    assert ids, (msg.why, reply)
                elif msg.item_query:
                    assert anchor_id not in ids and ids, (msg.why, reply)
                else:
                    assert ids[0] == anchor_id and reply["results"][0]["score"] > 0.999, (msg.why, reply)
                fuzz.tally.ok_replies += 1
            else:
                assert reply["status"] == "error" and reply["error"]["code"] == msg.expected, (msg.why, reply)
                fuzz.tally.error_replies += 1
                fuzz.tally.codes[f"query:{msg.expected}"] += 1

    dead = fuzz.dead[dead_before:]
    missing_dead = Counter(bad_catalog) - Counter(dead)
    extra_dead = Counter(dead) - Counter(bad_catalog)
    assert not missing_dead and not extra_dead, (
        f"dead letters missing: {[m for m in batch if (m.key or b'', m.expected) in missing_dead][:10]}, extra: {extra_dead}")
    for _key, code in dead:
        fuzz.tally.codes[f"catalog:{code}"] += 1
    assert fuzz.catalog_seen == fuzz.catalog_published, "nothing but catalog events in the catalog topic"
    assert fuzz.pipeline.alive(), fuzz.pipeline.logs_tail()

    fuzz.tally.fuzzed += len(batch) + len(refused)
    fuzz.tally.catalog += sum(m.topic == "catalog" for m in batch) + len(refused)
    fuzz.tally.queries += sum(m.topic == "queries" for m in batch)
    fuzz.tally.dead_letters += len(dead)
    fuzz.tally.bad_catalog += len(bad_catalog)
    fuzz.tally.batches += 1


def test_fuzzed_hostile_messages_never_crash_the_services(fuzzing: Fuzzing) -> None:
    fuzz = fuzzing
    fuzz_seed = int(os.environ.get("LOOKALIKE_FUZZ_SEED") or secrets.randbits(32))
    print(f"\nfuzz seed {fuzz_seed} (replay: LOOKALIKE_FUZZ_SEED={fuzz_seed})")

    @st.composite
    def batches(draw: st.DrawFn) -> list[Message]:
        out = []
        for _ in range(BATCH):
            if draw(st.booleans()):
                out.append(catalog_message(draw, fuzz.keys))
            else:
                out.append(query_message(draw, fuzz.keys, fuzz.alt_reply_topic, fuzz.prefix))
        return out

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate],  # no shrinking: each example costs a round trip through the services
              suppress_health_check=list(HealthCheck))
    @seed(fuzz_seed)
    @given(batches())
    def run(batch: list[Message]) -> None:
        send_and_check(fuzz, batch)

    run()

    # The index holds exactly the good catalog items (and the anchors and the warm-up item).
    expected_ids = {"warm-up", *ANCHOR_IDS, *fuzz.tally.good_items}
    digest = hashlib.sha256("\n".join(sorted(expected_ids)).encode()).hexdigest()
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        status = fuzz.pipeline.status()
        if status and status.items_digest == digest:
            break
        time.sleep(0.3)
    assert status and status.items_digest == digest, (len(expected_ids), status)

    t = fuzz.tally
    crashes = sum(proc.poll() is not None for proc in fuzz.pipeline.procs.values())  # services that exited
    print(f"\nfuzz (seed {fuzz_seed}): {t.fuzzed} messages in {t.batches} batches ({t.catalog} catalog, {t.queries} queries); "
          f"crashes {crashes}; error replies {t.error_replies}; ok replies {t.ok_replies}; dead letters {t.dead_letters} "
          f"(+{t.broker_refused} key-less catalog records refused by the broker) "
          f"= bad catalog events {t.bad_catalog}; good items indexed {len(t.good_items)}; codes {dict(sorted(t.codes.items()))}")
    (Path(fuzz.pipeline.env["LOOKALIKE_HOME"]) / "fuzz-counts.json").write_text(json.dumps({
        "messages": t.fuzzed, "crashes": crashes, "error_replies": t.error_replies, "ok_replies": t.ok_replies,
        "dead_letters": t.dead_letters, "bad_catalog": t.bad_catalog, "broker_refused": t.broker_refused,
        "codes": dict(t.codes)}))
    assert crashes == 0
    assert t.fuzzed >= 1000
    assert t.dead_letters == t.bad_catalog
    assert t.error_replies + t.ok_replies == t.queries
