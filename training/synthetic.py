"""A small generated catalog in the Kaggle layout, for tests and demos without the dataset.

Each class is a shape (circle, square, triangle, cross, ...) drawn in the class's
colour on white, at a random place and size, with colour jitter and pixel noise, so
that images of a class look alike without being identical and a model can learn the
classes in seconds. With ``colour_by_class=False`` every picture takes a random colour
from the same palette: then only the shape tells classes apart, which an untrained
network does not see, so a test can tell learning from luck.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STYLES_HEADER = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
)
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "bar", "column")
SHAPE_CLASSES = ("Circles", "Squares", "Triangles", "Crosses", "Diamonds", "Rings", "Bars", "Columns")
COLOURS = {
    "Red": (200, 30, 30),
    "Blue": (30, 60, 200),
    "Green": (30, 150, 50),
    "Orange": (230, 130, 20),
    "Purple": (120, 40, 160),
    "Teal": (20, 140, 140),
    "Brown": (120, 70, 30),
    "Black": (30, 30, 30),
}
FIRST_ID = 10_000


def class_name(index: int) -> str:
    """The articleType of class ``index``: its shape, and a round number past the shapes."""
    shape = SHAPE_CLASSES[index % len(SHAPES)]
    return shape if index < len(SHAPES) else f"{shape} {index // len(SHAPES) + 1}"


def class_colour(index: int) -> tuple[str, tuple[int, int, int]]:
    """The name and RGB of class ``index``'s colour."""
    # Past the first round, a class shares its shape with an earlier one but not its colour.
    names = list(COLOURS)
    name = names[(index + index // len(SHAPES)) % len(names)]
    return name, COLOURS[name]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    """Draw ``shape`` centred at (cx, cy) with half-size ``r``."""
    box = (cx - r, cy - r, cx + r, cy + r)
    t = max(r / 3, 1.5)  # stroke half-width
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(int(t), 2))
    elif shape == "bar":
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
    elif shape == "column":
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_picture(index: int, size: int, rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    """One picture of class ``index`` around ``colour``: jittered position, size and colour, plus noise."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    draw_shape(ImageDraw.Draw(img), SHAPES[index % len(SHAPES)], cx, cy, r, fill)
    arr = np.asarray(img, np.int16) + rng.normal(0, 8, size=(size, size, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_synthetic_catalog(
    folder: Path,
    classes: int = 4,
    per_class: int = 12,
    size: int = 64,
    seed: int = 0,
    *,
    colour_by_class: bool = True,
) -> Path:
    """Write ``styles.csv`` and ``images/{id}.jpg`` for ``classes * per_class`` items; return ``folder``.

    Ids are consecutive integers from 10000, classes interleaved (item i is class
    i % classes); articleType is the class name (``Circles``, ``Squares``, ...),
    baseColour the colour drawn. The same arguments give the same files.
    """
    if classes < 1 or per_class < 1:
        raise ValueError("classes and per_class must be at least 1")
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with (folder / "styles.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(STYLES_HEADER)
        for n in range(classes * per_class):
            index = n % classes
            item_id = str(FIRST_ID + n)
            if colour_by_class:
                colour_name, colour = class_colour(index)
            else:
                colour_name = str(rng.choice(list(COLOURS)))
                colour = COLOURS[colour_name]
            make_picture(index, size, rng, colour).save(images / f"{item_id}.jpg", quality=90)
            name = class_name(index)
            title = f"Synthetic {colour_name} {name.lower()}, no. {n // classes + 1}"
            writer.writerow(
                [item_id, "Unisex", "Synthetic", "Shapes", name, colour_name, "Summer", "2024", "Test", title]
            )
    return folder
