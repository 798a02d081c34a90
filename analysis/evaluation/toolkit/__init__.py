"""The classic interpretability toolkit on a HookedViT classifier (a linear head, or a CLIP tower
with a zero-shot head): the class-embedding lens, direct logit attribution, attention views,
activation patching, and the perturbation analyses of Vilas et al. (NeurIPS 2023).

Every analysis reads classes through `readout.Readout`, the one description of how the model
turns its residual stream into class scores."""
