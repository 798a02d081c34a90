"""Dictionary models: SAEs of several architectures behind one encode/decode interface, TopK
transcoders (hook A -> hook B) and acausal crosscoders (several hooks at once).

`load_dictionary(directory)` reads any checkpoint written by `.save` and returns the right class:
the config's "dictionary" key picks the family ("sae" when the key is absent) and an
SAE's "architecture" picks its class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from analysis.dictionaries.base import (
    CONFIG_FILE,
    DICTIONARY_KEY,
    WEIGHTS_FILE,
    EncoderOutput,
    SAEOutput,
    SparseAutoencoder,
    read_config,
)
from analysis.dictionaries.config import ARCHITECTURES, SAEConfig
from analysis.dictionaries.crosscoder import (
    CROSSCODER_ARCHITECTURES,
    Crosscoder,
    CrosscoderConfig,
    CrosscoderOutput,
)
from analysis.dictionaries.models import (
    SAE_CLASSES,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    batch_topk,
    build_sae,
)
from analysis.dictionaries.transcoder import TopKTranscoder, TranscoderConfig

# "dictionary" key of config.json -> class whose .load reads that family (SAEs: by architecture)
DICTIONARY_CLASSES: dict[str, type[nn.Module]] = {"transcoder": TopKTranscoder, "crosscoder": Crosscoder}


def load_dictionary(directory: str | Path,
                    device: str | torch.device = "cpu") -> SparseAutoencoder | TopKTranscoder | Crosscoder:
    """Load any saved dictionary; the class follows the checkpoint's family and architecture."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no dictionary checkpoint at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    kind = json.loads(path.read_text()).get(DICTIONARY_KEY, "sae")
    if kind in DICTIONARY_CLASSES:
        return DICTIONARY_CLASSES[kind].load(directory, device=device)
    if kind != "sae":
        raise ValueError(
            f"{directory} holds a {kind!r} dictionary, which no loader reads: expected one of "
            f"{['sae', *DICTIONARY_CLASSES]}")
    cfg, _ = read_config(directory)
    return SAE_CLASSES[cfg.architecture].load(directory, device=device)


__all__ = [
    "ARCHITECTURES", "CONFIG_FILE", "CROSSCODER_ARCHITECTURES", "DICTIONARY_CLASSES", "WEIGHTS_FILE",
    "BatchTopKSAE", "Crosscoder", "CrosscoderConfig", "CrosscoderOutput", "EncoderOutput", "JumpReLUSAE",
    "ReLUSAE", "SAEConfig", "SAEOutput", "SparseAutoencoder", "TopKSAE", "TopKTranscoder",
    "TranscoderConfig", "batch_topk", "build_sae", "load_dictionary",
]
