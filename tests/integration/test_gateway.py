"""The HTTP gateway against a real pipeline: the wire contract over HTTP, every error code's
status, API keys signed through to the worker, feedback, item pictures, two replicas, and
the shopper's page in a real browser (Debian's chromium, driven by Selenium).

One pipeline (worker + indexer with signed queries and rate limits on) and one catalog of
40 items serve the whole module: real product photos from the sample dataset when it is
there, generated pictures otherwise. Either way the uploaded "shopper photo" is a catalog
item re-stretched to 3:4, resized and re-encoded, and the product itself must come first.
With the tests' tiny model (trained deterministically) every one of the 40 ranks itself first
in both catalogs, by a cosine margin of at least 4e-5 (3e-4 for the products used here);
re-embedding in another batch size moves scores by about 1e-6.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from PIL import Image

from lookalike import auth
from lookalike import contracts as c
from lookalike.catalog import iter_catalog
from lookalike.clients import confluent_config
from lookalike.settings import default_data
from lookalike.status import wait_for_index
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import REPO, Pipeline, start_pipeline, stop_pipeline, warm_up

pytestmark = pytest.mark.integration

CATALOG_SIZE = 40
SIGNING_KEYS = {"web": auth.new_key(), "shop-1": auth.new_key(), "tests": auth.new_key()}
API_KEYS = {"shop-1": auth.new_key(), "tests": auth.new_key()}
RATE_BURST = 30
IMAGE_LIMIT = 512 * 1024  # LOOKALIKE_MAX_QUERY_IMAGE_BYTES for this module: small enough to overflow quickly


@dataclass
class Product:
    item_id: str
    image: bytes
    metadata: dict[str, Any]


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen
    log: Path
    instance: str
    extra: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def shopper_photo(image: bytes) -> bytes:
    """A catalog picture as a shopper's photo: portrait 3:4, another size, re-encoded."""
    with Image.open(io.BytesIO(image)) as img:
        out = io.BytesIO()
        img.convert("RGB").resize((300, 400), Image.Resampling.BICUBIC).save(out, "JPEG", quality=88)
        return out.getvalue()


def sample_catalog() -> tuple[list[Product], str]:
    """40 products: the sample dataset's first ones when it is there, else generated pictures."""
    data = default_data()
    if (data / "styles.csv").is_file():
        products = []
        for item in iter_catalog(data):
            products.append(Product(item.item_id, item.image_path.read_bytes(), item.metadata))
            if len(products) == CATALOG_SIZE:
                return products, f"{CATALOG_SIZE} photos from {data}"
    products = [Product(f"gen-{n}", jpeg_bytes(seed=100 + n, size=(120, 160)),
                        {"title": f"Generated product {n}", "articleType": "Shapes"}) for n in range(CATALOG_SIZE)]
    return products, f"{CATALOG_SIZE} generated pictures ({data} not found)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def start_gateway(pipeline: Pipeline, workdir: Path, name: str, **extra: str) -> Gateway:
    port = free_port()
    instance = f"{name}-{uuid.uuid4().hex[:6]}"
    env = {**pipeline.env, "LOOKALIKE_GATEWAY_PORT": str(port), "LOOKALIKE_GATEWAY_INSTANCE": instance,
           "LOOKALIKE_GATEWAY_API_KEYS": json.dumps(API_KEYS), "LOOKALIKE_LOG_FORMAT": "json", **extra}
    log = workdir / f"gateway-{name}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    gateway = Gateway(f"http://127.0.0.1:{port}", proc, log, instance, extra)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the gateway exited:\n{gateway.log_text()[-3000:]}"
            try:
                status, _headers, body = http("GET", gateway.url + "/healthz", timeout=2)
            except OSError:
                time.sleep(0.2)
                continue
            pictures = json.loads(body)["pictures"] if status == 200 else {}
            if pictures.get("caught_up") or pictures.get("enabled") is False:
                return gateway
            time.sleep(0.2)
        raise AssertionError(f"the gateway did not become healthy:\n{gateway.log_text()[-3000:]}")
    except BaseException:
        stop_gateway(gateway)  # never leave a replica behind a failed start
        raise


