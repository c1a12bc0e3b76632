from __future__ import annotations

import json
from pathlib import Path

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
        {c.H_K: b"1_0"},
        {c.H_K: b" 5"},
        {c.H_K: b"+5"},
        {c.H_K: b"-1"},
        {c.H_K: b""},
        {c.H_K: b"9" * 5000},
        {c.H_K: "٥".encode()},
        {c.H_REPLY_TO: b"lookalike.catalog"},
        {c.H_REPLY_TO: b"lookalike.catalog.vectors"},
    ],
)
def test_query_headers_refused(headers: dict[str, bytes]) -> None:
    with pytest.raises(InvalidMessage) as err:
        c.parse_query_headers(headers, **OPTS, forbidden_reply_topics={"lookalike.catalog", "lookalike.catalog.vectors"})
    assert err.value.code in {"bad_header", "bad_key"}


@pytest.mark.parametrize(
    "key",
    [None, b"", b"\xff\xfe", b"a" * 257, b"line\nbreak", b"del\x7f", "c1\x85".encode(), b"\xc0\xaf",
     b"\xed\xa0\x80", b"caf\xc3"],
    ids=["none", "empty", "not-utf8", "too-long", "newline", "del", "c1-control", "overlong", "surrogate", "cut-utf8"],
)
def test_bad_keys(key: bytes | None) -> None:
    with pytest.raises(BadKey):
        c.decode_key(key)


def test_unicode_keys_are_fine() -> None:
    assert c.decode_key("Ölkännchen-𝔘-🧥".encode()) == "Ölkännchen-𝔘-🧥"
    assert c.decode_key(b"a" * 256) == "a" * 256


def test_unknown_headers_are_ignored_and_duplicates_keep_the_last() -> None:
    headers = c.headers_to_dict([(c.H_K, b"3"), ("x-trace", b"\xff"), (c.H_K, b"7")])
    assert c.parse_query_headers(headers, **OPTS).k == 7


def test_header_limits() -> None:
    c.check_header_limits([("h", b"x")] * c.MAX_HEADERS)
    with pytest.raises(InvalidMessage) as err:
        c.check_header_limits([("h", b"x")] * (c.MAX_HEADERS + 1))
    assert err.value.code == "too_large"
    with pytest.raises(InvalidMessage, match="headers are"):
        c.check_header_limits({"a": b"x" * c.MAX_HEADER_BYTES})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 60_000, "nested too deeply"),
        (b'{"a":' * 17 + b"1" + b"}" * 17, "nested too deeply"),
        (b'{"price": NaN}', "not UTF-8 JSON"),
        (b'{"price": -Infinity}', "not UTF-8 JSON"),
        (b'{"title": "\\ud800"}', "lone surrogate"),
        (b'{"title": 42}', "'title' must be a str"),
        (b'{"year": true}', "'year' must be a str or int"),
        (b'"just a string"', "JSON object"),
    ],
)
def test_hostile_metadata_is_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(BadHeader, match=reason):
        c.decode_metadata(raw)


def test_metadata_keeps_unknown_fields() -> None:
    raw = b'{"title": "t", "year": 2012, "x-extra": {"deep": [1, 2.5, null]}, "emoji": "\xf0\x9f\xa7\xa5"}'
    assert c.decode_metadata(raw) == {"title": "t", "year": 2012, "x-extra": {"deep": [1, 2.5, None]}, "emoji": "🧥"}


def test_encoded_reply_is_valid_utf8_whatever_the_message() -> None:
    raw = c.encode_reply(c.error_reply("r", "internal", "quoting \ud800 from the input"))
    assert raw.decode("utf-8")


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


def test_the_reply_schema_lists_exactly_the_error_codes() -> None:
    """One list of codes: ErrorCode. The schema (what clients validate against) and the
    contract document name the same ones."""
    from lookalike.errors import NO_REPLY_CODES, ErrorCode

    schema = c.schema("reply")
    error = next(branch for branch in schema["properties"]["error"]["oneOf"] if branch["type"] == "object")
    enum = error["properties"]["code"]["enum"]
    assert sorted(enum) == sorted(code.value for code in ErrorCode if code not in NO_REPLY_CODES)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "contracts.md").read_text()
    assert [code.value for code in ErrorCode if f"`{code.value}`" not in doc] == []


def test_an_unknown_error_code_is_refused_where_it_is_raised() -> None:
    from lookalike.errors import ErrorCode, InvalidMessage, code_of

    with pytest.raises(ValueError):
        InvalidMessage("x", code="no_such_code")
    assert code_of(RecursionError("deep")) == ErrorCode.INTERNAL
    assert code_of(InvalidMessage("x", code="not_ready")) == ErrorCode.NOT_READY


# -- parsing bounds: checked before anything converts ---------------------------------------------

@pytest.mark.parametrize("raw", [b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000])
def test_json_nesting_is_refused_before_parsing(raw: bytes) -> None:
    assert c.json_depth(raw) > c.MAX_JSON_DEPTH
    with pytest.raises(InvalidMessage, match="nested too deeply"):
        c.parse_json(raw, what="doc", max_bytes=10**6)


