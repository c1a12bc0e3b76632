"""The documented generic-client example (docs/examples/query-with-kcat.sh) works as written."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import jsonschema
import pytest

from lookalike import contracts as c
from tests.images import jpeg_bytes

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "query-with-kcat.sh"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (Debian: apt-get install kcat; .ci/run does)")
def test_kcat_example_gets_the_reply(pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    item_id = f"kcat-{uuid.uuid4().hex[:8]}"
    image = jpeg_bytes(seed=41)
    feed = pipeline.feed()
    feed.publish(item_id, image, {"title": "asked by kcat"})
    for seed in range(42, 47):
        feed.publish(f"{item_id}-other-{seed}", jpeg_bytes(seed=seed), {"title": "another"})
    feed.flush()
    with pipeline.client() as client:  # read-your-writes: every item above is in the index after this
        assert client.ask(image, min_position=feed.positions, timeout_s=20)["status"] == "ok"
    path = tmp_path / "query.jpg"
    path.write_bytes(image)
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([str(SCRIPT), str(path), request_id], env=pipeline.env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    jsonschema.validate(reply, c.schema("reply"))
    assert reply["request_id"] == request_id
    assert reply["status"] == "ok"
    assert reply["results"][0]["item_id"] == item_id
    assert len(reply["results"]) == 5
