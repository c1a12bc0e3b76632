"""Reading a catalog folder: the Kaggle "Fashion Product Images" layout or a plain folder.

Kaggle layout: ``styles.csv`` (id,gender,masterCategory,subCategory,articleType,
baseColour,season,year,usage,productDisplayName) and ``images/{id}.jpg``. The original
styles.csv has rows whose productDisplayName holds unquoted commas; those rows have
more fields than the header, and the extra fields belong to the last column.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
STYLES_FILE = "styles.csv"


@dataclass(frozen=True)
class CatalogItem:
    """One product: its id, where its image is, and its metadata (labels, title)."""

    item_id: str
    image_path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        return self.metadata.get("articleType")


def read_styles(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a Kaggle styles.csv as dicts; tolerant of unquoted commas in the last column."""
    text = Path(path).read_text("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    width = len(header)
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) > width:  # unquoted commas in productDisplayName
            row = [*row[:width - 1], ",".join(row[width - 1:])]
        elif len(row) < width:
            log.warning("%s:%d has %d fields, expected %d; skipped", path, line_no, len(row), width)
            continue
        yield {name: value.strip() for name, value in zip(header, row, strict=True)}


def metadata_from_style(row: dict[str, str]) -> dict[str, Any]:
    """The ``metadata`` header for a styles.csv row: title plus the label columns."""
    meta: dict[str, Any] = {"title": row.get("productDisplayName", "")}
    for name in ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage"):
        if row.get(name):
            meta[name] = row[name]
    return meta


def iter_catalog(folder: Path) -> Iterator[CatalogItem]:
    """Items of a catalog folder, in file order. Rows without an image are skipped."""
    folder = Path(folder)
    styles = folder / STYLES_FILE
    if styles.is_file():
        images = folder / "images"
        missing = 0
        for row in read_styles(styles):
            item_id = row.get("id", "")
            path = images / f"{item_id}.jpg"
            if not item_id or not path.is_file():
                missing += 1
                continue
            yield CatalogItem(item_id=item_id, image_path=path, metadata=metadata_from_style(row))
        if missing:
            log.warning("%d rows of %s have no image and were skipped", missing, styles)
        return
    if not folder.is_dir():
        raise FileNotFoundError(f"catalog folder {folder} does not exist")
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield CatalogItem(item_id=path.stem, image_path=path, metadata={"title": path.stem})
