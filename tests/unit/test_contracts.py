from __future__ import annotations

import jsonschema
import numpy as np
import pytest

from lookalike import contracts as c
from lookalike.errors import BadHeader, BadKey, InvalidMessage

OPTS = {"default_reply_to": "lookalike.replies", "default_k": 5, "max_k": 100, "reply_topic_prefix": "lookalike."}


def test_query_headers_defaults() -> None:
    options = c.parse_query_headers({}, **OPTS)
    assert options == c.QueryOptions(reply_to="lookalike.replies", k=5, item_id=None)


def test_query_headers_all_set() -> None:
    headers = {c.H_REPLY_TO: b"lookalike.replies.mine", c.H_K: b"12", c.H_ITEM_ID: b"1163"}
    assert c.parse_query_headers(headers, **OPTS) == c.QueryOptions("lookalike.replies.mine", 12, "1163")


@pytest.mark.parametrize(
    "headers",
    [
        {c.H_K: b"0"},
        {c.H_K: b"101"},
        {c.H_K: b"five"},
        {c.H_K: b"\xff"},
        {c.H_REPLY_TO: b"other.topic"},
        {c.H_REPLY_TO: b"lookalike.bad topic"},
        {c.H_REPLY_TO: b"\xff\xfe"},
        {c.H_ITEM_ID: b"\xff"},
        {c.H_ITEM_ID: b""},
    ],
)
def test_query_headers_refused(headers: dict[str, bytes]) -> None:
    with pytest.raises(InvalidMessage) as err:
        c.parse_query_headers(headers, **OPTS)
    assert err.value.code in {"bad_header", "bad_key"}


@pytest.mark.parametrize("key", [None, b"", b"\xff\xfe", b"a" * 257, b"line\nbreak"])
def test_bad_keys(key: bytes | None) -> None:
    with pytest.raises(BadKey):
        c.decode_key(key)


def test_metadata_header() -> None:
    assert c.decode_metadata(None) == {}
    assert c.decode_metadata(b'{"title": "x"}') == {"title": "x"}
    for raw in (b"[1, 2]", b"{not json", b"\xff", b"{" + b" " * c.MAX_METADATA_BYTES + b"}"):
        with pytest.raises(BadHeader):
            c.decode_metadata(raw)


def test_vector_round_trip_and_length_check() -> None:
    vec = np.random.default_rng(0).normal(size=256).astype(np.float32)
    raw = c.encode_vector(vec)
    assert len(raw) == 1024
    np.testing.assert_array_equal(c.decode_vector(raw, 256), vec)
    with pytest.raises(InvalidMessage):
        c.decode_vector(raw[:-4], 256)


def test_replies_match_the_schema() -> None:
    ok = c.ok_reply(
        "r1", [{"item_id": "1", "score": 0.9, "metadata": {}}], model_version="m", index_version="m/1",
        index_position={0: 3, 1: 4}, timings_ms={"search": 0.1234},
    )
    jsonschema.validate(ok, c.schema("reply"))
    assert ok["index_position"] == {"0": 3, "1": 4}
    error = c.error_reply("r2", "bad_image", "no")
    jsonschema.validate(error, c.schema("reply"))
    broken = dict(ok, status="error")  # an error must say why
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, c.schema("reply"))


def test_topic_names() -> None:
    assert c.valid_topic_name("lookalike.replies-2_x")
    assert not c.valid_topic_name("..")
    assert not c.valid_topic_name("a" * 250)
    assert not c.valid_topic_name("é")
