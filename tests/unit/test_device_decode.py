"""The GPU worker's batched decode (lookalike/device_decode.py), run on the CPU through the
same function (torchvision's CPU decoder in nvJPEG's place): the same rules as Pillow's
path, and pixels within a grey level or two of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.device_decode import _groups, decode_batch, device_resize
from lookalike.errors import BadImage, MessageTooLarge
from lookalike.imaging import DecodeBudget, PreprocessSpec, decode_image, decode_pixels, to_uint8

LIMITS = {"max_bytes": 8 * 1024 * 1024, "max_pixels": 40_000_000}
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def picture(size: tuple[int, int], seed: int = 0) -> Image.Image:
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    phase = np.random.default_rng(seed).uniform(0, 1, 3)
    arr = np.stack([(np.sin(6 * x + phase[0]) + 1) * 120, y * 255, ((x + y + phase[2]) % 0.5 > 0.25) * 200 + 30], -1)
    return Image.fromarray(arr.astype(np.uint8))


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def full_decode(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Pillow at full size, then the resize: what the device path computes."""
    return to_uint8(decode_image(data, **LIMITS), spec)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_device_jpegs_match_pillow_at_full_size_to_a_grey_level(resize: str) -> None:
    spec = PreprocessSpec(size=64, resize=resize)  # type: ignore[arg-type]
    sizes = [(224, 224), (300, 400), (97, 61), (1200, 1600)]  # as is, box-reduced by (2, 3), enlarged, by (9, 12)
    images = [encode(picture(size, i), "JPEG", quality=90) for i, size in enumerate(sizes)]
    batch = decode_batch(images, spec, "cpu", **LIMITS)
    assert batch.errors == [None] * 4 and batch.pixels.shape == (4, 64, 64, 3)
    assert batch.pixels.dtype == torch.uint8
    for row, data in zip(batch.pixels.numpy(), images, strict=True):
        diff = np.abs(row.astype(np.int16) - full_decode(data, spec))
        assert diff.max() <= 1 and diff.mean() < 0.25


def test_what_the_device_cannot_take_goes_through_pillow_with_the_same_rules() -> None:
    spec = PreprocessSpec(size=32)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(picture((120, 80)), "JPEG", exif=exif)
    png = encode(picture((90, 70)).convert("RGBA"), "PNG")
    cmyk = encode(picture((80, 80)).convert("CMYK"), "JPEG")
    good = encode(picture((100, 100), 3), "JPEG")
    batch = decode_batch([rotated, png, cmyk, good], spec, "cpu", **LIMITS)
    assert batch.errors == [None] * 4
    for i, data in enumerate([rotated, png, cmyk]):  # exactly Pillow's path, orientation applied
        assert np.array_equal(batch.pixels[i].numpy(), decode_pixels(data, spec, **LIMITS))


def test_refused_images_get_their_reason_and_the_rest_of_the_batch_is_decoded() -> None:
    spec = PreprocessSpec(size=32)
    good = encode(picture((100, 100)), "JPEG")
    truncated = good[: len(good) // 2]
    bomb = encode(Image.new("L", (8_000, 6_000)), "PNG")
    batch = decode_batch([good, b"not an image", truncated, bomb, good], spec, "cpu", max_bytes=8 * 1024 * 1024,
                         max_pixels=40_000_000)
    assert batch.ok == [0, 4]
    assert all(isinstance(batch.errors[i], BadImage) for i in (1, 2, 3))
    assert "pixel limit" in str(batch.errors[3])
    assert np.array_equal(batch.pixels[0].numpy(), batch.pixels[4].numpy())
    assert not batch.pixels[1].any()  # a refused row stays zeros
    too_big = decode_batch([good], spec, "cpu", max_bytes=len(good) - 1, max_pixels=1_000_000)
    assert isinstance(too_big.errors[0], MessageTooLarge)


def test_the_decode_budget_splits_the_device_batch_and_refuses_what_never_fits() -> None:
    assert _groups([(0, 40), (1, 40), (2, 40), (3, 100)], 100) == [[0, 1], [2], [3]]
    assert _groups([(0, 40), (1, 40)], None) == [[0, 1]]
    spec = PreprocessSpec(size=32)
    small, large = encode(picture((100, 100)), "JPEG"), encode(picture((400, 300)), "JPEG")
    batch = decode_batch([small, large, small], spec, "cpu", **LIMITS, budget=DecodeBudget(50_000))
    assert batch.ok == [0, 2] and "decode budget" in str(batch.errors[1])


def test_device_resize_pads_like_pillow() -> None:
    spec = PreprocessSpec(size=32, resize="pad")
    img = picture((64, 32))
    arr = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    mine = device_resize(arr, spec).numpy().astype(np.int16)
    pillow = to_uint8(img, spec).astype(np.int16)
    assert mine.shape == (32, 32, 3)
    assert (mine[:8] == 255).all() and (mine[-8:] == 255).all()  # the background bands
    assert np.abs(mine - pillow).max() <= 2


def test_the_worker_embeds_a_catalog_batch_decoded_on_the_device_like_one_decoded_by_pillow() -> None:
    """The GPU worker's branch of catalog_batch, forced on the CPU (catalog_decode="device")."""
    from lookalike.artifacts import ModelCard
    from lookalike.embedder import Embedder
    from lookalike.model import EmbeddingNet, ModelSpec
    from lookalike.settings import WorkerSettings
    from workers.app import EmbeddingWorker, ModelSet
    from workers.stages import Source

    torch.manual_seed(0)
    spec = ModelSpec(input_size=32, channels=(8, 16), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    embedder = Embedder(EmbeddingNet(spec), card, torch.device("cpu"))
    events = [(b"%d" % i, encode(picture((96, 128), i), "JPEG", quality=90), {}, Source("catalog", i % 2, i))
              for i in range(6)]
    events.insert(3, (b"bad", b"garbage", {}, Source("catalog", 1, 99)))
    events.append((b"gone", None, {}, Source("catalog", 0, 100)))
    vectors = {}
    for how in ("device", "pillow"):
        settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9", catalog_decode=how)
        out, dead = EmbeddingWorker(settings, ModelSet(settings, embedder)).catalog_batch(events, "test-v1")
        assert len(dead) == 1 and dict(dead[0][2])["error-code"] == b"bad_image"
        assert [key for _, (key, _, _) in out] == [b"0", b"1", b"2", b"3", b"4", b"5", b"gone"]  # catalog order
        assert [partition for partition, _ in out] == [0, 1, 0, 1, 0, 1, 0]
        vectors[how] = np.stack([np.frombuffer(value, np.float32) for _, (_, value, _) in out[:-1]])
    # Pillow drafts these JPEGs (1/2 scale: 48 x 64), the device decodes them whole: close, not equal
    assert np.min(np.sum(vectors["device"] * vectors["pillow"], axis=1)) > 0.999