def stop_gateway(gateway: Gateway) -> None:
    if gateway.proc.poll() is None:
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            gateway.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.proc.kill()


@pytest.fixture(scope="module")
def shop(cluster: Cluster, tiny_model: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Pipeline, list[Product], Path]]:
    """A pipeline with signed queries and rate limits, and the 40-product catalog indexed."""
    models, _card = tiny_model
    workdir = tmp_path_factory.mktemp("gateway")
    pipeline = start_pipeline(cluster, models, workdir, {
        "LOOKALIKE_QUERY_AUTH": "1", "LOOKALIKE_QUERY_KEYS": json.dumps(SIGNING_KEYS),
        "LOOKALIKE_RATE_LIMIT": "1", "LOOKALIKE_RATE_LIMIT_BURST": str(RATE_BURST), "LOOKALIKE_RATE_LIMIT_PER_S": "5",
        "LOOKALIKE_CLIENT_ID": "tests", "LOOKALIKE_CLIENT_KEY": SIGNING_KEYS["tests"],
        "LOOKALIKE_MAX_QUERY_IMAGE_BYTES": str(IMAGE_LIMIT),
    })
    try:
        warm_up(pipeline, jpeg_bytes(seed=999))
        products, _source = sample_catalog()
        feed = pipeline.feed()
        for product in products:
            feed.publish(product.item_id, product.image, product.metadata)
        assert feed.flush().failed == 0
        wait_for_index(len(products) + 1, 120, settings=pipeline.settings, group=pipeline.env["LOOKALIKE_INDEXER_GROUP"])
        yield pipeline, products, workdir
    finally:
        stop_pipeline(pipeline)


@pytest.fixture(scope="module")
def gateway(shop: tuple[Pipeline, list[Product], Path]) -> Iterator[Gateway]:
    pipeline, _products, workdir = shop
    running = start_gateway(pipeline, workdir, "a")
    try:
        yield running
    finally:
        stop_gateway(running)


def reply_of(body: bytes) -> dict[str, Any]:
    reply = json.loads(body)
    jsonschema.validate(reply, c.schema("reply"))
    return reply


# -- the contract over HTTP ------------------------------------------------------------
def test_a_shopper_photo_finds_the_product_first(shop, gateway: Gateway) -> None:
    _pipeline, products, _workdir = shop
    product = products[7]
    status, headers, body = http("POST", gateway.url + "/v1/similar?k=5", shopper_photo(product.image),
                                 {"Content-Type": "image/jpeg"})
    reply = reply_of(body)
    assert status == 200, body
    assert headers["X-Request-Id"] == reply["request_id"]
    assert reply["results"][0]["item_id"] == product.item_id
    assert len(reply["results"]) == 5
    assert reply["results"][0]["metadata"]["title"] == product.metadata["title"]


