"""Decoding a batch of JPEGs on the model's device (nvJPEG on a GPU), for a GPU worker.

One CPU core decodes about a thousand catalog JPEGs a second; a GPU embeds hundreds of
thousands. :func:`decode_batch` hands a batch's JPEGs to ``torchvision.io.decode_jpeg``
on the worker's device (batched nvJPEG on CUDA) and resizes them there to the model's
input, so the pixels never come back to the host. The rules of
:func:`lookalike.imaging.decode_image` hold: every image's header is checked on the CPU
first (format sniffed, byte and pixel limits); a JPEG the device path cannot take (CMYK,
an EXIF orientation to apply, a decoder failure) and every PNG or WebP goes through
:func:`lookalike.imaging.decode_pixels` instead, which also gives the BadImage reason for
bytes that cannot be decoded at all.

The device path decodes at full size (nvJPEG has no DCT scaling) and resizes with
antialiased bilinear interpolation, which is Pillow's filter; the CPU path decodes JPEGs
at a reduced scale (draft mode). The two agree to a few grey levels and give the same
neighbours (tests/unit/test_device_decode.py, run on the CPU through the same function).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lookalike.errors import BadImage, MessageTooLarge
from lookalike.imaging import (
    BACKGROUND,
    DecodeBudget,
    PreprocessSpec,
    decode_pixels,
    open_image,
    refusing_decoder_errors,
)

log = logging.getLogger(__name__)
EXIF_ORIENTATION = 0x0112
REDUCING_GAP = 2.0  # lookalike.imaging.resize_to_square's
DEVICE_MODES = frozenset({"RGB", "L"})  # YCbCr and greyscale JPEGs; CMYK/YCCK go to Pillow


@dataclass
class DecodedBatch:
    """uint8 (B, S, S, 3) on the device, and per image the reason it was refused (None: decoded).
    A refused image's row is zeros."""

    pixels: torch.Tensor
    errors: list[BadImage | MessageTooLarge | None]

    @property
    def ok(self) -> list[int]:
        return [i for i, err in enumerate(self.errors) if err is None]


