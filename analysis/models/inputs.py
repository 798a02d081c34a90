"""The pixels a HookedViT takes: float32 (B, C, H, W) in [0, 1].

Every path that feeds stored uint8 images to a model (the mouse's training, extraction,
evaluation) converts them here, so they all see identical pixels.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model_input(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1] on `device`."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images shaped (B, H, W, C), got {images.dtype} {images.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)
