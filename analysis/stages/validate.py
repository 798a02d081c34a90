"""Check a whole suite before any work starts: every name and every override is tried here."""

from __future__ import annotations

from analysis.stages.activations import check_hooks, check_store_size
from analysis.stages.dictionaries import member_train_config
from analysis.models.zoo import check_weights, hub_reachable
from analysis.stages.model import vit_config
from analysis.stages.suite import SuiteSpec


def validate_suite(spec: SuiteSpec) -> None:
    """Raise ValueError/TypeError naming the bad value; returns None when the suite can run."""
    vit = vit_config(spec)  # builds the dataset and model configs, checking every override key
    weights = None if spec.model.kind == "mouse" else spec.model.weights_source()
    if weights == "hub" and not hub_reachable():
        raise ValueError(f"model.weights: {spec.model.weights} needs the hub, which is unreachable (offline or "
                         f"HF_HUB_OFFLINE=1): set model.weights to a local .safetensors/.pt/.pth file of "
                         f"{spec.model.kind}:{spec.model.name}")
    if weights == "file":
        check_weights(spec.model.kind, spec.model.name, spec.model.weights, **spec.model.kwargs)
    check_hooks(spec)
    check_store_size(spec)  # also checks the shard and chunk sizes
    for member in spec.members():
        member_train_config(spec, member, vit.d_model)  # names an unknown key, checks k <= width
