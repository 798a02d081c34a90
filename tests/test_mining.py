"""mine_features against a brute-force dense computation over the whole (small) set."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from analysis.evaluation.mining import SPARSE_FOLD_DENSE_ARRAYS, mine_features
from analysis.evaluation.mining_counts import histogram_edges
from analysis.dictionaries import SAEConfig, TopKSAE

N_IMG, T, D, WIDTH, K = 50, 5, 8, 24, 3


class DenseOnly(torch.nn.Module):
    """The same TopK code offered only as dense latents: the path threshold architectures take."""

    def __init__(self, sae):
        super().__init__()
        self.sae, self.cfg = sae, sae.cfg

    def dense_latents(self, x):
        return self.sae.dense_latents(x)


@pytest.fixture(scope="module", params=["topk codes", "dense latents"])
def setup(request):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=D, width=WIDTH, k=K))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_enc[-3:] = -100.0  # the last three features can never fire
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(N_IMG, T, D, generator=g)
    image_idx = np.arange(1000, 1000 + N_IMG, dtype=np.int64)
    return (sae if request.param == "topk codes" else DenseOnly(sae)), acts, image_idx


def _batches(acts, image_idx, sizes):
    out, s = [], 0
    for n in sizes:
        out.append((image_idx[s : s + n], acts[s : s + n].numpy()))
        s += n
    return out


def _brute_force(sae, acts, image_idx, n_top):
    with torch.no_grad():
        lat = sae.dense_latents(acts.reshape(-1, D)).reshape(N_IMG, T, WIDTH).numpy()
    per_image = lat.max(1)  # (N, width)
    rows = []
    for f in range(WIDTH):
        order = sorted(range(N_IMG), key=lambda i: (-per_image[i, f], image_idx[i]))
        order = [i for i in order if per_image[i, f] > 0][:n_top]
        for rank, i in enumerate(order):
            rows.append((f, rank, int(image_idx[i]), float(per_image[i, f]), int(lat[i, :, f].argmax()), lat[i, :, f]))
    return lat, rows


# chunk FOLD_15: TopK codes are folded 15 images at a time, so a fold spans two batches (7 + 13)
FOLD_15 = 15 * SPARSE_FOLD_DENSE_ARRAYS * WIDTH


@pytest.mark.parametrize("sizes, chunk", [([50], 1 << 24), ([7, 13, 30], 1 << 24), ([20, 30], 2 * T * WIDTH),
                                          ([7, 13, 30], FOLD_15)])
def test_top_images_match_brute_force(setup, sizes, chunk):
    sae, acts, image_idx = setup
    n_top = 4
    res = mine_features(sae, _batches(acts, image_idx, sizes), n_top=n_top, max_latent_elements=chunk)
    lat, rows = _brute_force(sae, acts, image_idx, n_top)
    t = res.top_images.to_pydict()
    assert res.top_images.schema.types == [pa.int32(), pa.int16(), pa.int64(), pa.float32(), pa.int32(), pa.float32()]
    got = list(zip(t["feature"], t["rank"], t["image_idx"], t["activation"], t["token"]))
    assert [g[:3] for g in got] == [r[:3] for r in rows]
    np.testing.assert_allclose([g[3] for g in got], [r[3] for r in rows], rtol=1e-6)
    assert [g[4] for g in got] == [r[4] for r in rows]
    # heatmaps hold the per-token activations of exactly those images
    assert res.heatmaps.shape == (WIDTH, n_top, T) and res.heatmaps.dtype == np.float16
    for f, rank, _, _, _, heat in rows:
        np.testing.assert_allclose(res.heatmaps[f, rank], heat.astype(np.float16), rtol=1e-3)
    # features that never fire get no rows and empty heatmaps
    assert not set(t["feature"]) & {WIDTH - 3, WIDTH - 2, WIDTH - 1}
    assert not res.heatmaps[WIDTH - 3 :].any()

    stats = res.feature_stats.to_pydict()
    fired = lat > 0
    per_image_max = lat.max(1)
    np.testing.assert_array_equal(stats["fire_count"], fired.sum((0, 1)))
    np.testing.assert_allclose(stats["frequency"], fired.mean((0, 1)))
    np.testing.assert_allclose(stats["max_activation"], lat.max((0, 1)), rtol=1e-6)
    # the histogram counts each firing image's max activation in its log2 bin
    edges = histogram_edges()
    for f in range(WIDTH):
        maxima = per_image_max[:, f][per_image_max[:, f] > 0]
        bins = np.clip(np.searchsorted(edges, maxima, side="right") - 1, 0, len(edges) - 2)
        assert stats["activation_histogram"][f] == np.bincount(bins, minlength=len(edges) - 1).tolist()
    expected_mean = [lat[..., f][fired[..., f]].mean() if fired[..., f].any() else None for f in range(WIDTH)]
    assert stats["mean_activation"][-1] is None
    np.testing.assert_allclose(
        [m for m in stats["mean_activation"] if m is not None], [m for m in expected_mean if m is not None], rtol=1e-5
    )


@pytest.mark.parametrize("sizes, chunk", [([50], 1 << 24), ([7, 13, 30], 2 * T * WIDTH), ([7, 13, 30], FOLD_15)])
def test_label_token_kind_and_norm_statistics_match_brute_force(setup, sizes, chunk):
    """The per-feature statistics added to the streaming pass, against dense numpy over the whole set."""
    sae, acts, image_idx = setup
    acts = acts.clone()
    acts[::5, 2] *= 6  # every fifth image gets one high-norm token
    labels = np.full(1000 + N_IMG, None, dtype=object)  # indexed by image_idx; some images unlabelled
    labels[image_idx] = [["cat", "dog", "owl", None][i % 4] for i in range(N_IMG)]
    res = mine_features(sae, _batches(acts, image_idx, sizes), n_top=4, labels=labels, cls=(0, 1), patches=(1, T),
                        max_latent_elements=chunk)
    with torch.no_grad():
        lat = sae.dense_latents(acts.reshape(-1, D)).reshape(N_IMG, T, WIDTH).numpy()
    fired = lat > 0
    stats = res.feature_stats.to_pydict()
    np.testing.assert_allclose(stats["cls_frequency"], fired[:, 0].mean(0))
    np.testing.assert_allclose(stats["patch_frequency"], fired[:, 1:].mean((0, 1)))

    image_labels = labels[image_idx]
    for f in range(WIDTH):
        on = [lab for lab, hit in zip(image_labels, fired[:, :, f].any(1)) if hit and lab is not None]
        if not on:
            assert stats["top_label"][f] is None and stats["label_entropy"][f] is None
            continue
        names, counts = np.unique(on, return_counts=True)
        p = counts / counts.sum()
        assert stats["top_label"][f] == names[counts.argmax()]  # ties: the first label in sorted order
        assert stats["top_label_share"][f] == pytest.approx(p.max())
        assert stats["label_entropy"][f] == pytest.approx(-(p * np.log2(p)).sum())

    norms = np.linalg.norm(acts.numpy(), axis=-1)
    ratio = norms / np.median(norms, axis=1, keepdims=True)
    t = res.top_images.to_pydict()
    position = {int(i): n for n, i in enumerate(image_idx)}
    expected = [ratio[position[i], tok] for i, tok in zip(t["image_idx"], t["token"])]
    np.testing.assert_allclose(t["token_norm_ratio"], expected, rtol=1e-5)
    for f in range(WIDTH):
        mine = [r for feat, r in zip(t["feature"], t["token_norm_ratio"]) if feat == f]
        if not mine:
            assert stats["top_norm_ratio"][f] is None and stats["high_norm"][f] is None
            continue
        # torch's nanmedian takes the lower middle value of an even count
        assert stats["top_norm_ratio"][f] == pytest.approx(sorted(mine)[(len(mine) - 1) // 2], rel=1e-6)
        assert stats["high_norm"][f] == (stats["top_norm_ratio"][f] > 2.0)
    assert any(stats["high_norm"][f] for f in range(WIDTH) if stats["high_norm"][f] is not None)


@pytest.mark.parametrize("sizes", [[50], [7, 13, 30]])
def test_factor_statistics_match_brute_force(setup, sizes):
    """Each latent factor counted over the images a feature fires on, like the labels."""
    sae, acts, image_idx = setup
    size = np.full(1000 + N_IMG, -1)  # indexed by image_idx; -1: no value
    size[image_idx] = [i % 3 for i in range(N_IMG)]
    colour = np.full(1000 + N_IMG, None, dtype=object)
    colour[image_idx] = [["red", "blue", None][i % 3] if i % 5 else "red" for i in range(N_IMG)]
    res = mine_features(sae, _batches(acts, image_idx, sizes), n_top=2, factors={"size": size, "colour": colour})
    with torch.no_grad():
        lat = sae.dense_latents(acts.reshape(-1, D)).reshape(N_IMG, T, WIDTH).numpy()
    fires_on = lat.max(1) > 0  # (image, feature)
    rows = {(r["feature"], r["factor"]): r for r in res.factor_stats.to_pylist()}
    for f in range(WIDTH):
        for name, values in (("size", size), ("colour", colour)):
            on = [v for v, hit in zip(values[image_idx], fires_on[:, f]) if hit and v is not None and v != -1]
            if not on:
                assert (f, name) not in rows
                continue
            kinds, counts = np.unique(np.asarray(on, dtype=object if name == "colour" else np.int64),
                                      return_counts=True)
            p = counts / counts.sum()
            r = rows[(f, name)]
            assert r["top_value"] == str(kinds[counts.argmax()]) and r["n_images"] == len(on)
            assert r["top_share"] == pytest.approx(p.max()) and r["entropy"] == pytest.approx(-(p * np.log2(p)).sum())
    assert mine_features(sae, _batches(acts, image_idx, [50]), n_top=2).factor_stats.num_rows == 0
    with pytest.raises(ValueError, match="bin a continuous column"):
        mine_features(sae, _batches(acts, image_idx, [50]), factors={"x": np.arange(5000.0)})


def test_without_labels_or_a_class_token_those_columns_are_null(setup):
    sae, acts, image_idx = setup
    stats = mine_features(sae, _batches(acts, image_idx, [50]), n_top=2).feature_stats
    for name in ("cls_frequency", "top_label", "top_label_share", "label_entropy"):
        assert stats.column(name).null_count == WIDTH, name
    assert stats.column("patch_frequency").null_count == 0  # patches None: every token


def test_ties_prefer_the_lower_image_idx():
    """Identical images in reversed-id batches: the lower ids must win every tie."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=D, width=WIDTH, k=K))
    one = torch.randn(1, T, D)
    acts = one.expand(6, T, D).clone()
    batches = [(np.array([9, 8, 7]), acts[:3]), (np.array([3, 2, 1]), acts[3:])]
    res = mine_features(sae, batches, n_top=2)
    t = res.top_images.to_pydict()
    for f in set(t["feature"]):
        ids = [i for ff, i in zip(t["feature"], t["image_idx"]) if ff == f]
        assert ids == [1, 2]


