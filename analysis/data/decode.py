"""Decode the bytes of one image file into the uint8 (H, W, 3) RGB pixels every model path uses.

Image folders and Parquet columns hold whatever people saved: palette GIFs, 16-bit PNGs, CMYK
JPEGs, photos stored sideways with an EXIF orientation tag, transparent logos, cut-off downloads.
`decode_image` maps all of them onto one pixel convention, or raises `ImageRejected` with a short,
stable `.reason` that a dataset builder can count and report. No Pillow exception escapes, and no
file is silently half-decoded.

The conventions, where a plain `Image.open(f).convert("RGB")` is wrong or leaves a choice open:
- EXIF orientation is applied: the pixels are the upright picture any viewer shows.
- Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF) give their first frame.
- Transparency (alpha channel, palette alpha, tRNS colour key) is composited over white.
  `convert("RGB")` drops alpha and exposes whatever colour the encoder left under transparent
  pixels, usually black, so two files that look identical would reach the model as different
  pixels, decided by an invisible channel. White is the background viewers and web pages show.
- Integer samples wider than 8 bits ("I;16*", "I") are scaled by their bit depth: a 16-bit PNG's
  0..65535 becomes 0..255 by `>> 8`, as Pillow already does for 16-bit RGB PNGs. `convert` would
  clip them at 255 and turn almost every 16-bit image white. The depth is the TIFF BitsPerSample
  tag where there is one (so 12-bit TIFFs use `>> 4`), else 16: Pillow uses "I" as the container
  for 16-bit samples (PGM/PPM). Signed samples keep their non-negative half; negatives are black.
- Float samples ("F", e.g. float TIFFs) have no standard range. They go through Pillow's own
  F -> L conversion: read as 0..255, clipped, fraction truncated, NaN -> 0. Guessing the range
  from the data (0..1 or 0..255) would make a pixel depend on the rest of the image.
- CMYK, YCbCr and HSV use Pillow's standard `convert("RGB")`. Pillow's JPEG reader already
  assumes the Adobe (inverted) CMYK convention that nearly all CMYK JPEGs follow; the conversion
  ignores ink profiles, like every other loader.
- Embedded ICC profiles are ignored, as torchvision, timm and `datasets` loaders ignore them, so
  the pixels match those the pretrained models were trained on.

Truncation is detected because Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` is False by default;
this module never sets it. A process that sets it True gets cut-off files grey-filled, not rejected.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_CONVERTIBLE_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBX", "RGBA", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "HSV", "F"}
)
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _SIGNED_INT = 258, 339, 2


class ImageRejected(ValueError):
    """The bytes are not a usable image; `.reason` is a short, stable, human-readable reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) C-contiguous, writeable RGB pixels of one encoded image, upright, first frame.

    Raises `ImageRejected` ("empty file", "not an image", "too large: ...", "truncated or
    corrupt: ...", "unsupported mode: ...") instead of any Pillow exception."""
    return np.array(decode_pil(data))


def decode_pil(data: bytes) -> Image.Image:
    """`decode_image`'s pixels as a Pillow "RGB" image, for code that resizes next (ingestion):
    plain files skip the two copies a detour through numpy costs (Pillow keeps RGB as 4 bytes a
    pixel, so every conversion copies; see benchmarks/README.md, "From a folder of JPEGs")."""
    if len(data) == 0:
        raise ImageRejected("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: truncation and corruption surface here, not later
            bits = _integer_bits(image)
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    except UnidentifiedImageError as e:
        raise ImageRejected("not an image") from e
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"too large: {e}") from e
    except Exception as e:
        # Only Pillow runs in the block above, and its plugins raise many types on bad data
        # (OSError, SyntaxError, EOFError, struct.error, IndexError...): all mean a bad file.
        raise ImageRejected(f"truncated or corrupt: {str(e) or type(e).__name__}") from e
    if image.mode in _INTEGER_MODES:
        assert bits is not None
        return _rgb_image(_gray_to_rgb(_scale_integers(np.asarray(image), bits)))
    if image.mode == "F":
        return _rgb_image(_gray_to_rgb(np.asarray(image.convert("L"))))
    if image.mode not in _CONVERTIBLE_MODES:
        raise ImageRejected(f"unsupported mode: {image.mode}")
    if image.has_transparency_data:
        return _rgb_image(_over_white(np.asarray(image.convert("RGBA"))))
    return image if image.mode == "RGB" else image.convert("RGB")


def _rgb_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")


def _integer_bits(image: Image.Image) -> int | None:
    """Bits of magnitude per sample of a wide-integer image (sign bit excluded); None otherwise."""
    if image.mode not in _INTEGER_MODES:
        return None
    tags = getattr(image, "tag_v2", {})  # only TIFF images carry these tags
    bits = _first(tags.get(_TIFF_BITS_PER_SAMPLE, 16))
    signed = _first(tags.get(_TIFF_SAMPLE_FORMAT, 1)) == _SIGNED_INT
    return max(8, int(bits) - int(signed))


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _scale_integers(samples: np.ndarray, bits: int) -> np.ndarray:
    wide = np.clip(samples.astype(np.int64), 0, (1 << bits) - 1)
    return (wide >> (bits - 8)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA over white, rounding to the nearest level."""
    rgb, alpha = rgba[:, :, :3].astype(np.uint32), rgba[:, :, 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
