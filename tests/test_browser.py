"""The static HTML feature browser, built from a real tiny mined suite and opened in headless Chromium.

Chromium loads each page from file:// (no server, as a user opens it), runs its script and dumps
the DOM, which is what the assertions read; the URL hash drives sorting, filtering and the open
card. The page writes any script error, unhandled rejection or image that fails to load into
<pre id="errors">, and Chromium's console lines are read from its log: both must stay empty.
"""

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis.data.images import open_images, read_labels
from analysis.paths import DataRoot
from analysis.stages.browser import (COLUMNS, PAGE_MARKER, build_browser, build_browser_index, build_suite_browser,
                                     browser_dir)
from analysis.stages.dictionaries import FEATURES_FILE, dictionary_id
from analysis.stages.report import member_dict_ids
from test_damage import MEMBER, SUITE, run_all

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = ("headless Chromium is not installed here (no `chromium` on PATH) and this test does not install "
               "system packages: install Debian's package with `sudo apt-get install -y --no-install-recommends "
               "chromium` (.ci/run does this before `make test`)")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = DataRoot(tmp_path_factory.mktemp("browser"))
    run_all(root)
    dict_id = dictionary_id(SUITE, MEMBER)
    page = build_browser(root, dict_id)
    build_browser_index(root, [dict_id])
    return root, dict_id, page


def _tables(root: DataRoot, dict_id: str) -> tuple[list[dict], list[dict]]:
    """(feature_stats rows by feature, top_images rows by feature and rank) of the dictionary."""
    stats = pq.read_table(root.table("feature_stats") / f"dict_id={dict_id}").sort_by("feature").to_pylist()
    top = pq.read_table(root.table("top_images") / f"dict_id={dict_id}").sort_by(
        [("feature", "ascending"), ("rank", "ascending")]).to_pylist()
    return stats, top


def _blob(page: Path) -> dict:
    """The JSON the page's script renders."""
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', page.read_text(), re.S)
    return json.loads(match.group(1))


class Rendered:
    """A page after Chromium ran its script: the DOM dump and the console lines of its log."""

    def __init__(self, page: Path, fragment: str = ""):
        proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                               "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri() + fragment],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.dom = proc.stdout
        self.console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]

    @property
    def errors(self) -> str:
        return re.search(r'<pre id="errors">(.*?)</pre>', self.dom, re.S).group(1)

    def row_features(self) -> list[int]:
        return [int(f) for f in re.findall(r'<tr data-feature="(\d+)"', self.dom)]

    def tiles(self) -> list[tuple[str, int]]:
        """(loaded flag, image index) of each top image of the open card, in order."""
        return [(flag, int(idx)) for flag, idx in
                re.findall(r'<div class="tile"( data-loaded="1")?><img [^>]*src="[^"]*/(\d+)\.png"', self.dom)]

    def assert_clean(self) -> None:
        assert 'data-rows="' in self.dom, "the script did not render the table"
        assert self.errors == "" and not self.console, (self.errors, self.console)


def _expected_order(blob: dict, column: str, desc: bool) -> list[int]:
    """The page's documented order: by the column, nulls last, ties by feature ascending."""
    i = blob["columns"].index(column)
    present = [r for r in blob["rows"] if r[i] is not None]
    present.sort(key=lambda r: r[0])
    present.sort(key=lambda r: r[i], reverse=desc)  # stable: ties stay by feature
    return [r[0] for r in present] + [r[0] for r in blob["rows"] if r[i] is None]