def test_a_multipart_upload_is_the_same_query(shop, gateway: Gateway) -> None:
    _pipeline, products, _workdir = shop
    product = products[3]
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + shopper_photo(product.image) + f"\r\n--{boundary}--\r\n".encode()
    status, _headers, raw = http("POST", gateway.url + "/v1/similar", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    reply = reply_of(raw)
    assert status == 200, raw
    assert reply["results"][0]["item_id"] == product.item_id
    assert len(reply["results"]) == 3


def test_more_like_an_item_leaves_the_item_out(shop, gateway: Gateway) -> None:
    _pipeline, products, _workdir = shop
    item = products[0].item_id
    status, _headers, body = http("GET", f"{gateway.url}/v1/items/{item}/similar?k=4")
    reply = reply_of(body)
    assert status == 200, body
    assert len(reply["results"]) == 4 and item not in [hit["item_id"] for hit in reply["results"]]


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status", "code"), [
    ("not an image", "POST", "/v1/similar", b"GIF89a not really", {}, 400, "bad_image"),
    ("k out of range", "POST", "/v1/similar?k=0", "PHOTO", {}, 400, "bad_header"),
    ("k not a number", "GET", "/v1/items/ITEM/similar?k=five", None, {}, 400, "bad_header"),
    ("bad min_position", "GET", "/v1/items/ITEM/similar?min_position=soon", None, {}, 400, "bad_header"),
    ("unknown item", "GET", "/v1/items/no-such-item/similar", None, {}, 404, "unknown_item"),
    ("empty body", "POST", "/v1/similar", b"", {}, 400, "bad_image"),
    ("over the image limit", "POST", "/v1/similar", b"\xff\xd8\xff" + b"0" * IMAGE_LIMIT, {}, 413, "too_large"),
    ("unknown API key", "GET", "/v1/items/ITEM/similar", None, {"X-API-Key": "not-a-key-of-anyone"}, 401, "unauthorized"),
    ("index behind min_position", "GET", "/v1/items/ITEM/similar?min_position=0:99999999", None, {}, 503, "not_ready"),
])
def test_each_error_code_has_its_status(shop, gateway: Gateway, name: str, method: str, path: str, body: Any,
                                       headers: dict[str, str], status: int, code: str) -> None:
    _pipeline, products, _workdir = shop
    body = shopper_photo(products[1].image) if body == "PHOTO" else body
    got, got_headers, raw = http(method, gateway.url + path.replace("ITEM", products[0].item_id), body, headers)
    reply = reply_of(raw)
    assert (got, reply["error"]["code"]) == (status, code), raw
    assert reply["status"] == "error" and reply["results"] == []
    if status == 503:
        assert int(got_headers["Retry-After"]) >= 1


def test_an_oversized_body_is_refused_before_it_is_sent(gateway: Gateway) -> None:
    """Content-Length over the limit: 413 at once, while the client has sent none of the body."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"POST /v1/similar HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                     f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode())
        conn.settimeout(5)
        head = conn.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    assert '"too_large"' in head or "too_large" in head


def test_a_chunked_body_is_cut_at_the_limit(gateway: Gateway) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"\xff\xd8\xff"
        for _ in range(40):
            yield b"0" * (64 * 1024)  # 2.5 MB in all, never declared

    request = urllib.request.Request(gateway.url + "/v1/similar", data=chunks(), method="POST",
                                     headers={"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (ConnectionResetError, BrokenPipeError):  # the gateway answered and closed while we were sending
        return
    assert status == 413 and reply_of(raw)["error"]["code"] == "too_large"


def test_a_client_over_its_rate_limit_gets_429(shop, gateway: Gateway) -> None:
    """API key -> client id -> signed query -> that client's bucket in the worker."""
    _pipeline, products, _workdir = shop

    async def burst() -> list[tuple[int, str | None]]:
        async with aiohttp.ClientSession() as session:
            async def one() -> tuple[int, str | None]:
                async with session.get(f"{gateway.url}/v1/items/{products[2].item_id}/similar",
                                       headers={"X-API-Key": API_KEYS["shop-1"]}) as response:
                    await response.read()
                    return response.status, response.headers.get("Retry-After")
            return await asyncio.gather(*[one() for _ in range(RATE_BURST + 15)])

    answers = asyncio.run(burst())
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= RATE_BURST - 2  # the bucket refills at 5/s while the burst runs
    assert all(int(retry) >= 1 for status, retry in answers if status == 429)
    # another client's bucket is untouched
    status, _headers, raw = http("GET", f"{gateway.url}/v1/items/{products[2].item_id}/similar",
                                 headers={"X-API-Key": API_KEYS["tests"]})
    assert status == 200, raw


