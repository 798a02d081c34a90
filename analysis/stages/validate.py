"""Check a whole suite before any work starts: every name and every override is tried here."""

from __future__ import annotations

from analysis.stages.activations import check_hooks, store_layout
from analysis.stages.dictionaries import member_train_config
from analysis.models.zoo import check_timm_weights, hub_reachable
from analysis.stages.model import vit_config
from analysis.stages.suite import SuiteSpec


def validate_suite(spec: SuiteSpec) -> None:
    """Raise ValueError/TypeError naming the bad value; returns None when the suite can run."""
    vit = vit_config(spec)  # builds the dataset and model configs, checking every override key
    if spec.model.kind == "timm" and spec.model.weights == "pretrained" and not hub_reachable():
        raise ValueError(f"model.weights: pretrained needs the hub, which is unreachable (offline or HF_HUB_OFFLINE=1): "
                         f"set model.weights to a local .safetensors/.pt/.pth file of timm:{spec.model.name}")
    if spec.model.kind == "timm" and spec.model.weights not in ("random", "pretrained"):
        check_timm_weights(spec.model.name, spec.model.weights, **spec.model.kwargs)
    check_hooks(spec)
    store_layout(spec)
    for member in spec.members():
        member_train_config(spec, member, vit.d_model)  # names an unknown key, checks k <= width
