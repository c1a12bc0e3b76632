"""Decoding untrusted image bytes and preprocessing them as the model expects."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import BadImage, InvalidMessage, MessageTooLarge
from lookalike.imaging import (
    DecodeBudget,
    PreprocessSpec,
    decode_image,
    decode_pixels,
    normalise,
    preprocess,
    to_uint8,
)

LIMITS = {"max_bytes": 8 * 1024 * 1024, "max_pixels": 40_000_000}
RED = (220, 20, 20)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_decodes_rgb_jpeg() -> None:
    img = decode_image(encode(Image.new("RGB", (30, 20), RED), "JPEG", quality=95), **LIMITS)
    assert (img.mode, img.size) == ("RGB", (30, 20))
    assert np.abs(np.asarray(img, np.int16)[10, 15] - RED).max() < 10


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 5, 10))  # left half opaque blue
    arr = np.asarray(decode_image(encode(rgba, "PNG"), **LIMITS))
    assert arr.shape == (10, 10, 3)
    assert (arr[:, 5:] == 255).all()
    assert (arr[:, :5] == (0, 0, 255)).all()


def test_greyscale_becomes_rgb_with_equal_channels() -> None:
    grey = Image.linear_gradient("L").resize((32, 32))
    arr = np.asarray(decode_image(encode(grey, "JPEG"), **LIMITS))
    assert arr.shape == (32, 32, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.min() < 30 and arr.max() > 220


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    img = decode_image(encode(cmyk, "JPEG", quality=95), **LIMITS)
    r, g, b = np.asarray(img, np.int16)[8, 8]
    assert img.mode == "RGB"
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency() -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([*RED, 0, 255, 0] + [0, 0, 0] * 254)
    pal.paste(1, (0, 0, 4, 8))
    pal.info["transparency"] = 0  # index 0 (red) is transparent
    arr = np.asarray(decode_image(encode(pal, "PNG", transparency=0), **LIMITS))
    assert (arr[:, :4] == (0, 255, 0)).all()
    assert (arr[:, 4:] == 255).all()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), RED)
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95), **LIMITS)
    assert decoded.size == (20, 40)
    arr = np.asarray(decoded, np.int16)
    assert arr[2, 10, 2] > 200  # the blue band is now on top
    assert arr[-2, 10, 0] > 200


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not an image at all", id="garbage"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, id="corrupt-png"),
    ],
)
def test_undecodable_bytes_are_bad_images(data: bytes) -> None:
    with pytest.raises(BadImage):
        decode_image(data, **LIMITS)


def test_truncated_jpeg_is_a_bad_image() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    with pytest.raises(BadImage, match="cannot be decoded"):
        decode_image(data[: len(data) // 2], **LIMITS)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_formats_outside_the_allowed_set_are_refused(fmt: str) -> None:
    with pytest.raises(BadImage, match="not a JPEG/PNG/WEBP image"):
        decode_image(encode(Image.new("RGB", (8, 8), RED), fmt), **LIMITS)


def test_bytes_over_the_limit_are_too_large() -> None:
    data = encode(Image.new("RGB", (8, 8), RED), "PNG")
    with pytest.raises(MessageTooLarge) as info:
        decode_image(data, max_bytes=len(data) - 1, max_pixels=1_000_000)
    assert info.value.code == "too_large"
    assert isinstance(info.value, InvalidMessage)


def test_pixels_over_the_limit_are_refused() -> None:
    data = encode(Image.new("RGB", (40, 30), RED), "PNG")
    assert decode_image(data, max_bytes=10_000, max_pixels=1200).size == (40, 30)
    with pytest.raises(BadImage, match="pixel limit") as info:
        decode_image(data, max_bytes=10_000, max_pixels=1199)
    assert info.value.code == "bad_image"


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_a_small_file_claiming_huge_dimensions_is_refused_before_decoding(side: int) -> None:
    data = png_claiming(side, side)
    assert len(data) < 200
    with pytest.raises(BadImage):
        decode_image(data, **LIMITS)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_preprocess_shapes_and_types(resize: str) -> None:
    spec = PreprocessSpec(size=32, resize=resize)  # type: ignore[arg-type]
    img = Image.new("RGB", (60, 80), RED)
    pixels = to_uint8(img, spec)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    tensor = preprocess(img, spec)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == np.float32
    assert np.allclose(tensor, normalise(pixels, spec))
    batch = normalise(np.stack([pixels, pixels]), spec)
    assert batch.shape == (2, 3, 32, 32)


def test_pad_keeps_the_aspect_on_white_and_stretch_fills() -> None:
    img = Image.new("RGB", (64, 32), RED)  # wide: padding goes above and below
    padded = to_uint8(img, PreprocessSpec(size=32, resize="pad"))
    stretched = to_uint8(img, PreprocessSpec(size=32, resize="stretch"))
    assert (padded[:7] == 255).all() and (padded[-7:] == 255).all()
    assert (padded[16] == RED).all()
    assert (stretched == RED).all()


def test_normalise_maps_the_pixel_range_by_mean_and_std() -> None:
    spec = PreprocessSpec(size=2)
    pixels = np.array([[[0, 0, 0], [255, 255, 255]], [[0, 0, 0], [255, 255, 255]]], np.uint8)
    out = normalise(pixels, spec)
    assert out.shape == (3, 2, 2)
    assert np.allclose(out[:, :, 0], -1.0) and np.allclose(out[:, :, 1], 1.0)


def test_preprocess_spec_round_trips_through_a_dict() -> None:
    spec = PreprocessSpec(size=48, resize="pad", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


# EXIF orientation -> how the stored pixels must be turned to display upright (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def quadrants() -> Image.Image:
    """A 6x4 picture whose four quadrants differ: every flip and turn gives another picture."""
    img = Image.new("RGB", (6, 4), (255, 0, 0))
    img.paste((0, 255, 0), (3, 0, 6, 2))
    img.paste((0, 0, 255), (0, 2, 3, 4))
    img.paste((255, 255, 0), (3, 2, 6, 4))
    return img


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_every_exif_orientation_is_honoured(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(quadrants(), "PNG", exif=exif), **LIMITS)
    method = ORIENTATIONS[orientation]
    expected = quadrants() if method is None else quadrants().transpose(method)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_an_unknown_orientation_is_ignored(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(quadrants(), "PNG", exif=exif), **LIMITS)
    assert np.array_equal(np.asarray(decoded), np.asarray(quadrants()))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_corrupt_exif_block_does_not_fail_the_image() -> None:
    data = encode(Image.new("RGB", (8, 8), RED), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert decode_image(data, **LIMITS).size == (8, 8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animated_image_stands_for_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (12, 10), colour) for colour in (RED, (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with Image.open(io.BytesIO(data)) as probe:
        assert getattr(probe, "n_frames", 1) == 3, "the test image really is animated"
    decoded = np.asarray(decode_image(data, **LIMITS), np.int16)
    assert decoded.shape == (10, 12, 3)
    assert np.abs(decoded - RED).max() < 8


def test_an_animation_with_a_huge_canvas_is_refused() -> None:
    frames = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), (0, 0, 255))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(BadImage, match="pixel limit"):
        decode_image(data, max_bytes=10_000, max_pixels=1199)


def test_animated_gif_is_refused_like_any_gif() -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), (0, 0, 255))]
    with pytest.raises(BadImage, match="not a JPEG/PNG/WEBP"):
        decode_image(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_truncated_png_and_webp_are_bad_images(fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    for cut in (len(data) // 3, len(data) * 2 // 3):
        with pytest.raises(BadImage):
            decode_image(data[:cut], **LIMITS)


def test_a_jpeg_claiming_huge_dimensions_is_refused_before_decoding() -> None:
    data = bytearray(encode(Image.new("RGB", (8, 8), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = (60_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big")
    with pytest.raises(BadImage, match=r"pixel limit|decompression bomb"):
        decode_image(bytes(data), **LIMITS)


def test_a_decoder_bug_is_a_bad_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    def broken(self):  # type: ignore[no-untyped-def]
        raise IndexError("index out of range in a decoder")

    data = encode(Image.new("RGB", (8, 8), RED), "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(BadImage, match="IndexError"):
        decode_image(data, **LIMITS)


# -- decoding at the size the model needs (draft mode) and the decode budget -----------------

def smooth(size: tuple[int, int]) -> Image.Image:
    """A picture with gradients and edges, like a product shot (not flat, not noise)."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    arr = np.stack([x * 255, y * 255, ((x + y) % 0.5 > 0.25) * 200 + 30], axis=-1)
    return Image.fromarray(arr.astype(np.uint8))


