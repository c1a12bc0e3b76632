"""The query client's reply bookkeeping: first reply wins, copies and strangers dropped."""

from __future__ import annotations

import json

import pytest

from lookalike.errors import ReplyTimeout
from lookalike.settings import ClientSettings
from producers.query_client import QueryClient, ReplyBook


def reply(request_id: str, status: str = "ok") -> bytes:
    return json.dumps({"request_id": request_id, "status": status}).encode()


def test_first_reply_wins_and_copies_are_counted() -> None:
    book = ReplyBook()
    book.expect(b"r1")
    assert book.offer(b"r1", reply("r1", "ok"))
    assert not book.offer(b"r1", reply("r1", "error"))  # a replayed query answered again
    assert book.take(b"r1")[0]["status"] == "ok"
    assert not book.offer(b"r1", reply("r1", "error"))  # a copy after the answer was returned
    assert book.duplicates == 2
    assert not book.has(b"r1")


def test_other_clients_replies_and_garbage_are_ignored() -> None:
    book = ReplyBook()
    book.expect(b"mine")
    assert not book.offer(b"theirs", reply("theirs"))
    assert not book.offer(None, reply("x"))
    assert not book.offer(b"mine", None)
    assert not book.offer(b"mine", b"\xff not json")
    assert book.offer(b"mine", reply("mine"))
    assert book.duplicates == 0


def test_a_request_given_up_on_ignores_its_late_reply() -> None:
    book = ReplyBook()
    book.expect(b"slow")
    book.forget(b"slow")
    assert not book.offer(b"slow", reply("slow"))
    assert not book.has(b"slow")


class SilentConsumer:
    """A consumer on a reply topic where nothing ever arrives."""

    def poll(self, timeout: float):  # type: ignore[no-untyped-def]
        return None

    def close(self) -> None:
        pass


def test_the_deadline_raises_a_clear_timeout_error() -> None:
    settings = ClientSettings(_env_file=None, kafka_bootstrap="127.0.0.1:1", queries_topic="q.topic",
                              replies_topic="r.topic")
    client = QueryClient(settings)
    client.consumer = SilentConsumer()  # type: ignore[assignment]
    client.book.expect(b"req-1")
    with pytest.raises(ReplyTimeout, match=r"no reply for request req-1 on r.topic within 0.3s .*q.topic"):
        client.wait("req-1", timeout_s=0.3)
    assert b"req-1" not in client.book.pending


def test_every_producer_is_idempotent_with_acks_all(monkeypatch: pytest.MonkeyPatch) -> None:
    from lookalike import runtime
    from lookalike.clients import producer_config

    settings = ClientSettings(_env_file=None)
    config = producer_config(settings)
    assert config["enable.idempotence"] is True and config["acks"] == "all"
    seen: list[dict] = []

    class Capture:
        def __init__(self, config: dict) -> None:
            seen.append(config)

        def poll(self, timeout: float) -> int:
            return 0

        def flush(self, timeout: float) -> int:
            return 0

    monkeypatch.setattr(runtime, "Producer", Capture)
    runtime.Sender(settings).close()  # every service's producer (the consumer runtime's)
    assert seen and seen[0]["enable.idempotence"] is True and seen[0]["acks"] == "all"


class OneReplyConsumer:
    """A reply topic with one reply on it."""

    def __init__(self, value: bytes) -> None:
        self.value = value

    def poll(self, timeout: float):  # type: ignore[no-untyped-def]
        value, self.value = self.value, None
        if value is None:
            return None

        class Message:
            def error(self) -> None:
                return None

            def key(self) -> bytes:
                return json.loads(value)["request_id"].encode()

            def value(self) -> bytes:
                return value

        return Message()

    def close(self) -> None:
        pass


class Impressions:
    """Stands in for the client's feedback producer: records what would be published."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def impressions(self, reply: dict, user_id: str) -> list:
        from confluent_kafka import KafkaException

        if self.fail:
            raise KafkaException("broker away")
        self.calls.append((reply["request_id"], user_id))
        return [object()] * len(reply.get("results", []))

    def flush(self, timeout_s: float = 30.0) -> int:
        return 0


@pytest.mark.parametrize("kwargs", [{}, {"impressions_for": "user-7"}, {"impressions": False}])
def test_impressions_are_recorded_by_default(kwargs: dict) -> None:
    settings = ClientSettings(_env_file=None, kafka_bootstrap="127.0.0.1:1")
    client = QueryClient(settings, **kwargs)
    client.consumer = OneReplyConsumer(json.dumps({"request_id": "r1", "status": "ok", "results": [
        {"item_id": "a"}, {"item_id": "b"}]}).encode())  # type: ignore[assignment]
    client._feedback = Impressions()  # type: ignore[assignment]
    client.book.expect(b"r1")
    assert client.wait("r1", timeout_s=1)["request_id"] == "r1"
    if kwargs.get("impressions") is False:
        assert client.impressions_for is None and client._feedback.calls == []  # type: ignore[attr-defined]
    else:
        user = kwargs.get("impressions_for", client.session_id)
        assert user.startswith("user-7" if kwargs else "lookalike-client-")
        assert client._feedback.calls == [("r1", user)]  # type: ignore[attr-defined]


def test_a_reply_is_returned_when_its_impressions_cannot_be_recorded() -> None:
    client = QueryClient(ClientSettings(_env_file=None, kafka_bootstrap="127.0.0.1:1"))
    client.consumer = OneReplyConsumer(json.dumps({"request_id": "r2", "status": "ok", "results": []}).encode())  # type: ignore[assignment]
    client._feedback = Impressions(fail=True)  # type: ignore[assignment]
    client.book.expect(b"r2")
    assert client.wait("r2", timeout_s=1)["status"] == "ok"
    assert client.impressions_failed == 1
