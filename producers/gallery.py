"""A picture of a query and its results: the query on the left, then the top k with ids and scores."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

TILE = 160
CAPTION = 34
PAD = 8


def _tile(image: Image.Image | None, caption: list[str], highlight: bool = False) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    if image is not None:
        thumb = ImageOps.contain(image.convert("RGB"), (TILE, TILE))
        tile.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
    else:
        ImageDraw.Draw(tile).rectangle([4, 4, TILE - 5, TILE - 5], outline="grey")
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    for i, line in enumerate(caption[:2]):
        draw.text((4, TILE + 2 + i * 15), line[:26], fill="black", font=font)
    if highlight:
        draw.rectangle([0, 0, TILE - 1, TILE + CAPTION - 1], outline="royalblue", width=3)
    return tile


def render_rows(rows: Sequence[tuple[Image.Image | None, dict[str, Any]]],
                load_item: Callable[[str], Image.Image | None]) -> Image.Image:
    """One row per (query image, reply): query tile then one tile per result."""
    width = max(1 + len(reply.get("results", [])) for _, reply in rows) if rows else 1
    sheet = Image.new("RGB", (PAD + width * (TILE + PAD), PAD + len(rows) * (TILE + CAPTION + PAD)), "white")
    for r, (query, reply) in enumerate(rows):
        y = PAD + r * (TILE + CAPTION + PAD)
        label = "query" if reply.get("status") == "ok" else f"error: {reply.get('error', {}).get('code')}"
        sheet.paste(_tile(query, [label], highlight=True), (PAD, y))
        for i, hit in enumerate(reply.get("results", []), start=1):
            meta = hit.get("metadata") or {}
            caption = [f"{hit['item_id']}  {hit['score']:.3f}", str(meta.get("articleType") or meta.get("title") or "")]
            sheet.paste(_tile(load_item(hit["item_id"]), caption), (PAD + i * (TILE + PAD), y))
    return sheet


def image_loader(images_dir: Path | None) -> Callable[[str], Image.Image | None]:
    """Find a result's picture as ``{images_dir}/{item_id}.jpg`` (Kaggle layout) if there is one."""

    def load(item_id: str) -> Image.Image | None:
        if images_dir is None:
            return None
        for suffix in (".jpg", ".jpeg", ".png", ".webp"):
            path = Path(images_dir) / f"{item_id}{suffix}"
            if path.is_file():
                with Image.open(path) as img:
                    return img.convert("RGB")
        return None

    return load


def open_image(data: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError):
        return None
