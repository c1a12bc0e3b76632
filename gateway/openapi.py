"""The gateway's OpenAPI 3.1 description, served at ``/openapi.json`` (and readable at ``/docs``)."""

from __future__ import annotations

from typing import Any

from gateway.statuses import HTTP_STATUS

REPLY = {"$ref": "#/components/schemas/Reply"}


def _reply_responses() -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for code, status in HTTP_STATUS.items():
        by_status.setdefault(status, []).append(code)
    responses: dict[str, Any] = {"200": {"description": "the reply document, status ok",
                                         "content": {"application/json": {"schema": REPLY}}}}
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {"description": "error reply; error.code: " + ", ".join(sorted(codes)),
                                  "content": {"application/json": {"schema": REPLY}}}
    return responses


K = {"name": "k", "in": "query", "required": False, "description": "number of results, 1..LOOKALIKE_MAX_K (default 5)",
     "schema": {"type": "integer", "minimum": 1}}
MIN_POSITION = {"name": "min_position", "in": "query", "required": False,
                "description": "read your writes: `partition:offset[,...]` of catalog records the index must include",
                "schema": {"type": "string"}}
API_KEY = [{"apiKey": []}, {}]  # an API key, or none (the public client) where the deployment allows it


def spec(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Lookalike gateway", "version": version,
                 "description": "Lookalike's Kafka wire contract (docs/contracts.md) over HTTP. Every answer to a "
                                "query is the reply document of the contract; its error code decides the status."},
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": {
                "Reply": {"$ref": "https://lookalike.dev/schemas/reply.schema.json",
                          "description": "lookalike/schemas/reply.schema.json"},
                "FeedbackEvent": {"type": "object", "required": ["request_id", "item_id", "event"], "properties": {
                    "request_id": {"type": "string"}, "item_id": {"type": "string"},
                    "event": {"enum": ["impression", "click", "add_to_cart", "purchase", "dismiss"]},
                    "timestamp": {"type": "integer", "description": "ms since the epoch; default: now"}}},
            },
        },
        "paths": {
            "/v1/similar": {"post": {
                "summary": "The k catalog items most similar to an image",
                "security": API_KEY,
                "parameters": [K, MIN_POSITION],
                "requestBody": {"required": True, "content": {
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/webp": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "image": {"type": "string", "format": "binary"}, "k": {"type": "integer"},
                        "min_position": {"type": "string"}}}}}},
                "responses": _reply_responses()}},
            "/v1/items/{item_id}/similar": {"get": {
                "summary": "More like this catalog item (the item itself is left out)",
                "security": API_KEY,
                "parameters": [{"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}},
                               K, MIN_POSITION],
                "responses": _reply_responses()}},
            "/v1/items/{item_id}/image": {"get": {
                "summary": "The item's picture, from the catalog topic",
                "parameters": [{"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "JPEG, PNG or WebP"},
                              "404": {"description": "not in the catalog, or not held in the gateway's bounded cache"}}}},
            "/v1/feedback": {"post": {
                "summary": "What a shopper did with shown items: published to the feedback topic",
                "security": API_KEY,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["user_id", "events"], "properties": {
                        "user_id": {"type": "string", "description": "user or session id (the record key)"},
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/FeedbackEvent"}}}}}}},
                "responses": {"202": {"description": "every event is on the feedback topic"},
                              "400": {"description": "an event the contract refuses (nothing was sent)"},
                              "401": {"description": "unknown API key"},
                              "413": {"description": "body over LOOKALIKE_GATEWAY_MAX_FEEDBACK_BYTES"}}}},
            "/healthz": {"get": {"summary": "200 when the reply reader and producer are alive",
                                 "responses": {"200": {"description": "healthy"}, "503": {"description": "not"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
        },
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Lookalike gateway API</title><link rel="stylesheet" href="/static/shop.css"></head>
<body class="docs"><h1>Lookalike gateway API</h1>
<p>The machine-readable description is <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1); the reply document
and error codes are those of <code>docs/contracts.md</code>.</p><div id="paths"></div>
<script>
fetch('/openapi.json').then(r => r.json()).then(spec => {
  const root = document.getElementById('paths');
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = document.createElement('section');
      const h = document.createElement('h2'); h.textContent = method.toUpperCase() + ' ' + path; sec.append(h);
      const p = document.createElement('p'); p.textContent = op.summary; sec.append(p);
      const ul = document.createElement('ul');
      for (const par of op.parameters || []) {
        const li = document.createElement('li'); li.textContent = `${par.name} (${par.in}): ${par.description || ''}`;
        ul.append(li);
      }
      for (const [status, r] of Object.entries(op.responses)) {
        const li = document.createElement('li'); li.textContent = `${status}: ${r.description}`; ul.append(li);
      }
      sec.append(ul); root.append(sec);
    }
  }
});
</script></body></html>
"""
