"""Compatibility home of the SAE classes; the implementation lives in `analysis.dictionaries`."""

from analysis.dictionaries import (  # noqa: F401
    CONFIG_FILE,
    WEIGHTS_FILE,
    BatchTopKSAE,
    EncoderOutput,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    TopKSAE,
    build_sae,
    load_dictionary,
)
