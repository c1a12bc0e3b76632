"""The gateway without Kafka: statuses per error code, limits, API keys, CORS, feedback
validation, the picture cache, signing, and the OpenAPI description (a fake bus stands in
for Kafka; tests/integration/test_gateway.py runs the same paths on a real pipeline)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from PIL import Image
from pydantic import SecretStr

from gateway import statuses
from gateway.app import build_app, client_for
from gateway.bus import Answer, GatewayError, Query, record_headers
from gateway.images import CatalogPictures, Picture, PictureCache, image_type, picture_of
from gateway.openapi import spec
from gateway.settings import GatewaySettings
from lookalike import auth
from lookalike import contracts as c
from lookalike.events import parse_feedback
from tests.images import encode, jpeg_bytes, picture

SCHEMA_CODES = c.schema("reply")["properties"]["error"]["oneOf"][1]["properties"]["code"]["enum"]
EXPECTED = {"bad_image": 400, "bad_header": 400, "bad_key": 400, "invalid_message": 400, "unauthorized": 401,
            "unknown_item": 404, "too_large": 413, "rate_limited": 429, "empty_index": 503, "not_ready": 503,
            "model_mismatch": 503, "unavailable": 503, "overloaded": 503, "deadline_exceeded": 504,
            "timeout": 504, "internal": 500, "bad_vector": 500}


class FakeBus:
    """Answers every query with ``reply`` (or raises ``error``) and records what it was asked."""

    def __init__(self, reply: dict[str, Any] | None = None, error: GatewayError | None = None) -> None:
        self.reply = reply
        self.error = error
        self.queries: list[Query] = []
        self.feedback: list[tuple[bytes, bytes]] = []

    async def ask(self, query: Query, request_id: str, deadline_s: float) -> Answer:
        self.queries.append(query)
        if self.error is not None:
            raise self.error
        reply = {**(self.reply or {}), "request_id": request_id}
        return Answer(reply, c.encode_reply(reply), request_id, 0.001)

    async def publish_feedback(self, records: list[tuple[bytes, bytes]], timeout_s: float) -> None:
        self.feedback.extend(records)

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"waiting": 0}


def ok_reply() -> dict[str, Any]:
    return c.ok_reply("r", [{"item_id": "15970", "score": 0.9, "metadata": {"title": "Navy shirt"}}],
                      model_version="m", index_version="m/i", index_position={0: 3}, timings_ms={"total": 4.0})


def settings(**overrides: Any) -> GatewaySettings:
    return GatewaySettings(gateway_instance="unit", max_query_image_bytes=64 * 1024, **overrides)


def call(app: web.Application, fn: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with TestClient(TestServer(app)) as client:
            return await fn(client)

    return asyncio.run(run())


def app_with(bus: FakeBus, pictures: PictureCache | None = None, api_keys: dict[str, SecretStr] | None = None,
             **overrides: Any) -> web.Application:
    return build_app(settings(**overrides), bus, pictures or PictureCache(1024 * 1024), api_keys or {})


# -- statuses --------------------------------------------------------------------------
@pytest.mark.parametrize("code", sorted(SCHEMA_CODES))
def test_every_code_of_the_reply_schema_has_a_status(code: str) -> None:
    assert code in statuses.HTTP_STATUS, f"map {code!r} in gateway/statuses.py"
    assert statuses.http_status(c.error_reply("r", code, "m")) == EXPECTED[code]


def test_ok_is_200_and_an_unknown_code_is_treated_like_internal() -> None:
    assert statuses.http_status(ok_reply()) == 200
    assert statuses.http_status(c.error_reply("r", "brand_new_code", "m")) == 500


def test_retry_after_comes_from_the_rate_limited_message() -> None:
    limited = c.error_reply("r", "rate_limited", "client 'x' is over 20 queries/s (burst 40); retry in 2.30s")
    assert statuses.retry_after_s(limited) == 3
    assert statuses.retry_after_s(c.error_reply("r", "not_ready", "m")) == 1
    assert statuses.retry_after_s(c.error_reply("r", "bad_image", "m")) is None


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_the_app_answers_each_error_reply_with_its_status_and_the_reply_bytes(code: str) -> None:
    reply = c.error_reply("r", code, f"a {code} happened")
    bus = FakeBus(reply)

    async def ask(client: TestClient) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
        response = await client.get("/v1/items/15970/similar")
        return response.status, json.loads(await response.read()), CIMultiDict(response.headers)

    status, body, headers = call(app_with(bus), ask)
    assert status == EXPECTED[code]
    assert body == {**reply, "request_id": headers["X-Request-Id"]}
    assert ("Retry-After" in headers) == (status in (429, 503))


@pytest.mark.parametrize(("error", "status"), [(GatewayError("timeout", "late"), 504),
                                               (GatewayError("unavailable", "no broker"), 503)])
def test_the_gateways_own_errors_are_reply_documents(error: GatewayError, status: int) -> None:
    async def ask(client: TestClient) -> tuple[int, dict[str, Any]]:
        response = await client.post("/v1/similar", data=jpeg_bytes(1))
        return response.status, await response.json()

    got, body = call(app_with(FakeBus(error=error)), ask)
    assert got == status and body["status"] == "error" and body["error"]["code"] == error.code
    assert body["results"] == [] and set(body) >= {"request_id", "model_version", "index_position", "timings_ms"}


# -- what the pipeline is asked --------------------------------------------------------
def test_an_image_query_passes_k_and_min_position_through_unvalidated() -> None:
    bus = FakeBus(ok_reply())
    image = jpeg_bytes(2)

    async def ask(client: TestClient) -> tuple[int, str | None]:
        response = await client.post("/v1/similar?k=seven&min_position=0:5", data=image,
                                     headers={"Content-Type": "image/jpeg"})
        return response.status, response.headers.get("Server-Timing")

    assert call(app_with(bus), ask) == (200, "kafka;dur=1.00")  # the fake bus answers in 1 ms
    assert bus.queries == [Query(image=image, k="seven", item_id=None, min_position="0:5", client_id="web")]


def test_a_multipart_upload_reads_the_image_part_and_form_fields() -> None:
    bus = FakeBus(ok_reply())
    image = jpeg_bytes(3)

    async def ask(client: TestClient) -> int:
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("k", "3")
        form.add_field("image", image, filename="me.jpg", content_type="image/jpeg")
        return (await client.post("/v1/similar", data=form)).status

    assert call(app_with(bus), ask) == 200
    assert bus.queries[0].image == image and bus.queries[0].k == "3"


@pytest.mark.parametrize(("body", "headers", "code"), [
    (b"", {"Content-Type": "image/jpeg"}, "bad_image"),
    (b"x" * (64 * 1024 + 1), {"Content-Type": "image/jpeg"}, "too_large"),
])
def test_bodies_the_gateway_refuses_never_reach_kafka(body: bytes, headers: dict[str, str], code: str) -> None:
    bus = FakeBus(ok_reply())

    async def ask(client: TestClient) -> tuple[int, dict[str, Any]]:
        response = await client.post("/v1/similar", data=body, headers=headers)
        return response.status, await response.json()

    status, reply = call(app_with(bus), ask)
    assert reply["error"]["code"] == code and status == statuses.HTTP_STATUS[code]
    assert bus.queries == []


# -- API keys, CORS ----------------------------------------------------------------------
def test_api_keys_name_the_client_the_query_is_signed_as() -> None:
    keys = {"shop-1": SecretStr("k" * 32), "shop-2": SecretStr("j" * 32)}
    assert client_for("j" * 32, keys, "web") == "shop-2"
    assert client_for(None, keys, "web") == "web"
    assert client_for(None, keys, "") is None
    assert client_for("wrong", keys, "web") is None

    bus = FakeBus(ok_reply())

    async def ask(client: TestClient) -> list[int]:
        return [(await client.get("/v1/items/1/similar", headers=h)).status
                for h in ({"X-API-Key": "k" * 32}, {"Authorization": "Bearer " + "j" * 32}, {"X-API-Key": "nope"}, {})]

    assert call(app_with(bus, api_keys=keys, gateway_public_client=""), ask) == [200, 200, 401, 401]
    assert [q.client_id for q in bus.queries] == ["shop-1", "shop-2"]


def test_signed_headers_verify_as_the_client_and_unsigned_ones_only_claim_it() -> None:
    query = Query(image=b"img", k="5", item_id=None, min_position=None, client_id="shop-1")
    secret = SecretStr(auth.new_key())
    signed = record_headers(query, "lookalike.replies.gateway-a", b"req-1", secret)
    assert auth.verify({"shop-1": secret}, b"req-1", signed, b"img", window_s=60) == "shop-1"
    unsigned = record_headers(query, "lookalike.replies.gateway-a", b"req-1", None)
    assert unsigned == {"reply-to": b"lookalike.replies.gateway-a", "client-id": b"shop-1", "k": b"5"}


def test_cors_only_for_configured_origins() -> None:
    async def ask(client: TestClient) -> tuple[str | None, str | None, int]:
        good = await client.get("/healthz", headers={"Origin": "https://shop.example"})
        bad = await client.get("/healthz", headers={"Origin": "https://evil.example"})
        pre = await client.options("/v1/similar", headers={"Origin": "https://shop.example",
                                                            "Access-Control-Request-Method": "POST"})
        return good.headers.get("Access-Control-Allow-Origin"), bad.headers.get("Access-Control-Allow-Origin"), pre.status

    app = app_with(FakeBus(ok_reply()), gateway_cors_origins=["https://shop.example"])
    assert call(app, ask) == ("https://shop.example", None, 204)


# -- feedback ------------------------------------------------------------------------------
def test_feedback_is_validated_then_published_keyed_by_the_user() -> None:
    bus = FakeBus()
    events = [{"request_id": "r1", "item_id": "15970", "event": "impression"},
              {"request_id": "r1", "item_id": "15970", "event": "click", "timestamp": 1767225600000}]

    async def post(client: TestClient) -> list[tuple[int, Any]]:
        answers = []
        for body in ({"user_id": "sess-1", "events": events},
                     {"user_id": "sess-1", "events": [{"request_id": "r1", "item_id": "1", "event": "like"}]},
                     {"user_id": "", "events": events}, {"events": events}, [1, 2]):
            response = await client.post("/v1/feedback", json=body)
            answers.append((response.status, await response.json()))
        too_big = await client.post("/v1/feedback", data=b"{" + b" " * (70 * 1024) + b"}")
        answers.append((too_big.status, await too_big.json()))
        return answers

    answers = call(app_with(bus), post)
    assert answers[0] == (202, {"accepted": 2})
    assert [status for status, _ in answers[1:]] == [400, 400, 400, 400, 413]
    assert [body["error"]["code"] for _, body in answers[1:]] == ["bad_feedback", "bad_key", "bad_feedback",
                                                                    "bad_feedback", "too_large"]
    parsed = [parse_feedback(key, value) for key, value in bus.feedback]  # only the valid request was sent
    assert [(e.user_id, e.event, e.item_id) for e in parsed] == [("sess-1", "impression", "15970"),
                                                                  ("sess-1", "click", "15970")]
    assert parsed[1].timestamp_ms == 1767225600000


# -- pictures ------------------------------------------------------------------------------
def test_image_types_are_recognised_by_content() -> None:
    img = picture(5)
    assert image_type(encode(img, "JPEG")) == "image/jpeg"
    assert image_type(encode(img, "PNG")) == "image/png"
    assert image_type(encode(img, "WEBP")) == "image/webp"
    assert image_type(encode(img, "GIF")) is None
    assert image_type(b"<svg onload=alert(1)>") is None


def test_the_picture_cache_stays_within_its_bytes_least_recently_used_first() -> None:
    cache = PictureCache(max_bytes=300)
    for n in range(3):
        cache.put(str(n), Picture(bytes(100), "image/jpeg"))
    assert cache.get("0") is not None  # 0 is now the most recently used
    cache.put("3", Picture(bytes(100), "image/jpeg"))
    assert cache.get("1") is None and cache.get("0") is not None and cache.bytes == 300
    cache.put("0", Picture(bytes(50), "image/png"))  # a replacement frees the old bytes
    assert cache.bytes == 250 and cache.get("0").content_type == "image/png"
    cache.put("huge", Picture(bytes(301), "image/jpeg"))
    assert cache.get("huge") is None and cache.bytes <= 300


def test_catalog_records_update_the_pictures_and_large_images_become_thumbnails() -> None:
    gs = settings()
    cache = PictureCache(10 * 1024 * 1024)
    pictures = CatalogPictures(gs, cache, max_item_bytes=20 * 1024, thumbnail_px=64)
    small = jpeg_bytes(7)
    pictures.apply(b"a", small)
    assert cache.get("a") == Picture(small, "image/jpeg")
    noisy = Image.frombytes("RGB", (600, 800), np.random.default_rng(0).integers(0, 256, 600 * 800 * 3, np.uint8).tobytes())
    large = encode(noisy, "PNG")
    assert len(large) > 20 * 1024
    pictures.apply(b"b", large)
    thumb = cache.get("b")
    assert thumb is not None and thumb.content_type == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.data)).size) == 64
    pictures.apply(b"a", None)  # tombstone
    pictures.apply(b"c", b"GIF89a....")  # not an image we serve
    assert cache.get("a") is None and cache.get("c") is None
    assert picture_of(b"\xff\xd8\xff" + b"0" * 30_000, gs, max_item_bytes=1024, thumbnail_px=64) is None


def test_item_pictures_are_served_with_their_type_and_nosniff() -> None:
    cache = PictureCache(1024 * 1024)
    cache.put("15970", Picture(jpeg_bytes(8), "image/jpeg"))

    async def get(client: TestClient) -> list[tuple[int, str | None]]:
        out = []
        for item in ("15970", "nope"):
            response = await client.get(f"/v1/items/{item}/image")
            out.append((response.status, response.headers.get("X-Content-Type-Options")))
        return out

    assert call(app_with(FakeBus(), cache), get) == [(200, "nosniff"), (404, None)]


# -- description ---------------------------------------------------------------------------
def test_the_openapi_description_covers_every_api_route_and_status() -> None:
    app = app_with(FakeBus())
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    described = set(spec("t")["paths"])
    assert {r for r in routes if r.startswith(("/v1", "/healthz", "/metrics"))} == described
    statuses_described = set(spec("t")["paths"]["/v1/similar"]["post"]["responses"])
    assert statuses_described == {"200", *(str(s) for s in set(statuses.HTTP_STATUS.values()))}


def test_the_reply_topic_is_under_the_reply_prefix_and_valid() -> None:
    assert settings().reply_topic == "lookalike.replies.gateway-unit"
    assert GatewaySettings(gateway_instance="a", reply_topic_prefix="test-1.").reply_topic == "test-1.gateway-a"
    with pytest.raises(ValueError, match="LOOKALIKE_GATEWAY_INSTANCE"):
        GatewaySettings(gateway_instance="bad name!", gateway_reply_topic=None)


def test_the_page_url_is_one_a_local_browser_can_open() -> None:
    from control.page import page_url

    assert page_url(GatewaySettings(gateway_host="0.0.0.0", gateway_port=8480)) == "http://127.0.0.1:8480/"
    assert page_url(GatewaySettings(gateway_host="10.0.0.5", gateway_port=9000)) == "http://10.0.0.5:9000/"


@pytest.mark.parametrize(("method", "path", "body", "headers"), [
    ("POST", "/v1/similar", b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
     {"Content-Type": "multipart/form-data; boundary=x"}),  # never closed
    ("POST", "/v1/similar", b"garbage", {"Content-Type": "multipart/form-data"}),  # no boundary
    ("POST", "/v1/similar", b"\x00" * 100, {"Content-Type": "multipart/form-data; boundary="}),
    ("POST", "/v1/feedback", b"\xff\xfe not utf-8", {"Content-Type": "application/json"}),
    ("POST", "/v1/feedback", b'{"user_id": "u", "events": [{"request_id": ["r"], "item_id": {}, "event": 5}]}', {}),
    ("POST", "/v1/feedback", b'{"user_id": "u", "events": [{"request_id": "r", "item_id": "i", "event": "click", '
                              b'"timestamp": true}]}', {}),
    ("GET", "/v1/items/%00%ff/similar?k=%00", None, {}),
    ("GET", "/v1/items/x/similar", None, {"Authorization": "Bearer"}),  # an empty key is no key: public client
    ("GET", "/v1/items/x/similar", None, {"X-API-Key": "k" * 10_000}),
])
def test_hostile_requests_get_a_client_error_never_a_crash(method: str, path: str, body: bytes | None,
                                                           headers: dict[str, str]) -> None:
    bus = FakeBus(c.error_reply("r", "bad_header", "the worker refused it"))

    async def ask(client: TestClient) -> tuple[int, bytes]:
        response = await client.request(method, path, data=body, headers=headers)
        return response.status, await response.read()

    status, raw = call(app_with(bus), ask)
    assert 400 <= status < 500, raw


def test_a_chunked_multipart_body_is_bounded_in_all_not_only_per_part() -> None:
    bus = FakeBus(ok_reply())
    part = b"--b\r\nContent-Disposition: form-data; name=\"filler\"\r\n\r\n" + b"x" * 60_000 + b"\r\n"

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(5):  # 300 KB of parts the gateway does not use; the limit is 64 KiB + 64 KiB
            yield part
        yield b"--b--\r\n"

    async def ask(client: TestClient) -> tuple[int, dict[str, Any]]:
        response = await client.post("/v1/similar", data=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        return response.status, await response.json()

    status, reply = call(app_with(bus), ask)
    assert (status, reply["error"]["code"]) == (413, "too_large") and bus.queries == []