def test_a_second_replica_with_a_short_deadline_answers_504(shop, gateway: Gateway) -> None:
    """Two replicas on one pipeline, each with its own reply topic; the slow query times out."""
    pipeline, products, workdir = shop
    second = start_gateway(pipeline, workdir, "b", LOOKALIKE_GATEWAY_DEADLINE_S="0.5", LOOKALIKE_GATEWAY_IMAGES="0")
    try:
        item = products[4].item_id
        status, _headers, raw = http("GET", f"{second.url}/v1/items/{item}/similar?min_position=0:99999999")
        assert (status, reply_of(raw)["error"]["code"]) == (504, "timeout"), raw
        time.sleep(2.5)  # the indexer holds that query up to LOOKALIKE_MIN_POSITION_WAIT_S (2 s) before not_ready
        for url in (second.url, gateway.url):  # both answer their own queries
            status, _headers, raw = http("GET", f"{url}/v1/items/{item}/similar")
            assert status == 200, raw
        assert second.instance in second.log_text() and second.instance != gateway.instance
    finally:
        stop_gateway(second)


def test_a_gateway_without_the_clients_signing_key_is_refused_by_the_worker(shop) -> None:
    """The worker checks signatures, not the gateway: a replica with a wrong key is refused.
    The refusal is not written to the reply-to the unauthenticated query named (the replica's
    own topic: docs/security.md#signed-queries) but to the default replies topic, so the
    replica answers 504 and the `unauthorized` reply is found there."""
    pipeline, products, workdir = shop
    wrong = start_gateway(pipeline, workdir, "c", LOOKALIKE_GATEWAY_IMAGES="0", LOOKALIKE_GATEWAY_DEADLINE_S="3",
                          LOOKALIKE_QUERY_KEYS=json.dumps({**SIGNING_KEYS, "web": auth.new_key()}))
    try:
        status, _headers, raw = http("GET", f"{wrong.url}/v1/items/{products[0].item_id}/similar")
        answer = reply_of(raw)
        assert (status, answer["error"]["code"]) == (504, "timeout"), raw
    finally:
        stop_gateway(wrong)
    topic = pipeline.settings.replies_topic
    consumer = Consumer(confluent_config(pipeline.settings, **{"group.id": f"t-{uuid.uuid4().hex}",
                                                               "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        found = None
        deadline = time.monotonic() + 20
        while found is None and time.monotonic() < deadline:
            for msg in consumer.consume(200, 0.5):
                if msg.error() is None and msg.key() == answer["request_id"].encode():
                    found = json.loads(msg.value())
    finally:
        consumer.close()
    assert found is not None, f"no reply for {answer['request_id']} on {topic}"
    assert found["error"]["code"] == "unauthorized", found


# -- feedback, pictures, operations ------------------------------------------------------
def feedback_records(pipeline: Pipeline, want: Any, timeout_s: float = 20) -> list[tuple[str, dict[str, Any]]]:
    """Read the feedback topic from the start until ``want(records)`` is true."""
    topic = pipeline.settings.feedback_topic
    consumer = Consumer(confluent_config(pipeline.settings, **{"group.id": f"t-{uuid.uuid4().hex}",
                                                               "enable.auto.commit": False}))
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    records: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not want(records):
            for msg in consumer.consume(100, 0.5):
                if msg.error() is None:
                    records.append((msg.key().decode(), json.loads(msg.value())))
    finally:
        consumer.close()
    return records


def test_feedback_reaches_the_feedback_topic(shop, gateway: Gateway) -> None:
    pipeline, products, _workdir = shop
    user = f"sess-{uuid.uuid4().hex[:8]}"
    events = [{"request_id": "req-fb", "item_id": products[0].item_id, "event": "click"},
              {"request_id": "req-fb", "item_id": products[1].item_id, "event": "purchase", "timestamp": 1767225600000}]
    status, _headers, raw = http("POST", gateway.url + "/v1/feedback", json.dumps({"user_id": user, "events": events}).encode(),
                                 {"Content-Type": "application/json"})
    assert (status, json.loads(raw)) == (202, {"accepted": 2})
    found = feedback_records(pipeline, lambda rs: sum(k == user for k, _ in rs) >= 2)
    mine = sorted((v["event"], v["item_id"]) for k, v in found if k == user)
    assert mine == sorted([("click", products[0].item_id), ("purchase", products[1].item_id)])

    bad = {"user_id": user, "events": [{"request_id": "r", "item_id": "i", "event": "like"}]}
    status, _headers, raw = http("POST", gateway.url + "/v1/feedback", json.dumps(bad).encode())
    assert status == 400 and json.loads(raw)["error"]["code"] == "bad_feedback", raw


def test_item_pictures_come_from_the_catalog_topic(shop, gateway: Gateway) -> None:
    _pipeline, products, _workdir = shop
    status, headers, body = http("GET", f"{gateway.url}/v1/items/{products[5].item_id}/image")
    assert status == 200 and body == products[5].image and headers["Content-Type"] == "image/jpeg"
    assert http("GET", f"{gateway.url}/v1/items/no-such-item/image")[0] == 404


def test_health_metrics_docs_and_json_logs(gateway: Gateway) -> None:
    status, _headers, body = http("GET", gateway.url + "/healthz")
    health = json.loads(body)
    assert status == 200 and health["healthy"] and health["reply_topic"].endswith(f"gateway-{gateway.instance}")
    status, _headers, body = http("GET", gateway.url + "/metrics")
    assert status == 200 and b"lookalike_gateway_requests_total" in body
    status, _headers, body = http("GET", gateway.url + "/openapi.json")
    assert status == 200 and "/v1/similar" in json.loads(body)["paths"]
    lines = [json.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
    assert any(line.get("logger") == "gateway.access" and line.get("request_id") for line in lines)


# -- the shopper's page in a real browser ----------------------------------------------
def chrome() -> Any:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("chromium and chromium-driver are not installed (scripts/bootstrap installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.browser
def test_a_shopper_uses_the_page_in_a_browser(shop, gateway: Gateway, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pipeline, products, _workdir = shop
    product = products[11]
    photo = tmp_path / "my-photo.jpg"
    photo.write_bytes(shopper_photo(product.image))
    shots = Path(os.environ.get("LOOKALIKE_SCREENSHOTS", tmp_path))
    driver = chrome()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(gateway.url + "/")
        driver.find_element(By.ID, "photo").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("ready", "error"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready", \
            driver.find_element(By.ID, "status").text
        results = driver.find_elements(By.CSS_SELECTOR, "#results li.result")
        assert [r.get_attribute("data-item-id") for r in results][:1] == [product.item_id]
        assert len(results) == 5
        first_items = [r.get_attribute("data-item-id") for r in results]
        first_request = driver.find_element(By.TAG_NAME, "body").get_attribute("data-request-id")
        assert product.metadata["title"] in results[0].text
        # every result's picture is served by the gateway and decoded by the browser
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                                 for img in d.find_elements(By.CSS_SELECTOR, "#results img")))
        driver.save_screenshot(str(shots / "page-results.png"))

        clicked = results[2].get_attribute("data-item-id")
        results[2].find_element(By.CSS_SELECTOR, "button.open").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-request-id") != first_request
                   and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        more = [r.get_attribute("data-item-id") for r in driver.find_elements(By.CSS_SELECTOR, "#results li.result")]
        assert len(more) == 5 and clicked not in more  # "more like this" leaves the item out
        assert "More like" in driver.find_element(By.ID, "query-caption").text

        driver.set_window_size(390, 844)  # a phone
        driver.save_screenshot(str(shots / "page-phone.png"))
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width}px wide)"
    finally:
        driver.quit()

    def complete(records: list[tuple[str, dict[str, Any]]]) -> bool:
        mine = [v for _k, v in records if v["request_id"] == first_request]
        return any(v["event"] == "click" for v in mine) and sum(v["event"] == "impression" for v in mine) >= 5

    found = [v for _k, v in feedback_records(pipeline, complete) if v["request_id"] == first_request]
    assert {"event": "click", "item_id": clicked} in [{"event": v["event"], "item_id": v["item_id"]} for v in found]
    assert sorted(v["item_id"] for v in found if v["event"] == "impression") == sorted(first_items)
