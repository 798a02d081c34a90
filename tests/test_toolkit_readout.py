"""The readout every toolkit analysis projects through: exact against the model's own output."""

import pytest
import torch

from analysis.evaluation.toolkit.readout import Readout, identifiability
from analysis.models.vit import HookedViT, ViTConfig
from toolkit_models import LAYOUTS, SMALL, random_model

@pytest.mark.parametrize("name", LAYOUTS)
def test_stream_readout_is_the_model_and_components_sum_to_logits(name):
    model = random_model(name)
    readout = Readout(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
        final = cache[f"blocks.{readout.cfg.n_layers - 1}.hook_resid_post"]
        torch.testing.assert_close(readout.stream_logits(final), logits)
        frozen = readout.freeze(final)
        parts = readout.linear_logits(cache.decompose_resid(None), frozen)
    assert parts.shape == (len(cache.decompose_resid(None)), 3, readout.n_classes)
    torch.testing.assert_close(parts.sum(0) + frozen.constant, logits, rtol=1e-4, atol=1e-4)


def test_token_readout_of_the_class_token_is_the_output_of_a_clsrandom_model():
    model = random_model("cls_final")
    with torch.no_grad():
        logits, cache = model.run_with_cache(torch.randn(2, 3, 32, 32))
        tokens = Readout(model).token_logits(cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(tokens[:, 0], logits)


def test_a_head_without_classes_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="ZeroShotClassifier"):
        Readout(HookedViT(ViTConfig(**SMALL, n_classes=16, head="proj")))


def test_identifiability_ranks_the_true_class():
    scores = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    torch.testing.assert_close(identifiability(scores, torch.tensor([0, 2, 1])), torch.tensor([1.0, 0.5, 0.0]))
    # random scores: 0.5 in expectation whatever the number of classes
    g = torch.Generator().manual_seed(0)
    for c in (2, 3, 100):
        r = identifiability(torch.randn(20000, c, generator=g), torch.zeros(20000, dtype=torch.long))
        assert abs(float(r.mean()) - 0.5) < 0.01