def test_bad_inputs():
    sae = TopKSAE(SAEConfig(d_in=D, width=WIDTH, k=K))
    with pytest.raises(ValueError, match="no batches"):
        mine_features(sae, [])
    with pytest.raises(ValueError, match="token count changed"):
        mine_features(sae, [(np.arange(2), torch.randn(2, T, D)), (np.arange(2, 4), torch.randn(2, T + 1, D))])
    with pytest.raises(ValueError, match="image id 4294967295 is past"):  # the tops order ids in 32 bits
        mine_features(sae, [(np.array([0, (1 << 32) - 1]), torch.randn(2, T, D))])


@pytest.mark.parametrize("sizes, chunk", [([50], 1 << 24), ([7, 13, 30], 2 * T * WIDTH), ([7, 13, 30], FOLD_15)])
def test_class_token_top_images_match_brute_force(setup, sizes, chunk):
    sae, acts, image_idx = setup
    res = mine_features(sae, _batches(acts, image_idx, sizes), n_top=4, cls=(0, 1), max_latent_elements=chunk)
    with torch.no_grad():
        at_cls = sae.dense_latents(acts[:, 0]).numpy()  # (N, width)
    expected = []
    for f in range(WIDTH):
        order = sorted((i for i in range(N_IMG) if at_cls[i, f] > 0), key=lambda i: (-at_cls[i, f], image_idx[i]))[:4]
        expected += [(f, rank, int(image_idx[i])) for rank, i in enumerate(order)]
    t = res.top_images_cls.to_pydict()
    assert list(zip(t["feature"], t["rank"], t["image_idx"])) == expected
    np.testing.assert_allclose(t["activation"], [at_cls[image_idx == i][0, f] for f, _, i in expected], rtol=1e-6)
    assert mine_features(sae, _batches(acts, image_idx, [50]), n_top=4).top_images_cls is None  # no class token