def test_json_depth_ignores_brackets_inside_strings() -> None:
    raw = b'{"a": "[[[[[[[[\\"{{{{", "b": [[1]]}'
    assert c.json_depth(raw) == 3
    assert c.parse_json(raw, what="doc", max_bytes=100) == {"a": '[[[[[[[["{{{{', "b": [[1]]}
    for raw, depth in [(b'["\\\\", [2]]', 2), (b'["a\\\\\\"["]', 1), (b'"[[["', 0), (b"[[[]]]", 3)]:
        assert c.json_depth(raw) == depth, raw
        json.loads(raw)  # each is valid JSON


@pytest.mark.timeout(30)  # a scan that backtracks takes hours on this (a regular expression did)
def test_json_depth_is_linear_on_quotes_and_backslashes() -> None:
    assert c.json_depth(b"[" + b'\\"' * 500_000) == 1


@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity]", b"\xff", b"{", b"x" * 101])
def test_parse_json_refuses_what_is_not_strict_bounded_json(raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        c.parse_json(raw, what="doc", max_bytes=100)


@pytest.mark.parametrize("raw", [b"9" * 400, b"9" * 20, b" 5", b"+5", b"1_0", b"\xd9\xa5", b"", None, b"5.0"])
def test_header_integers_are_bounded_before_converting(raw: bytes | None) -> None:
    with pytest.raises(BadHeader):
        c.parse_int(raw, what="n", lo=0, hi=2**62)


def test_header_integers_in_range() -> None:
    assert c.parse_int(b"1764460000000", what="ts", lo=0, hi=2**62) == 1764460000000
    with pytest.raises(BadHeader, match="outside"):
        c.parse_int(b"0", what="k", lo=1, hi=10)


@pytest.mark.parametrize("raw", [b"0:" + b"9" * 400, b"9" * 10 + b":1", b"0:1,", b" 0:1", b"0:-1", b"0:1:2",
                                 b",".join(b"%d:1" % i for i in range(1025))])
def test_positions_are_bounded_before_converting(raw: bytes) -> None:
    with pytest.raises(BadHeader):
        c.parse_position(raw)


def test_positions() -> None:
    assert c.parse_position(b"0:1200,3:57") == {0: 1200, 3: 57}
    assert c.parse_position(c.format_position({2: 5, 0: 1})) == {0: 1, 2: 5}


def big_reply(n: int, metadata_bytes: int) -> dict:
    results = [{"item_id": f"item-{i}", "score": 1 - i / 100, "metadata": {"title": "x" * metadata_bytes}}
               for i in range(n)]
    return c.ok_reply("r1", results, model_version="m", index_version="m/1", index_position={0: 5},
                      timings_ms={"search": 0.4})


def test_a_reply_over_its_budget_loses_metadata_from_the_bottom() -> None:
    reply = big_reply(20, 60_000)
    data = c.fit_reply(reply, 500_000)
    assert len(c.encode_reply(reply)) > 1_000_000 and len(data) <= 500_000
    doc = json.loads(data)
    jsonschema.validate(doc, c.schema("reply"))
    assert doc["status"] == "ok" and doc["metadata_trimmed"] is True
    assert [r["item_id"] for r in doc["results"]] == [f"item-{i}" for i in range(20)]  # every result stays
    kept = [bool(r["metadata"]) for r in doc["results"]]
    assert kept[0] and not kept[-1] and kept == sorted(kept, reverse=True)  # the best keep theirs
    assert c.fit_reply(big_reply(3, 10), 500_000) == c.encode_reply(big_reply(3, 10))  # small: untouched


def test_a_reply_that_cannot_fit_is_too_large() -> None:
    reply = big_reply(3, 10)
    reply["results"] = [{"item_id": "i" * 200, "score": 0.5, "metadata": {}}] * 200
    doc = json.loads(c.fit_reply(reply, 20_000))
    jsonschema.validate(doc, c.schema("reply"))
    assert doc["status"] == "error" and doc["error"]["code"] == "too_large" and doc["request_id"] == "r1"


def test_replies_read_back_are_checked_for_what_their_readers_use() -> None:
    good = c.encode_reply(big_reply(2, 5))
    assert c.parse_reply(good)["results"][0]["item_id"] == "item-0"
    assert c.parse_reply(c.encode_reply(c.error_reply("r", "not_ready", "later")))["error"]["code"] == "not_ready"
    doc = json.loads(good)
    for broken in ({**doc, "results": [{"item_id": 1, "score": 0.5}]}, {**doc, "results": [{"item_id": "a"}]},
                   {**doc, "results": [{"item_id": "a", "score": True}]}, {**doc, "results": {}},
                   {**doc, "index_position": {"0": -1}}, {**doc, "index_position": {"p": 1}},
                   {**doc, "timings_ms": {"t": [1]}}, {**doc, "error": "oops"}, {**doc, "status": "maybe"},
                   {**doc, "request_id": None}, {**doc, "model_version": 7}):
        with pytest.raises(InvalidMessage):
            c.parse_reply(json.dumps(broken).encode())