def test_a_large_jpeg_decodes_at_the_largest_scale_that_keeps_the_model_input() -> None:
    data = encode(smooth((800, 600)), "JPEG", quality=90)
    assert decode_image(data, **LIMITS).size == (800, 600)  # no min_size: the full picture
    assert decode_image(data, **LIMITS, min_size=64).size == (100, 75)  # 1/8: both sides still >= 64
    assert decode_image(data, **LIMITS, min_size=100).size == (200, 150)  # 1/4 (1/8 would leave 75 < 100)
    assert decode_image(data, **LIMITS, min_size=600).size == (800, 600)


def test_only_jpegs_are_decoded_at_a_reduced_scale() -> None:
    for fmt in ("PNG", "WEBP"):
        assert decode_image(encode(smooth((400, 300)), fmt), **LIMITS, min_size=32).size == (400, 300)


def test_decode_pixels_is_decode_image_at_the_input_size_then_to_uint8() -> None:
    spec = PreprocessSpec(size=48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: drafting must not lose the orientation
    for data in (encode(smooth((500, 300)), "JPEG", quality=90), encode(smooth((500, 300)), "JPEG", exif=exif),
                 encode(smooth((120, 90)).convert("RGBA"), "PNG"), encode(smooth((64, 64)), "WEBP")):
        expected = to_uint8(decode_image(data, **LIMITS, min_size=spec.size), spec)
        assert np.array_equal(decode_pixels(data, spec, **LIMITS), expected)
    rotated = decode_image(encode(smooth((500, 300)), "JPEG", exif=exif), **LIMITS, min_size=48)
    assert rotated.size == (75, 125)  # 1/4 scale, then turned upright


def test_draft_decoding_stays_within_a_few_grey_levels_of_the_full_decode() -> None:
    spec = PreprocessSpec(size=64)
    data = encode(smooth((448, 448)), "JPEG", quality=90)
    full = to_uint8(decode_image(data, **LIMITS), spec).astype(np.int16)
    drafted = decode_pixels(data, spec, **LIMITS).astype(np.int16)
    assert decode_image(data, **LIMITS, min_size=64).size == (112, 112)  # really drafted (1/4)
    assert np.abs(full - drafted).mean() < 2.0
    assert np.abs(full - drafted).max() < 48  # at the sharp edges only


def test_decode_pixels_keeps_the_error_contract() -> None:
    spec = PreprocessSpec(size=32)
    data = encode(smooth((200, 150)), "JPEG")
    with pytest.raises(BadImage):
        decode_pixels(data[: len(data) // 2], spec, **LIMITS)
    with pytest.raises(BadImage):
        decode_pixels(b"not an image", spec, **LIMITS)
    with pytest.raises(MessageTooLarge):
        decode_pixels(data, spec, max_bytes=len(data) - 1, max_pixels=1_000_000)
    with pytest.raises(BadImage, match="pixel limit"):
        decode_pixels(png_claiming(8_000, 6_000), spec, **LIMITS)


def test_a_picture_larger_than_the_decode_budget_is_refused_before_it_is_decoded() -> None:
    spec = PreprocessSpec(size=32)
    budget = DecodeBudget(max_pixels=10_000)
    with pytest.raises(BadImage, match="decode budget"):
        decode_pixels(encode(smooth((200, 150)), "PNG"), spec, **LIMITS, budget=budget)
    # a JPEG of the same size decodes at 1/4 scale (50 x 38 = 1,900 pixels): within the budget
    assert decode_pixels(encode(smooth((200, 150)), "JPEG"), spec, **LIMITS, budget=budget).shape == (32, 32, 3)
    assert budget.held == 0


def test_the_decode_budget_bounds_the_pixels_held_at_once_across_threads() -> None:
    budget = DecodeBudget(max_pixels=100)
    most = []
    lock = threading.Lock()

    def work(_: int) -> None:
        with budget.hold(40):
            with lock:
                most.append(budget.held)
            time.sleep(0.01)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(32)))
    assert len(most) == 32 and max(most) <= 100 and max(most) == 80  # two at a time, never three
    assert budget.held == 0
