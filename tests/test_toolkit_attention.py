"""Attention views: the patterns against a recomputation from q and k, the per-head summaries against
naive loops and hand-built patterns with known answers, the PNG grid read back, and the HTML page
opened in headless Chromium (driven through its URL hash, its canvas state read from the DOM dump)."""

import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.evaluation.toolkit.attention import (attention_distance, attention_grid_png, attention_html,
                                                   attention_patterns, attention_to_cls)
from analysis.models.clip_zero_shot import ZeroShotClassifier
from analysis.models.inputs import to_model_input
from analysis.models.vit import ViTConfig
from toolkit_models import LAYOUTS, random_model, trained_mouse

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = ("headless Chromium is not installed here (no `chromium` on PATH) and this test does not install "
               "system packages: install Debian's package with `sudo apt-get install -y --no-install-recommends "
               "chromium` (.ci/run does this before `make test`)")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def mouse():
    """(model, images, patterns of the first 4 images)."""
    model, data = trained_mouse()
    images = data.images[:4]
    return model, images, attention_patterns(model, to_model_input(images))


def _cfg(model):
    return (model.tower if isinstance(model, ZeroShotClassifier) else model).cfg


@pytest.mark.parametrize("name", LAYOUTS)
def test_patterns_are_the_softmax_of_cached_queries_and_keys(name):
    model, cfg = random_model(name), _cfg(random_model(name))
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    patterns = attention_patterns(model, x, batch_size=2)  # three batches, one partial
    assert patterns.shape == (cfg.n_layers, 5, cfg.n_heads, cfg.n_tokens, cfg.n_tokens)
    assert patterns.dtype == torch.float32 and patterns.device.type == "cpu" and not patterns.requires_grad
    torch.testing.assert_close(patterns.sum(-1), torch.ones(patterns.shape[:-1]))
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("attn.hook_q", "attn.hook_k")))
    for i in range(cfg.n_layers):
        q, k = cache[f"blocks.{i}.attn.hook_q"], cache[f"blocks.{i}.attn.hook_k"]  # (B, T, H, dh)
        naive = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.d_head)).softmax(-1)
        torch.testing.assert_close(patterns[i], naive)
    torch.testing.assert_close(attention_patterns(model, x, layers=[1]), patterns[1:])


def _naive_summaries(patterns: torch.Tensor, cfg: ViTConfig):
    """Loops over every layer, head, image and patch query; distances between patch centres in pixels."""
    p, n0, g, ps = patterns.tolist(), cfg.n_prefix, cfg.grid_size, cfg.patch_size
    centre = [((i // g + 0.5) * ps, (i % g + 0.5) * ps) for i in range(g * g)]
    L, B, H = patterns.shape[:3]
    to_cls, dist = np.zeros((L, H)), np.zeros((L, H))
    for l in range(L):  # noqa: E741
        for h in range(H):
            cls_terms, dist_terms = [], []
            for b in range(B):
                for q in range(g * g):
                    row = p[l][b][h][n0 + q]
                    cls_terms.append(row[0])
                    mass = sum(row[n0:])
                    dist_terms.append(sum(row[n0 + k] / mass * math.dist(centre[q], centre[k]) for k in range(g * g)))
            to_cls[l, h], dist[l, h] = np.mean(cls_terms), np.mean(dist_terms)
    return torch.tensor(to_cls, dtype=torch.float32), torch.tensor(dist, dtype=torch.float32)


@pytest.mark.parametrize("name", ["cls_final", "mean_final_registers"])
def test_summaries_match_a_naive_loop(name):
    model = random_model(name)
    patterns = attention_patterns(model, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    to_cls, dist = _naive_summaries(patterns, model.cfg)
    torch.testing.assert_close(attention_to_cls(patterns, model.cfg), to_cls)
    torch.testing.assert_close(attention_distance(patterns, model.cfg), dist)
    torch.testing.assert_close(attention_distance(patterns, model.cfg, pixels=False), dist / model.cfg.patch_size)


def test_summaries_of_hand_built_patterns():
    # 2x2 patches of 8 px behind a class token and one register: T = 6
    cfg = ViTConfig(image_size=16, patch_size=8, in_chans=1, d_model=9, n_layers=1, n_heads=3, n_registers=1)
    uniform = torch.full((6, 6), 1 / 6)
    self_only = torch.eye(6)
    on_cls = torch.zeros(6, 6)
    on_cls[:, 0] = 1.0
    quarter = torch.full((6, 6), 0.75 / 5)
    quarter[:, 0] = 0.25
    # heads: uniform, on self, on the class token in image 0 (no patch mass: no distance) then uniform
    patterns = torch.stack([torch.stack([uniform, self_only, on_cls]), torch.stack([uniform, self_only, uniform])])
    patterns = patterns[None]  # (L=1, B=2, H=3, T, T)
    # uniform over patches: from any patch, distances 0, 1, 1, √2 patch steps
    mean_pairwise = (2 + math.sqrt(2)) / 4
    torch.testing.assert_close(attention_distance(patterns, cfg, pixels=False),
                               torch.tensor([[mean_pairwise, 0.0, mean_pairwise]]))
    torch.testing.assert_close(attention_distance(patterns, cfg),  # in pixels: 8 px per patch step
                               torch.tensor([[8 * mean_pairwise, 0.0, 8 * mean_pairwise]]))
    torch.testing.assert_close(attention_to_cls(patterns, cfg), torch.tensor([[1 / 6, 0.0, (1 + 1 / 6) / 2]]))
    torch.testing.assert_close(attention_to_cls(quarter.expand(1, 1, 3, 6, 6), cfg), torch.full((1, 3), 0.25))


def _cyan_pixels(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb[..., 0] < 100) & (rgb[..., 1] > 180) & (rgb[..., 2] > 180)).sum())


def test_png_grid_has_a_cell_per_layer_and_head(mouse, tmp_path):
    model, images, patterns = mouse
    cfg = model.cfg
    assert images.shape[-1] == 1  # grayscale
    for query in ("cls", 5):
        path = attention_grid_png(images[0], patterns[:, 0], cfg, query, tmp_path / f"grid_{query}.png", cell_px=120)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (cfg.n_heads * 120, cfg.n_layers * 120 + 44)
            assert np.asarray(im.convert("L")).std() > 10
        assert (_cyan_pixels(path) > 0) == (query == 5), "the query patch, and only a patch, is outlined"
    # an RGB model, and a subset of layers: one row
    rgb = random_model("mean_final_registers")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one = attention_patterns(rgb, to_model_input(image[None]), layers=[1])[:, 0]
    with Image.open(attention_grid_png(image, one, rgb.cfg, 15, tmp_path / "rgb.png", layers=[1])) as im:
        assert im.size == (4 * 160, 160 + 44)


class Rendered:
    """The page after Chromium ran its script: the DOM dump, the canvas's data attributes, console lines."""

    def __init__(self, page, fragment: str = ""):
        proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                               "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                               page.as_uri() + fragment],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.dom = proc.stdout
        console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
        errors = re.search(r'<pre id="errors">(.*?)</pre>', self.dom, re.S).group(1)
        assert errors == "" and not console, (errors, console)
        tag = re.search(r"<canvas [^>]*>", self.dom).group(0)
        self.canvas = dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag))