def test_the_page_holds_the_mined_tables_and_needs_no_network(built):
    root, dict_id, page = built
    stats, top = _tables(root, dict_id)
    blob = _blob(page)
    assert blob["columns"] == list(COLUMNS) and len(blob["rows"]) == len(stats)
    labels = read_labels(root.images(SUITE.dataset_id)).column("label").to_pylist()
    class_names = open_images(root.images(SUITE.dataset_id)).attrs["class_names"]
    for row, s in zip(blob["rows"], stats):
        r = dict(zip(blob["columns"], row))
        assert r["feature"] == s["feature"] and r["fire_count"] == s["fire_count"]
        assert r["density"] == pytest.approx(s["frequency"], rel=1e-3)
        assert r["max_activation"] == pytest.approx(s["max_activation"], rel=1e-3)
        for name in ("label_entropy", "cls_frequency"):  # mining's own, over every image it fires on
            assert r[name] == (None if s[name] is None else pytest.approx(s[name], rel=1e-3, abs=1e-6))
        assert r["high_norm"] == s["high_norm"] and r["head_top_class"] == s["head_top_class"]
        mine = [labels[t["image_idx"]] for t in top if t["feature"] == s["feature"]]
        assert r["n_top"] == len(mine)
        if mine:  # the commonest label of its top images (ties: the lowest), by class name, and its share
            counts = Counter(mine)
            label = min(k for k, n in counts.items() if n == max(counts.values()))
            assert r["top_image_label"] == class_names[label]
            assert r["top_image_label_share"] == pytest.approx(counts[label] / len(mine), rel=1e-3)
        else:
            assert r["top_image_label"] is None and r["fire_count"] == 0
    # self-contained: inline script and style, no URL off this folder, every image it names exists
    files = [page, browser_dir(root) / "index.html", *(page.parent / "cards").iterdir()]
    for path in files:
        text = path.read_text()
        assert not re.search(r"https?:|//cdn|<script src|<link ", text), path
    cards = {}
    for chunk in (page.parent / "cards").iterdir():
        cards.update(json.loads(re.fullmatch(r"spectraCards\(\d+,(.*)\);\n", chunk.read_text(), re.S).group(1)))
    images = (page.parent / blob["image_dir"]).resolve()
    assert {int(f) for f in cards} == {s["feature"] for s in stats if s["fire_count"] > 0}
    for feature, (idx, *_rest) in cards.items():
        assert idx == [t["image_idx"] for t in top if t["feature"] == int(feature)]
        assert all((images / f"{i}.png").is_file() for i in idx)


@needs_chromium
def test_chromium_renders_the_rows_and_a_cards_images(built):
    root, dict_id, page = built
    stats, top = _tables(root, dict_id)
    feature = max(stats, key=lambda s: (s["fire_count"], -s["feature"]))["feature"]
    shown = Rendered(page, f"#feature={feature}")
    shown.assert_clean()
    assert shown.row_features() == list(range(min(100, len(stats))))  # first page, by feature
    assert f'id="card" data-feature="{feature}"' in shown.dom
    want = [t["image_idx"] for t in top if t["feature"] == feature]
    assert shown.tiles() == [(' data-loaded="1"', i) for i in want], "every top image shown, loaded, in rank order"
    assert shown.dom.count("<canvas") == len(want)  # a heatmap over each (the store keeps patches)
    # below them, images from across its range (feature_samples), weakest first, and the head's classes
    samples = pq.read_table(root.table("feature_samples") / f"dict_id={dict_id}").to_pylist()
    mine = sorted((r for r in samples if r["feature"] == feature), key=lambda r: r["quantile"])
    shown_samples = [(flag, int(i)) for flag, i in re.findall(
        r'<div class="tile sample"( data-loaded="1")?><img [^>]*src="[^"]*/(\d+)\.png"', shown.dom)]
    assert 0 < len(shown_samples) <= 8 and all(flag for flag, _ in shown_samples)
    picks = np.unique(np.linspace(0, len(mine) - 1, min(8, len(mine))).round().astype(int))  # evenly spaced
    assert [i for _, i in shown_samples] == [mine[j]["image_idx"] for j in picks]
    classes = next(s["head_top3"] for s in stats if s["feature"] == feature)
    assert "reads its decoder direction as: " + ", ".join(classes) in shown.dom
    # and its activation histogram: every image it fires on, from its first to its last non-empty bin
    histogram = next(s["activation_histogram"] for s in stats if s["feature"] == feature)
    nonzero = [i for i, n in enumerate(histogram) if n]
    assert f'id="activations" data-bins="{nonzero[-1] - nonzero[0] + 1}"' in shown.dom
    assert f"{sum(histogram)} images</div>" in shown.dom


