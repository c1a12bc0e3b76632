"""Decoding and preprocessing of images: one implementation for catalog, queries and training.

``decode_image`` turns untrusted bytes into an RGB picture or raises :class:`BadImage`;
``preprocess`` turns a picture into the model's input tensor as the artifact's
:class:`PreprocessSpec` says; ``decode_pixels`` does both up to the uint8 input, decoding
a JPEG no larger than the input needs (draft mode) and letting go of the picture at once.
Workers, training and evaluation all call these, so a model sees at serving time exactly
what it saw while learning.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from lookalike.errors import BadImage, MessageTooLarge

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
# Background for transparent pixels: catalog photos are shot on white.
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become a model input. Stored in every model artifact."""

    size: int = 64
    resize: Literal["stretch", "pad"] = "stretch"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=int(raw["size"]),
            resize=raw["resize"],
            mean=tuple(float(v) for v in raw["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in raw["std"]),  # type: ignore[arg-type]
        )


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_size: int | None = None) -> Image.Image:
    """Untrusted bytes -> an RGB image, upright as its EXIF says.

    The rules (docs/contracts.md): at most ``max_bytes``; JPEG, PNG or WebP by content
    (the bytes are sniffed, nothing trusts a name or a header); at most ``max_pixels``
    checked from the image header *before* pixels are decoded (decompression bombs);
    truncated or corrupt data refused; an animated PNG or WebP stands for its first
    frame; the EXIF orientation is applied (an unknown orientation value is ignored).
    Raises MessageTooLarge or BadImage, never a Pillow exception.

    ``min_size``: the picture is wanted no smaller than this on either side (the model's
    input), so a JPEG is decoded at 1/2, 1/4 or 1/8 of its size by DCT scaling (Pillow's
    draft mode) when that still leaves both sides at least ``min_size``: less work, and a
    40 Mpx JPEG costs the memory of a 0.6 Mpx one. Other formats decode at full size.
    """
    with refusing_decoder_errors():
        return load_rgb(open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, min_size=min_size))


def decode_pixels(data: bytes, spec: PreprocessSpec, *, max_bytes: int, max_pixels: int,
                  budget: DecodeBudget | None = None) -> np.ndarray:
    """Untrusted bytes -> the model's uint8 input (size, size, 3), under ``decode_image``'s rules.

    The one decode path of serving, training and evaluation: decoded no larger than
    ``spec.size`` needs (``min_size``), resized to the square, and the full picture let go
    at once (a batch holds its small arrays, never its decoded pictures). With ``budget``,
    the decoded picture's pixels are held from it while it exists (:class:`DecodeBudget`).
    """
    with refusing_decoder_errors():
        img = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, min_size=spec.size)
        with budget.hold(img.width * img.height) if budget is not None else contextlib.nullcontext():
            pixels = to_uint8(load_rgb(img), spec)
            img.close()  # the decoded picture goes before the budget is given back, not at return
        return pixels


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, min_size: int | None = None) -> Image.Image:
    """Sniff and check the header (size, pixel limit); pick the JPEG scale. No pixel is decoded
    yet: ``img.size`` is then the size the decoder will make. Pillow errors pass through
    (callers wrap this in :func:`refusing_decoder_errors`)."""
    if not data:
        raise BadImage("image is empty")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"image is {len(data)} bytes, the limit is {max_bytes}")
    img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    if img.width * img.height > max_pixels:
        raise BadImage(f"image is {img.width}x{img.height}, over the {max_pixels} pixel limit")
    img.seek(0)  # animated WebP/PNG: the first frame stands for the item
    if min_size and img.format == "JPEG":
        img.draft(None, (min_size, min_size))  # the largest 1/1..1/8 scale that keeps both sides >= min_size
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """An opened image -> its pixels, upright, in RGB."""
    img.load()
    transposed = ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright picture
    return to_rgb(transposed if transposed is not None else img)


@contextlib.contextmanager
def refusing_decoder_errors() -> Iterator[None]:
    """Whatever Pillow raises on hostile bytes becomes a BadImage with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (BadImage, MessageTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"image rejected as a decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise BadImage(f"not a {'/'.join(sorted(ALLOWED_FORMATS))} image") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"image cannot be decoded: {exc}") from exc
    except Exception as exc:  # a decoder bug on hostile bytes (struct.error, IndexError, ...) is still a bad image
        raise BadImage(f"image cannot be decoded: {type(exc).__name__}: {exc}") from exc


class DecodeBudget:
    """A bound on the decoded pixels that exist at once, shared by the threads that decode
    one catalog batch (or more).

    A decode holds its picture's pixel count (the size it decodes at, from the header) until
    the picture is down to the model's input; a decode that would go over the budget waits
    for others to finish, so a batch of 64 decompression bombs costs one bomb's memory at a
    time, not 64. A single picture larger than the whole budget is refused (BadImage) rather
    than waited for. Memory per pixel is 3-8 bytes while a picture is converted to RGB.
    """

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._held = 0
        self._freed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels > self.max_pixels:
            raise BadImage(f"image decodes to {pixels} pixels, over the decode budget of {self.max_pixels}")
        with self._freed:
            self._freed.wait_for(lambda: self._held + pixels <= self.max_pixels)
            self._held += pixels
        try:
            yield
        finally:
            with self._freed:
                self._held -= pixels
                self._freed.notify_all()

    @property
    def held(self) -> int:
        return self._held


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (RGBA, LA, P, L, I;16, CMYK, ...) -> RGB, transparency on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA"}:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode.startswith("I;16") or img.mode in {"I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize_to_square(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The square the model sees: stretched, or padded with the background."""
    size = spec.size
    if spec.resize == "stretch":
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    scale = size / max(img.width, img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0), ((size - w) // 2, (size - h) // 2))
    return canvas


def to_uint8(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> uint8 array (size, size, 3), before normalisation (what caches store)."""
    return np.asarray(resize_to_square(img, spec), dtype=np.uint8)


def normalise(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) normalised by the spec's mean and std."""
    arr = pixels.astype(np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.moveaxis(arr, -1, -3).copy()


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> float32 (3, size, size), the model input."""
    return normalise(to_uint8(img, spec), spec)