@needs_chromium
def test_html_page_renders_the_view_named_in_its_hash(mouse, tmp_path):
    model, images, patterns = mouse
    cfg, one = model.cfg, patterns[:, 0]
    page = attention_html(images[0], one, cfg, tmp_path / "mouse.html", title="mouse <shapes>")
    assert "mouse &lt;shapes&gt;" in page.read_text()
    rounded = np.round(one.numpy().astype(np.float64), 4)[..., cfg.n_prefix:]  # what the page embeds, patch keys
    shown = Rendered(page, "#layer=1&head=0&query=5").canvas
    row = rounded[1, 0, cfg.n_prefix + 5]
    assert shown == {"layer": "1", "head": "0", "query": "5", "max": f"{row.max():.4f}", "peak": str(row.argmax()),
                     "image": "1", "checksum": shown["checksum"]}
    assert int(shown["checksum"]) > 0
    # the mean over heads for the class token, over a black image: every visible pixel is the overlay
    black = attention_html(np.zeros_like(images[0]), one, cfg, tmp_path / "black.html")
    shown = Rendered(black, "#layer=0&head=mean&query=cls").canvas
    mean = rounded[0, :, 0].mean(0)
    assert (shown["layer"], shown["head"], shown["query"], shown["image"]) == ("0", "mean", "cls", "1")
    assert abs(float(shown["max"]) - mean.max()) <= 1e-4 and int(shown["peak"]) == mean.argmax()
    assert int(shown["checksum"]) > 0


@needs_chromium
def test_html_page_without_a_class_token_defaults_to_a_patch(tmp_path):
    model = random_model("mean_fc_norm")
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one = attention_patterns(model, to_model_input(image[None]), layers=[1])[:, 0]
    page = attention_html(image, one, model.cfg, tmp_path / "nocls.html", layers=[1])
    shown = Rendered(page, "#query=cls&head=9").canvas  # neither exists here: the defaults stand
    assert (shown["layer"], shown["head"], shown["query"], shown["image"]) == ("1", "mean", "8", "1")


def test_bad_inputs_name_the_value_and_the_fix(mouse, tmp_path):
    model, images, patterns = mouse
    cfg, one = model.cfg, patterns[:, 0]
    x = to_model_input(images)
    with pytest.raises(ValueError, match=r"layers=\[2\].*2 blocks.*0\.\.1"):
        attention_patterns(model, x, layers=[2])
    with pytest.raises(ValueError, match="to_model_input"):
        attention_patterns(model, images)
    with pytest.raises(ValueError, match=r"expected float \(B, 1, 64, 64\)"):
        attention_patterns(model, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="batch_size=0"):
        attention_patterns(model, x, batch_size=0)
    with pytest.raises(ValueError, match=r"expected \(L, B, H, T, T\) with H=2 heads and T=17 tokens"):
        attention_distance(one, cfg)
    with pytest.raises(ValueError, match=r"pass patterns\[:, i\]"):
        attention_grid_png(images[0], patterns, cfg, "cls", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"query=16: expected 'cls' or a patch index 0\.\.15"):
        attention_grid_png(images[0], one, cfg, 16, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"uint8 \(64, 64, C\)"):
        attention_html(images[0, :32], one, cfg, tmp_path / "x.html")
    with pytest.raises(ValueError, match=r"layers=\[0\] names 1 blocks but the patterns hold 2"):
        attention_html(images[0], one, cfg, tmp_path / "x.html", layers=[0])
    no_cls = random_model("mean_fc_norm")
    p = attention_patterns(no_cls, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no class token"):
        attention_to_cls(p, no_cls.cfg)
    with pytest.raises(ValueError, match="query='cls' but this model has no class token"):
        attention_grid_png(np.zeros((32, 32, 3), np.uint8), p[:, 0], no_cls.cfg, "cls", tmp_path / "x.png")
    assert not list(tmp_path.iterdir()), "nothing written for a refused call"