@needs_chromium
@pytest.mark.parametrize("column,desc", [("density", True), ("top_image_label_share", False)])
def test_sorting_by_a_column_follows_the_url(built, column, desc):
    _, _, page = built
    shown = Rendered(page, f"#sort={column}_{'desc' if desc else 'asc'}")
    shown.assert_clean()
    assert shown.row_features() == _expected_order(_blob(page), column, desc)[:100]
    assert f'data-col="{column}">' in shown.dom and ("▼" if desc else "▲") in shown.dom


@needs_chromium
def test_clicks_and_typing_drive_the_page(built, tmp_path):
    """The controls, not only the URL: a script appended to a copy of the page clicks the density
    header (descending), the first row (its card), the header again (ascending), types a label."""
    root, _, page = built
    shutil.copytree(browser_dir(root), tmp_path / "browser")
    clicked = tmp_path / "browser" / page.parent.name / "index.html"
    blob = _blob(page)
    label = next(r[blob["columns"].index("top_image_label")] for r in blob["rows"] if r[blob["columns"].index("top_image_label")])
    steps = ["document.querySelector('th[data-col=density]').click()", "document.querySelector('#body tr').click()",
             "document.querySelector('th[data-col=density]').click()",
             f"const q = document.getElementById('q'); q.value = {json.dumps(label)}; q.dispatchEvent(new Event('input'))"]
    script = "".join(f"setTimeout(() => {{ {step}; }}, {100 * (i + 1)});" for i, step in enumerate(steps))
    clicked.write_text(clicked.read_text().replace("</body>", f"<script>{script}</script></body>"))
    shown = Rendered(clicked)
    shown.assert_clean()
    first_by_density = _expected_order(blob, "density", True)[0]
    assert f'id="card" data-feature="{first_by_density}"' in shown.dom
    i = blob["columns"].index("top_image_label")
    labelled = {r[0] for r in blob["rows"] if r[i] is not None and label.lower() in r[i].lower()}
    assert shown.row_features() == [f for f in _expected_order(blob, "density", False) if f in labelled][:100]


@needs_chromium
def test_filters_and_dead_features(built):
    root, dict_id, page = built
    blob = _blob(page)
    col = {c: i for i, c in enumerate(blob["columns"])}
    mixed = [r for r in blob["rows"] if r[col["density"]] >= 0.05 and r[col["top_image_label_share"]] is not None
             and r[col["top_image_label_share"]] <= 0.5]
    label = mixed[0][col["top_image_label"]]  # a label (shapes' class names), matched by the text box
    want = [r[0] for r in mixed if label in r[col["top_image_label"]]]
    assert 0 < len(want) < len(blob["rows"]) / 2
    shown = Rendered(page, f"#min_density=0.05&max_top_image_label_share=0.5&q={label}")
    shown.assert_clean()
    assert shown.row_features() == want
    dead = [r[0] for r in blob["rows"] if r[col["fire_count"]] == 0]
    assert dead, "the tiny suite's dictionary has latents that never fire on the mined images"
    shown = Rendered(page, f"#sort=fire_count_asc&feature={dead[0]}")
    shown.assert_clean()
    assert shown.row_features()[:len(dead)] == dead
    for f in dead:  # listed, and marked
        assert re.search(rf'<tr data-feature="{f}" class="dead[^"]*"><td>{f} <span class="badge">dead</span>', shown.dom)
    assert "never fired on the mined images" in shown.dom and not shown.tiles()
    assert Rendered(page, "#dead=hide").row_features() == [r[0] for r in blob["rows"] if r[col["fire_count"]]][:100]