def test_samples_are_the_same_whatever_the_batching_and_cover_every_firing_image_when_few(setup):
    sae, acts, image_idx = setup
    one = mine_features(sae, _batches(acts, image_idx, [50]), n_samples=8).samples
    many = mine_features(sae, _batches(acts, image_idx, [7, 13, 30]), n_samples=8,
                         max_latent_elements=2 * T * WIDTH).samples
    for name in ("feature", "image_idx", "quantile"):
        assert one.column(name).equals(many.column(name)), name
    np.testing.assert_allclose(one.column("activation"), many.column("activation"), rtol=1e-5)  # batch-size rounding
    with torch.no_grad():
        per_image = sae.dense_latents(acts.reshape(-1, D)).reshape(N_IMG, T, WIDTH).amax(1).numpy()
    everything = mine_features(sae, _batches(acts, image_idx, [50]), n_samples=N_IMG).samples.to_pydict()
    for f in range(WIDTH):
        fired = {int(image_idx[i]): per_image[i, f] for i in range(N_IMG) if per_image[i, f] > 0}
        mine = [(i, a, q) for feat, i, a, q in zip(everything["feature"], everything["image_idx"],
                                                   everything["activation"], everything["quantile"]) if feat == f]
        assert {i for i, _, _ in mine} == set(fired)  # room for all: every firing image, once
        assert [a for _, a, _ in mine] == sorted(a for _, a, _ in mine)  # by activation
        np.testing.assert_allclose([a for _, a, _ in mine], sorted(fired.values()), rtol=1e-6)
        if len(mine) > 1:
            assert mine[0][2] == 0 and mine[-1][2] == 1
    # with room for 8, each feature keeps min(8, images it fires on), drawn from those images
    s = one.to_pydict()
    for f in range(WIDTH):
        n_fired = int((per_image[:, f] > 0).sum())
        drawn = [i for feat, i in zip(s["feature"], s["image_idx"]) if feat == f]
        assert len(drawn) == min(8, n_fired) and all(per_image[image_idx == i][0, f] > 0 for i in drawn)