def device_resize(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 (3, H, W) or (N, 3, H, W) of one size, on any device -> uint8 (S, S, 3) or
    (N, S, S, 3) as :func:`lookalike.imaging.resize_to_square` makes each."""
    if image.dim() == 3:
        return device_resize(image.unsqueeze(0), spec)[0]
    size = spec.size
    n, _, h, w = image.shape
    if spec.resize == "stretch":
        out_h, out_w = size, size
    else:
        scale = size / max(w, h)
        out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    x = image.float()
    # Pillow's resize with reducing_gap=2 first averages boxes of an integer factor that keeps
    # at least twice the output size, then filters: the same here.
    fy, fx = max(1, int(h / out_h / REDUCING_GAP)), max(1, int(w / out_w / REDUCING_GAP))
    if fy > 1 or fx > 1:
        # the last box of a row or column may be partial (averaged over what it covers), and
        # the filter then maps the reduced picture's first h/fy rows (a fractional box), as Pillow does
        x = torch.nn.functional.avg_pool2d(x, (fy, fx), stride=(fy, fx), ceil_mode=True)
        x = torch.nn.functional.interpolate(x, scale_factor=(out_h * fy / h, out_w * fx / w), mode="bilinear",
                                            antialias=True, align_corners=False, recompute_scale_factor=False)
        x = x[..., :out_h, :out_w]
    elif (out_h, out_w) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                                            align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    if (out_h, out_w) != (size, size):
        canvas = torch.tensor(BACKGROUND, dtype=torch.uint8, device=image.device).view(1, 3, 1, 1)
        canvas = canvas.repeat(n, 1, size, size)
        top, left = (size - out_h) // 2, (size - out_w) // 2
        canvas[:, :, top:top + out_h, left:left + out_w] = x
        x = canvas
    return x.permute(0, 2, 3, 1).contiguous()


def _device_candidate(data: bytes, max_bytes: int, max_pixels: int) -> int:
    """The decoded pixel count of a JPEG the device path can take; 0 for one it should leave to
    Pillow. Raises BadImage / MessageTooLarge for bytes the rules refuse from the header."""
    with refusing_decoder_errors():
        img = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
        if img.format != "JPEG" or img.mode not in DEVICE_MODES:
            return 0
        if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
            return 0  # nvJPEG does not apply EXIF orientation
        return img.width * img.height


def decode_batch(images: Sequence[bytes], spec: PreprocessSpec, device: torch.device | str, *, max_bytes: int,
                 max_pixels: int, budget: DecodeBudget | None = None) -> DecodedBatch:
    """JPEG/PNG/WebP bytes -> the model's uint8 inputs on ``device``, JPEGs decoded there.

    ``budget`` bounds the pixels decoded at once on the device (the JPEGs go to the decoder
    in groups that fit; one larger than the budget is refused, as on the CPU path) and the
    CPU fallback's pixels. On ``cpu`` this runs torchvision's CPU decoder: the same code
    path, testable without a GPU.
    """
    device = torch.device(device)
    size = spec.size
    out = torch.zeros((len(images), size, size, 3), dtype=torch.uint8, device=device)
    errors: list[BadImage | MessageTooLarge | None] = [None] * len(images)
    on_device: list[tuple[int, int]] = []  # (index, decoded pixels)
    on_host: list[int] = []
    for i, data in enumerate(images):
        try:
            pixels = _device_candidate(data, max_bytes, max_pixels)
        except (BadImage, MessageTooLarge) as exc:
            errors[i] = exc
            continue
        if pixels and budget is not None and pixels > budget.max_pixels:
            errors[i] = BadImage(f"image decodes to {pixels} pixels, over the decode budget of {budget.max_pixels}")
        elif pixels:
            on_device.append((i, pixels))
        else:
            on_host.append(i)
    for group in _groups(on_device, budget.max_pixels if budget is not None else None):
        on_host.extend(_decode_group(images, group, spec, device, out))
    for i in on_host:
        try:
            pixels = decode_pixels(images[i], spec, max_bytes=max_bytes, max_pixels=max_pixels, budget=budget)
            out[i] = torch.tensor(pixels, device=device)  # a copy: Pillow's array is read-only
        except (BadImage, MessageTooLarge) as exc:
            errors[i] = exc
    return DecodedBatch(out, errors)


def _groups(items: list[tuple[int, int]], max_pixels: int | None) -> list[list[int]]:
    """Consecutive groups of image indices whose decoded pixels add up to at most ``max_pixels``."""
    groups: list[list[int]] = []
    held = 0
    for i, pixels in items:
        if not groups or (max_pixels is not None and held + pixels > max_pixels):
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += pixels
    return groups


def _decode_group(images: Sequence[bytes], group: list[int], spec: PreprocessSpec, device: torch.device,
                  out: torch.Tensor) -> list[int]:
    """Decode ``group`` on the device into ``out``; -> the indices left to the CPU path (all of
    them when the batched decoder fails: it returns nothing for a batch with one bad image)."""
    from torchvision.io import ImageReadMode, decode_jpeg  # only the GPU worker and its tests need torchvision

    raw = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in group]
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError) as exc:
        log.info("device decode of %d JPEGs failed (%s); they go through Pillow", len(group), exc)
        return list(group)
    by_size: dict[tuple[int, ...], list[int]] = {}  # a catalog's photos often share a size: one resize call each
    for j, image in enumerate(decoded):
        by_size.setdefault(tuple(image.shape), []).append(j)
    for same in by_size.values():
        resized = device_resize(torch.stack([decoded[j] for j in same]), spec)
        out[torch.tensor([group[j] for j in same], device=out.device)] = resized
    return []