@needs_chromium
def test_a_broken_page_or_a_missing_image_is_caught(built, tmp_path):
    """The checks above can fail: a script that throws, and an image file that is gone."""
    root, _, page = built
    copy = tmp_path / "browser"
    shutil.copytree(browser_dir(root), copy)
    broken = copy / page.parent.name / "index.html"
    broken.write_text(broken.read_text().replace('"use strict";', '"use strict"; null.boom;', 1))
    shown = Rendered(broken)
    assert "TypeError" in shown.errors and 'data-rows="' not in shown.dom
    broken.write_text(page.read_text())
    chunk = (copy / page.parent.name / "cards" / "0000.js").read_text()
    feature, (images, *_) = next(iter(json.loads(re.search(r"spectraCards\(0,(.*)\);", chunk).group(1)).items()))
    next(copy.glob(f"images/*/{images[0]}.png")).unlink()
    shown = Rendered(broken, f"#feature={feature}")
    assert f"{images[0]}.png failed to load" in shown.errors


def test_the_index_links_each_dictionary_with_its_metrics(built):
    root, dict_id, _ = built
    index = (browser_dir(root) / "index.html").read_text()
    assert f'<a href="{dict_id}/index.html">{dict_id}</a>' in index
    evaluation = pq.read_table(root.table("evaluations") / f"dict_id={dict_id}").to_pylist()[0]
    assert f"<td>{evaluation['fvu']:.4g}</td>" in index and f"<td>{evaluation['l0']:.4g}</td>" in index
    alive = json.loads((root.dictionary(dict_id) / FEATURES_FILE).read_text())["n_alive"]
    assert f"{alive} of {evaluation['width']}" in index


def test_unknown_and_unmined_dictionaries_say_what_to_do(built, tmp_path):
    root, dict_id, _ = built
    with pytest.raises(KeyError, match=f"did you mean \\['{dict_id}'\\]"):
        build_browser(root, dict_id[:-1] + ("0" if dict_id[-1] != "0" else "1"))
    copy = DataRoot(tmp_path / "root")
    shutil.copytree(root.root, copy.root)
    (copy.dictionary(dict_id) / FEATURES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no mined features .*the `features` asset's partition "
                                                rf"'{MEMBER.key}'.*--select features --partition {MEMBER.key}"):
        build_browser(copy, dict_id)
    shutil.rmtree(browser_dir(copy) / dict_id)
    with pytest.raises(FileNotFoundError, match=rf"no browser page for \['{dict_id}'\].*build_browser"):
        build_browser_index(copy, [dict_id])


def test_the_feature_browser_asset_builds_every_mined_member(built, tmp_path):
    from assets.report import report_assets
    from resources import StorageResource

    root, dict_id, _ = built
    copy = DataRoot(tmp_path / "root")
    shutil.copytree(root.root, copy.root)
    shutil.rmtree(copy.reports)
    [browser] = [a for a in report_assets(SUITE) if a.key.to_user_string() == "feature_browser"]
    result = dg.materialize([browser], resources={"storage": StorageResource(root=str(copy.root))})
    [event] = result.asset_materializations_for_node("feature_browser")
    index = browser_dir(copy) / "index.html"
    assert event.metadata["path"].path == str(index) and event.metadata["url"].url == index.as_uri()
    assert event.metadata["n_dictionaries"].value == len(member_dict_ids(SUITE)) == 1
    assert (browser_dir(copy) / dict_id / "index.html").is_file() and dict_id in index.read_text()


def test_the_suite_browser_rebuilds_only_pages_whose_inputs_changed_or_are_damaged(built):
    root, dict_id, _ = built
    first = build_suite_browser(SUITE, root)
    assert first["dict_ids"] == [dict_id]
    page_dir = browser_dir(root) / dict_id
    assert build_suite_browser(SUITE, root)["reused"] == [dict_id]  # same inputs, intact files
    card = next((page_dir / "cards").glob("*.js"))
    card.write_text(card.read_text()[:50])  # a truncated card file is damage: rebuilt, not reused
    assert build_suite_browser(SUITE, root)["reused"] == []
    assert card.stat().st_size > 50 and build_suite_browser(SUITE, root)["reused"] == [dict_id]
    marker = root.dictionary(dict_id) / "evaluation.json"
    marker.write_text(marker.read_text().replace("{", '{"note": "re-evaluated", ', 1))  # new inputs: rebuilt
    assert build_suite_browser(SUITE, root)["reused"] == []
    assert (page_dir / PAGE_MARKER).is_file()