def test_the_sample_is_uniform_over_firing_images():
    """Over many features the sampling keys pick each image about equally often."""
    from analysis.evaluation.mining_samples import Reservoir

    width, n_images = 2000, 40
    res = Reservoir(width, 10, torch.device("cpu"))
    values = torch.ones(n_images, width)
    res.update(values[:17], torch.arange(17))
    res.update(values[17:], torch.arange(17, n_images))
    counts = np.bincount(res.table().column("image_idx").to_numpy(), minlength=n_images)
    expected = width * 10 / n_images  # 500 per image
    assert counts.sum() == width * 10 and abs(counts - expected).max() < 5 * np.sqrt(expected)


@pytest.mark.parametrize("cut", [1, 2])
def test_states_of_disjoint_images_merge_into_the_state_of_one_pass(setup, cut):
    """Mining parts apart (dask tasks) and merging the states gives one pass's tables."""
    from analysis.evaluation.mining import mining_state

    sae, acts, image_idx = setup
    sizes = [7, 13, 30]
    labels = np.full(1000 + N_IMG, -1)
    labels[image_idx] = np.arange(N_IMG) % 3
    factors = {"size": np.arange(1000 + N_IMG) % 4}
    kw = dict(n_top=4, n_samples=6, labels=labels, factors=factors, cls=(0, 1), patches=(1, T))
    whole = mine_features(sae, _batches(acts, image_idx, sizes), **kw)
    batches = _batches(acts, image_idx, sizes)
    merged = mining_state(sae, batches[:cut], **kw).merge(mining_state(sae, batches[cut:], **kw)).result()
    assert_same_mining(merged, whole)
    with pytest.raises(ValueError, match="different dictionaries"):
        mining_state(sae, batches, **kw).merge(mining_state(sae, batches, **{**kw, "n_top": 3}))
    # labels over another value set: the same counter shapes, but the counts would mix
    other = mining_state(sae, batches[cut:], **{**kw, "labels": np.where(labels >= 0, labels + 1, -1)})
    first = mining_state(sae, batches[:cut], **kw)
    fired = first.fire.clone()
    with pytest.raises(ValueError, match="other labels or factor values"):
        first.merge(other)
    assert torch.equal(first.fire, fired)  # refused before anything was added


def assert_same_mining(got, expected) -> None:
    """Every table and the heatmaps equal; the mean activation to float rounding (its sums are
    taken in another grouping when the images are folded or merged in other parts)."""
    for name in ("top_images", "top_images_cls", "samples", "factor_stats"):
        assert getattr(got, name).equals(getattr(expected, name)), name
    np.testing.assert_array_equal(got.heatmaps, expected.heatmaps)
    exact = [c for c in expected.feature_stats.column_names if c != "mean_activation"]
    assert got.feature_stats.select(exact).equals(expected.feature_stats.select(exact))
    np.testing.assert_allclose(got.feature_stats["mean_activation"].to_numpy(zero_copy_only=False),
                               expected.feature_stats["mean_activation"].to_numpy(zero_copy_only=False), rtol=1e-6)
