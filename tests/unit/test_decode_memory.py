"""A catalog batch of decompression bombs costs a bounded amount of memory (issue 13).

The worker's catalog batch runs in a fresh process (benchmarks/bombs.py) on 16 small files
that each decode to 10 Mpx (30 MB of RGB). Before the decode budget, a batch held every
decoded picture until it was embedded: ~43 MB a bomb, ~690 MB for these 16 (measured: 343 MB
for 8, docs/security.md). Now a JPEG decodes at 1/8 scale and a PNG waits for the budget.
"""

from __future__ import annotations

import sys

import pytest

from benchmarks.bombs import run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")


def test_a_batch_of_jpeg_bombs_decodes_at_a_fraction_of_their_pixels() -> None:
    result = run("jpeg", 16, 10)
    assert result["vectors"] == 16 and result["dead_letters"] == 0
    assert result["batch_cost_mb"] < 60, result  # 16 x 30 MB held at once would be 480 MB


def test_a_batch_of_png_bombs_holds_one_at_a_time_within_the_budget() -> None:
    result = run("png", 16, 10, {"catalog_decode_budget_pixels": 10_000_000, "catalog_decode_threads": 2})
    assert result["vectors"] == 16 and result["dead_letters"] == 0
    assert result["batch_cost_mb"] < 150, result  # one 30 MB picture (and its conversions) at a time


def test_a_batch_of_png_bomb_queries_holds_the_model_inputs_not_the_pictures() -> None:
    result = run("png", 16, 10, {"path": "queries"})
    assert result["vectors"] == 16
    assert result["batch_cost_mb"] < 150, result  # 16 x 30 MB of pictures held until the batch is embedded: 480 MB
