"""The pixels a HookedViT takes: float32 (B, C, H, W) in [0, 1], and the preprocessing that
turns a decoded photo into them.

Every path that feeds stored uint8 images to a model (the mouse's training, extraction,
evaluation) converts them here, so they all see identical pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def to_model_input(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1] on `device`."""
    import torch  # here, not above: decoding processes unpickle a Preprocessing without torch's ~3 s import

    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images shaped (B, H, W, C), got {images.dtype} {images.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class Preprocessing:
    """How decoded RGB pixels become the stored uint8 form a model reads: the shorter side resized
    to `resize` (None: `size`), the centred `size` × `size` crop, and `channels` (3: RGB; 1: the
    ITU-R 601 luminance Pillow computes). `to_model_input` then only divides by 255, so the
    stored images are exactly the model's input and are decoded once per (source, preprocessing)."""

    size: int
    """Side of the square the model takes (its image_size)."""
    resize: int | None = None
    """Shorter side after resizing, before the centre crop; None: `size` (no crop margin)."""
    channels: int = 3
    """1 or 3: the model's input channels."""
    interpolation: str = "bicubic"
    """Pillow resampling filter: bicubic, bilinear, lanczos or nearest."""

    def __post_init__(self) -> None:
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"Preprocessing(size={self.size}, resize={self.resize}): size must be >= 1 and "
                             "resize (the shorter side before the centre crop) >= size, or None")
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocessing.channels={self.channels}: expected 1 (luminance) or 3 (RGB)")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"Preprocessing.interpolation={self.interpolation!r}: expected one of {sorted(_FILTERS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB -> uint8 (size, size, channels)."""
        return self.apply_pil(Image.fromarray(rgb, "RGB"))

    def apply_pil(self, image: Image.Image) -> np.ndarray:
        """`apply` on the same pixels held as a Pillow "RGB" image (no copy into Pillow first)."""
        # the arithmetic of torchvision's Resize(int) and CenterCrop, which timm's and open_clip's
        # eval transforms use: the long side truncated, the crop offset rounded half to even
        short = self.resize or self.size
        w, h = image.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if new != (w, h):
            image = image.resize(new, _FILTERS[self.interpolation])
        left, top = int(round((new[0] - self.size) / 2.0)), int(round((new[1] - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.channels == 1:
            return np.asarray(image.convert("L"))[:, :, None].copy()
        return np.ascontiguousarray(np.asarray(image))


_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
