"""The gateway's HTTP side (aiohttp): routes, limits, API keys, CORS, logs and metrics.

Everything about Kafka is behind :class:`gateway.bus.Bus`; this module turns HTTP requests
into :class:`~gateway.bus.Query` values and reply documents into HTTP answers. Bodies are
limited before they are read: a declared ``Content-Length`` over the limit is refused at
once, and a chunked body is read only up to the limit.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

import lookalike
from gateway import metrics as m
from gateway.bus import Bus, GatewayError, Query
from gateway.images import PictureCache
from gateway.openapi import DOCS_PAGE, spec
from gateway.settings import GatewaySettings
from gateway.statuses import gateway_error, http_status, retry_after_s
from lookalike import contracts as c
from lookalike.errors import InvalidMessage
from lookalike.events import make_feedback

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

STATIC = Path(str(resources.files("gateway").joinpath("static")))
BUS = web.AppKey("bus", Bus)
SETTINGS = web.AppKey("settings", GatewaySettings)
PICTURES = web.AppKey("pictures", PictureCache)
API_KEYS = web.AppKey("api_keys", dict)
HEALTH_EXTRA = web.AppKey("health_extra", Callable)
REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyTooLarge(Exception):
    pass


# -- who is asking ----------------------------------------------------------------
def presented_key(request: web.Request) -> str | None:
    """The API key of a request: ``X-API-Key``, or ``Authorization: Bearer KEY``."""
    key = request.headers.get("X-API-Key")
    if key is None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
    return key or None


def client_for(key: str | None, api_keys: Mapping[str, SecretStr], public_client: str) -> str | None:
    """The client id an API key belongs to (every key compared in constant time); the public
    client for no key; None when the key is unknown or a key is required."""
    if key is None:
        return public_client or None
    found = None
    for client_id, secret in api_keys.items():
        if hmac.compare_digest(secret.get_secret_value().encode(), key.encode()):
            found = client_id
    return found


def authenticate(request: web.Request, request_id: str) -> str:
    settings = request.app[SETTINGS]
    client = client_for(presented_key(request), request.app[API_KEYS], settings.gateway_public_client)
    if client is None:
        why = "unknown API key" if presented_key(request) else "an API key is required (X-API-Key header)"
        raise ReplyError(gateway_error(request_id, "unauthorized", why))
    return client


class ReplyError(Exception):
    """An error reply the gateway makes itself, before or instead of the pipeline."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply["error"]["message"])
        self.reply = reply


