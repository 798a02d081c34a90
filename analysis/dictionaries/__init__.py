"""Dictionary models: SAEs of several architectures behind one encode/decode interface.

`load_dictionary(directory)` reads any checkpoint written by `.save` and returns the right class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from analysis.dictionaries.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EncoderOutput,
    SAEOutput,
    SparseAutoencoder,
    read_config,
)
from analysis.dictionaries.config import ARCHITECTURES, SAEConfig
from analysis.dictionaries.models import (
    SAE_CLASSES,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    batch_topk,
    build_sae,
)


def load_dictionary(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load any saved SAE; the class follows the checkpoint's `architecture`."""
    cfg, _ = read_config(directory)
    return SAE_CLASSES[cfg.architecture].load(directory, device=device)


__all__ = [
    "ARCHITECTURES", "CONFIG_FILE", "WEIGHTS_FILE", "BatchTopKSAE", "EncoderOutput", "JumpReLUSAE",
    "ReLUSAE", "SAEConfig", "SAEOutput", "SparseAutoencoder", "TopKSAE", "batch_topk", "build_sae",
    "load_dictionary",
]
