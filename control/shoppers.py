"""`lookalike shoppers`: simulated shoppers against the running stack, with a progress bar.

The behaviour model is :mod:`producers.shoppers` (docs/feedback.md#shoppers). Photos are
products of the dataset re-shot as shoppers send them; with the demo's catalog most of
them are in the index (the demo holds 6 out), which is fine for the feedback figures.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from control.timeline import failed
from lookalike.catalog import iter_catalog
from lookalike.settings import ClientSettings
from producers.shoppers import QueryRecord, ShopperRun


def summary(records: list[QueryRecord], seconds: float) -> str:
    """Per model version that answered: queries, mean P@5, clicks in the top 5; then the failures."""
    lines = []
    versions = sorted({r.model_version for r in records if r.status == "ok" and r.model_version})
    for version in versions:
        ok = [r for r in records if r.status == "ok" and r.model_version == version]
        p5 = [r.precision_at_5 for r in ok if r.precision_at_5 is not None]
        lines.append(f"model {version}: {len(ok)} ok replies, P@5 {statistics.fmean(p5) if p5 else float('nan'):.3f}, "
                     f"{sum(r.clicks_at_5 for r in ok)} clicks in the top 5, "
                     f"{sum(r.events for r in ok)} feedback events")
    bad = failed(records)
    lines.append(f"{len(records)} queries in {seconds:.0f} s ({len(records) / max(seconds, 1e-9):.2f}/s), "
                 f"{len(bad)} failed" + (f" (e.g. {bad[0].error})" if bad else ""))
    return "\n".join(lines)


def run_shoppers(data: Path, *, rate: float, lanes: int, duration_s: float, queries: int | None = None,
                 seed: int = 0, settings: ClientSettings | None = None) -> int:
    """Run shoppers until ``duration_s`` passed (or ``queries`` were asked); print what they saw."""
    items = list(iter_catalog(data))
    random.Random(seed).shuffle(items)
    run = ShopperRun(settings or ClientSettings(), items[:2000], rate=rate, lanes=lanes, seed=seed)
    bar = tqdm(total=queries or int(duration_s * rate), unit="q", desc="shoppers")
    run.on_record = lambda record: bar.update(1)
    started = time.monotonic()
    run.start()
    try:
        while run.alive():
            time.sleep(0.5)
            records = run.snapshot()
            bar.set_postfix_str(f"{len(failed(records))} failed")
            if (queries and len(records) >= queries) or (not queries and time.monotonic() - started >= duration_s):
                break
    finally:
        run.stop()
        bar.close()
    records = run.snapshot()
    print(summary(records, time.monotonic() - started))
    return 1 if failed(records) else 0
