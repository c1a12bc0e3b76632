"""The HTTP gateway under load: its overhead over the plain Kafka round trip, and requests/s.

* Overhead, closed loop, one request at a time: the same image asked through Kafka (the
  query client: publish, read the reply topic) and through the gateway (``POST
  /v1/similar``), alternately, so both see the same load; overhead = HTTP − Kafka at p50
  and p99, and the distribution of the paired differences (each HTTP request minus the
  Kafka one just before it). The gateway's ``Server-Timing: kafka;dur=`` header says how
  long it waited for Kafka and the pipeline; HTTP − that is the gateway's own share
  (aiohttp, the body, JSON, the loop and the client's HTTP stack).
* Throughput, closed loop: ``C`` HTTP clients each send their next query as soon as the
  last one is answered, for a fixed time; requests/s answered ok, latency p50/p99, and
  every non-200 counted by status.

Run on its own against a running stack (``lookalike services up`` starts a gateway)::

    python -m benchmarks.gateway --url http://127.0.0.1:8480 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.pipeline import percentiles
from lookalike.catalog import iter_catalog
from lookalike.errors import ReplyTimeout
from lookalike.settings import ClientSettings, default_data
from producers.query_client import QueryClient


def reachable(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def server_kafka_ms(header: str | None) -> float | None:
    """The ``kafka;dur=`` of a Server-Timing header."""
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name == "kafka":
            try:
                return float(rest)
            except ValueError:
                return None
    return None


async def _post(session: aiohttp.ClientSession, url: str, image: bytes,
                seen: set[str] | None = None, inside: list[float] | None = None) -> tuple[int, float]:
    """One image query; ``seen`` collects the result item ids, ``inside`` the HTTP time not spent waiting for Kafka."""
    started = time.perf_counter()
    async with session.post(url, data=image, headers={"Content-Type": "image/jpeg"}) as response:
        body = await response.read()
        took = (time.perf_counter() - started) * 1000
        if response.status == 200:
            if seen is not None:
                seen.update(hit["item_id"] for hit in json.loads(body)["results"])
            kafka = server_kafka_ms(response.headers.get("Server-Timing"))
            if inside is not None and kafka is not None:
                inside.append(took - kafka)
        return response.status, took


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        return response.status, (time.perf_counter() - started) * 1000


async def _overhead(url: str, settings: ClientSettings, images: Sequence[bytes], pairs: int,
                    seen: set[str]) -> dict[str, Any]:
    kafka_ms: list[float] = []
    http_ms: list[float] = []
    paired: list[float] = []
    inside: list[float] = []
    failures: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    with QueryClient(settings) as client:
        async with aiohttp.ClientSession() as session:
            for n in range(pairs + 5):  # the first five warm both paths up and are not counted
                image = images[n % len(images)]
                started = time.perf_counter()
                try:
                    reply = await loop.run_in_executor(None, lambda image=image: client.ask(image, k=5, timeout_s=10))
                    ok = reply["status"] == "ok"
                except ReplyTimeout:
                    ok = False
                kafka_took = (time.perf_counter() - started) * 1000
                if n >= 5 and ok:
                    kafka_ms.append(kafka_took)
                elif n >= 5:
                    failures["kafka"] += 1
                status, took = await _post(session, url + "/v1/similar?k=5", image, seen, inside if n >= 5 else None)
                if n >= 5 and status == 200:
                    http_ms.append(took)
                    if ok:
                        paired.append(took - kafka_took)
                elif n >= 5:
                    failures[f"http {status}"] += 1
    kafka, http = percentiles(kafka_ms), percentiles(http_ms)
    return {"pairs": pairs, "kafka_ms": kafka, "http_ms": http, "failures": dict(failures),
            "paired_difference_ms": percentiles(paired), "http_minus_server_kafka_ms": percentiles(inside),
            "overhead_p50_ms": round(http["p50"] - kafka["p50"], 2) if kafka_ms and http_ms else None,
            "overhead_p99_ms": round(http["p99"] - kafka["p99"], 2) if kafka_ms and http_ms else None}


async def _throughput(url: str, images: Sequence[bytes], concurrency: int, seconds: float,
                      item_ids: Sequence[str] = ()) -> dict[str, Any]:
    """Image queries, or with ``item_ids`` "more like this item" queries (no embedding: the
    gateway, Kafka and the index without the model's cost)."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client(offset: int) -> None:
            n = offset
            while time.perf_counter() < deadline:
                if item_ids:
                    status, took = await _get(session, f"{url}/v1/items/{item_ids[n % len(item_ids)]}/similar?k=5")
                else:
                    status, took = await _post(session, url + "/v1/similar?k=5", images[n % len(images)])
                statuses[status] += 1
                if status == 200:
                    latencies.append(took)
                n += concurrency

        started = time.perf_counter()
        await asyncio.gather(*[client(i) for i in range(concurrency)])
        elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "kind": "item" if item_ids else "image", "seconds": round(elapsed, 2),
            "ok": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 1), "latency_ms": percentiles(latencies),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def measure(url: str, settings: ClientSettings, images: Sequence[bytes], *, pairs: int = 200,
            concurrency: Sequence[int] = (1, 4, 16), seconds: float = 15.0) -> dict[str, Any]:
    """Both measurements; ``images``: query images (JPEG bytes), used in turn. A last run at
    the highest concurrency asks "more like this" for items the image queries returned
    (so they are in the index)."""
    url = url.rstrip("/")
    seen: set[str] = set()
    result: dict[str, Any] = {"url": url, "overhead": asyncio.run(_overhead(url, settings, images, pairs, seen))}
    result["throughput"] = [asyncio.run(_throughput(url, images, c, seconds)) for c in concurrency]
    if seen:
        result["throughput"].append(asyncio.run(_throughput(url, images, max(concurrency), seconds, sorted(seen))))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8480")
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    if not reachable(args.url):
        print(f"no gateway answers at {args.url}/healthz (`lookalike services up` starts one)", file=sys.stderr)
        return 2
    images = [item.image_path.read_bytes() for _, item in zip(range(200), iter_catalog(args.data), strict=False)]
    print(json.dumps(measure(args.url, ClientSettings(), images, pairs=args.pairs, concurrency=args.concurrency,
                             seconds=args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