# -- bodies -----------------------------------------------------------------------
async def read_limited(stream: Any, limit: int) -> bytes:
    """Read a body stream, refusing it as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    read = stream.read_chunk if hasattr(stream, "read_chunk") else stream.read  # multipart part, or the body
    while True:
        chunk = await read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over {limit} bytes")
        chunks.append(chunk)


async def query_image(request: web.Request, request_id: str) -> tuple[bytes, dict[str, str]]:
    """The image of a POST /v1/similar (raw body or multipart ``image``) and multipart form fields."""
    settings = request.app[SETTINGS]
    limit = settings.max_query_image_bytes
    declared = request.content_length
    envelope = settings.max_body_bytes - limit if request.content_type.startswith("multipart/") else 0
    if declared is not None and declared > limit + envelope:  # refused before a byte is read
        raise ReplyError(gateway_error(request_id, "too_large",
                                       f"body is {declared} bytes, the limit is {limit} (LOOKALIKE_MAX_QUERY_IMAGE_BYTES)"))
    fields: dict[str, str] = {}
    try:
        if request.content_type.startswith("multipart/"):
            image = None
            reader = await request.multipart()
            total = 0  # all parts together stay within the body limit, chunked or not
            while (part := await reader.next()) is not None:
                if part.name == "image" or (part.filename and image is None):
                    data = image = await read_limited(part, limit)
                elif part.name in ("k", "min_position"):
                    data = await read_limited(part, 1024)
                    fields[part.name] = data.decode("utf-8", "replace")
                else:
                    data = await read_limited(part, 1024 * 1024)  # unknown parts are drained, within bounds
                total += len(data)
                if total > settings.max_body_bytes:
                    raise BodyTooLarge(f"multipart body is over {settings.max_body_bytes} bytes")
            if image is None:
                raise ReplyError(gateway_error(request_id, "bad_image", "no `image` part in the multipart body"))
        else:
            image = await read_limited(request.content, limit)
    except BodyTooLarge as exc:
        raise ReplyError(gateway_error(request_id, "too_large", f"{exc}, the limit is {limit}")) from exc
    except ValueError as exc:  # a malformed multipart body
        raise ReplyError(gateway_error(request_id, "bad_image", f"the multipart body could not be read: {exc}")) from exc
    if not image:
        raise ReplyError(gateway_error(request_id, "bad_image", "no image: send the image bytes as the body, "
                                                                "or a multipart form with an `image` file"))
    return image, fields


# -- answers ----------------------------------------------------------------------
def reply_response(reply: dict[str, Any], raw: bytes | None, request_id: str,
                   kafka_s: float | None = None) -> web.Response:
    status = http_status(reply)
    headers = {"X-Request-Id": request_id, "Cache-Control": "no-store"}
    if kafka_s is not None:  # produce -> reply read: what the gateway waited for Kafka and the pipeline
        headers["Server-Timing"] = f"kafka;dur={kafka_s * 1000:.2f}"
    retry = retry_after_s(reply)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    error = reply.get("error") or {}
    m.REPLY_CODES.labels(error.get("code") or "ok").inc()
    body = raw if raw is not None else c.encode_reply(reply)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


async def ask(request: web.Request, query_of: Callable[[str], Awaitable[Query]]) -> web.Response:
    request_id = uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        client = authenticate(request, request_id)
        query = await query_of(client)
        answer = await request.app[BUS].ask(query, request_id, request.app[SETTINGS].gateway_deadline_s)
    except ReplyError as exc:
        return reply_response(exc.reply, None, request_id)
    except GatewayError as exc:
        log.warning("query %s: %s", request_id, exc, extra={"request_id": request_id, "code": exc.code})
        return reply_response(gateway_error(request_id, exc.code, str(exc)), None, request_id)
    m.KAFKA_ROUND_TRIP.observe(answer.seconds)
    return reply_response(answer.reply, answer.raw, request_id, answer.seconds)


def form_value(request: web.Request, fields: Mapping[str, str], name: str) -> str | None:
    return fields.get(name, request.query.get(name))


async def similar_to_image(request: web.Request) -> web.Response:
    async def query_of(client: str) -> Query:
        image, fields = await query_image(request, request[REQUEST_ID])
        return Query(image=image, k=form_value(request, fields, "k"), client_id=client,
                     min_position=form_value(request, fields, "min_position"))

    return await ask(request, query_of)


async def similar_to_item(request: web.Request) -> web.Response:
    async def query_of(client: str) -> Query:
        return Query(image=None, item_id=request.match_info["item_id"], k=request.query.get("k"),
                     min_position=request.query.get("min_position"), client_id=client)

    return await ask(request, query_of)


async def item_image(request: web.Request) -> web.Response:
    picture = request.app[PICTURES].get(request.match_info["item_id"])
    if picture is None:
        raise web.HTTPNotFound(text="no picture for this item", headers={"Cache-Control": "no-store"})
    # Catalog images change only by a new catalog record; a minute of browser cache is plenty.
    return web.Response(body=picture.data, content_type=picture.content_type,
                        headers={"Cache-Control": "public, max-age=60", "X-Content-Type-Options": "nosniff"})


def feedback_error(code: str, message: str, status: int) -> web.Response:
    return web.json_response({"status": "error", "error": {"code": code, "message": message}}, status=status)


async def feedback(request: web.Request) -> web.Response:
    """``{"user_id": ..., "events": [{"request_id", "item_id", "event", "timestamp"?}, ...]}``"""
    settings = request.app[SETTINGS]
    request_id = uuid.uuid4().hex
    try:
        authenticate(request, request_id)
    except ReplyError as exc:
        return feedback_error("unauthorized", str(exc), 401)
    limit = settings.gateway_max_feedback_bytes
    if request.content_length is not None and request.content_length > limit:
        return feedback_error("too_large", f"body is {request.content_length} bytes, the limit is {limit}", 413)
    try:
        doc = json.loads(await read_limited(request.content, limit))
    except BodyTooLarge as exc:
        return feedback_error("too_large", f"{exc}", 413)
    except (UnicodeDecodeError, ValueError) as exc:
        return feedback_error("bad_feedback", f"body is not UTF-8 JSON: {exc}", 400)
    if not isinstance(doc, dict) or not isinstance(doc.get("user_id"), str) or not isinstance(doc.get("events"), list):
        return feedback_error("bad_feedback", 'expected {"user_id": "...", "events": [...]}', 400)
    events = doc["events"]
    if not 0 < len(events) <= settings.gateway_max_feedback_events:
        return feedback_error("bad_feedback", f"1 to {settings.gateway_max_feedback_events} events per request", 400)
    records = []
    for n, event in enumerate(events):
        if not isinstance(event, dict):
            return feedback_error("bad_feedback", f"events[{n}] is not an object", 400)
        try:
            made = make_feedback(str(event.get("event")), request_id=event.get("request_id"),  # type: ignore[arg-type]
                                 item_id=event.get("item_id"), user_id=doc["user_id"],  # type: ignore[arg-type]
                                 timestamp_ms=event.get("timestamp"))
        except (InvalidMessage, TypeError, ValueError, AttributeError) as exc:
            code = exc.code if isinstance(exc, InvalidMessage) else "bad_feedback"
            return feedback_error(code, f"events[{n}]: {exc}", 400)
        records.append(made)
    try:
        await request.app[BUS].publish_feedback([r.encode() for r in records], settings.gateway_deadline_s)
    except GatewayError as exc:
        return feedback_error(exc.code, str(exc), 503)
    for r in records:
        m.FEEDBACK_EVENTS.labels(r.event).inc()
    return web.json_response({"accepted": len(records)}, status=202)


async def healthz(request: web.Request) -> web.Response:
    healthy, facts = request.app[BUS].health()
    facts = {"healthy": healthy, **facts, **request.app[HEALTH_EXTRA]()}
    return web.json_response(facts, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    pictures = request.app[PICTURES]
    m.PICTURES.set(len(pictures))
    m.PICTURE_BYTES.set(pictures.bytes)
    m.WAITING.set(request.app[BUS].health()[1].get("waiting", 0))
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec(lookalike.__version__))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# -- middlewares ------------------------------------------------------------------
def route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line and the metrics per request; nothing unexpected escapes as a traceback page."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(gateway_error(request.get(REQUEST_ID, "-"), "internal",
                                               "the gateway failed; see its log"), status=500)
    finally:
        seconds = time.perf_counter() - started
        route = route_name(request)
        m.REQUESTS.labels(route, str(status)).inc()
        m.REQUEST_SECONDS.labels(route).observe(seconds)
        if route not in ("/metrics", "/healthz") and not route.startswith("/static"):
            access_log.info("%s %s %d %.1fms", request.method, request.path, status, seconds * 1000,
                            extra={"request_id": request.get(REQUEST_ID), "code": status})


def cors(origins: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    allowed = set(origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allow = origin if origin and ("*" in allowed or origin in allowed) else None
        if request.method == "OPTIONS" and allow and request.headers.get("Access-Control-Request-Method"):
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, X-API-Key, Authorization"
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allow:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else allow
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After, Server-Timing"
            response.headers["Vary"] = "Origin"
        return response

    return middleware


def build_app(settings: GatewaySettings, bus: Bus, pictures: PictureCache, api_keys: Mapping[str, SecretStr],
              health_extra: Callable[[], dict[str, Any]] = dict) -> web.Application:
    """The aiohttp application; ``bus`` must be started in the loop that serves it."""
    middlewares = [observe]
    if settings.gateway_cors_origins:
        middlewares.insert(0, cors(settings.gateway_cors_origins))
    # aiohttp's own cap on request bodies, behind the per-route limits above
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[BUS] = bus
    app[SETTINGS] = settings
    app[PICTURES] = pictures
    app[API_KEYS] = dict(api_keys)
    app[HEALTH_EXTRA] = health_extra
    app.router.add_get("/", index)
    app.router.add_static("/static", STATIC)
    app.router.add_post("/v1/similar", similar_to_image)
    app.router.add_get("/v1/items/{item_id}/similar", similar_to_item)
    app.router.add_get("/v1/items/{item_id}/image", item_image)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    return app
