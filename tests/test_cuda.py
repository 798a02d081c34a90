"""The CUDA paths against the CPU: extraction, training and evaluation on the device agree with
the CPU result at bf16 tolerance. Skipped where no GPU is present (run benchmarks/gpu_check.sh on
a machine that has one)."""

import itertools

import numpy as np
import pytest
import torch

from analysis.activations.extract import extract_shard
from analysis.activations.reader import ActivationStore
from analysis.activations.store import StoreLayout, create_store
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae
from analysis.evaluation.downstream import downstream_metrics
from analysis.evaluation.metrics import reconstruction_metrics
from analysis.models.inputs import to_model_input
from analysis.models.vit import HookedViT, ViTConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: run benchmarks/gpu_check.sh "
                                 "on a machine with a GPU")]

VIT = ViTConfig(image_size=32, patch_size=8, in_chans=3, d_model=64, n_layers=2, n_heads=4, d_mlp=128, n_classes=5)
HOOK = "blocks.1.hook_resid_post"


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _extract(model, images, root, device, compute_dtype=None):
    layout = StoreLayout(n_images=len(images), n_tokens=VIT.n_tokens, d_model=VIT.d_model, images_per_shard=len(images),
                         images_per_chunk=64, dtype="float16")
    create_store(root / "s.zarr", layout, {"test": "cuda"})
    model = model.to(device)

    def capture(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=compute_dtype is not None and device == "cuda"):
            _, cache = model.run_with_cache(x, names_filter=[HOOK])
        return {HOOK: cache[HOOK].float()}

    extract_shard(capture, images, {HOOK: root / "s.zarr"}, 0, batch_size=64, device=device, progress=False)
    return ActivationStore.open(root / "s.zarr").read(0, len(images))


def test_extraction_on_the_device_equals_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = HookedViT(VIT).eval()
    images = _images(256)
    cpu = _extract(model, images, tmp_path / "cpu", "cpu")
    gpu = _extract(model, images, tmp_path / "gpu", "cuda")
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=2e-3)  # fp32 forward (TF32 matmuls allowed), fp16 store
    bf16 = _extract(model, images, tmp_path / "bf16", "cuda", compute_dtype="bfloat16")
    assert (bf16 - cpu).norm() / cpu.norm() < 2e-2  # bf16 autocast: about 3 significant digits


def test_sae_training_on_the_device_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    codes = torch.zeros(40_000, 64).scatter_(1, torch.rand(40_000, 64, generator=g).argsort(1)[:, :2], 1.0)
    data = 3 * codes @ atoms + 1.0
    held_out = data[-4096:]

    def train(device, autocast):
        x = data[:-4096].to(device)
        cfg = SAETrainConfig(width=128, k=4, batch_size=512, n_train_tokens=100_000, lr=3e-3, warmup_steps=10,
                             dead_tokens=20_000, autocast=autocast)
        res = train_sae(itertools.cycle(x.split(512)), 32, cfg, mean_norm=float(x.norm(dim=1).mean()),
                        init_batch=x[:2048], progress=False)
        return reconstruction_metrics(res.dictionary.cpu(), [held_out]).fvu

    cpu = train("cpu", "off")
    assert abs(train("cuda", "off") - cpu) < 0.02 + 0.2 * cpu
    assert abs(train("cuda", "auto") - cpu) < 0.02 + 0.2 * cpu  # auto = bf16 latent selection on CUDA


def test_downstream_metrics_on_the_device_equal_the_cpu():
    from analysis.dictionaries import SAEConfig, TopKSAE

    torch.manual_seed(0)
    model = HookedViT(VIT).eval()
    sae = TopKSAE(SAEConfig(d_in=VIT.d_model, width=256, k=16))
    x = to_model_input(_images(64))
    labels = torch.randint(0, 5, (64,))
    cpu = downstream_metrics(model, sae, HOOK, [(x, labels)])
    gpu = downstream_metrics(model.cuda(), sae.cuda(), HOOK, [(x.cuda(), labels.cuda())])
    for a, b in zip(cpu, gpu):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
