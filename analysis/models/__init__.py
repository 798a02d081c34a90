"""Models: HookedViT and its hooks, activation cache and converters (timm, open_clip), the model
zoo, the CLIP zero-shot head and the mouse ViT trained in the pipeline. Imports no other wing."""
