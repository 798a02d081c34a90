"""The README cannot rot: every code example in it is a fenced block with a language, and each one
runs here against a tiny suite's outputs (python and sql blocks, shell commands that CI can run),
is checked as a suite (yaml), or is named below with the reason it is not run.

The README's examples find the data root the way the pipeline does: `$SPECTRA_ROOT`, default
`./data` (the Makefile exports it for `make run`). The test sets SPECTRA_ROOT to the tiny suite's
root; nothing in the README's text is rewritten.
"""

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import small_training

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = Path(__file__).parent / "suites" / "tiny.yaml"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
LANGUAGES = {"python", "bash", "sql", "yaml", "text"}

# Shell blocks this test does not run, each found by a string in it, with the reason.
NOT_RUN = {
    "make run     #": "`make run` materializes the default suite (minutes of training) and `make test` is the "
                     "test suite itself; CI runs `make test`",
    "make ui": "starts a long-running web server; tests/test_ui.py starts the same dagster webserver and "
               "queries it",
    "SPECTRA_ACTIVATIONS_URL=s3://": "needs AWS credentials and the network; tests/test_object_storage.py runs "
                                     "the same suite with its stores at s3:// on moto's S3 server",
    "concurrency set gpu": "changes the pool limit of the instance under ./data; "
                           "tests/test_parallel_run.py runs the same command on a test instance and checks that "
                           "`make run` keeps the limit it set",
    "make verify": "verifies the default suite's outputs under ./data (`make run`); tests/test_damage.py runs "
                   "the same command on a small suite, with damage and repair",
}
# Calendar-versioned (YYYY.MM) dependencies have no majors to stay below (see pyproject.toml).
CALENDAR_VERSIONED = {"fsspec", "dask", "distributed", "s3fs"}


def _blocks(language: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every fenced block in `language`."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def test_every_code_example_is_a_fenced_block_with_a_language():
    text = README.read_text()
    languages = [m.group(1) for m in FENCE.finditer(text)]
    assert languages and set(languages) <= LANGUAGES, languages
    assert text.count("```") == 2 * len(languages), "an unclosed or nested fence"
    # an indented (unfenced) code block is an example no test would see
    lines = FENCE.sub("", text).splitlines()
    indented = [line for before, line in zip(lines, lines[1:]) if not before.strip() and line.startswith("    ")]
    assert not indented, indented


def _readme_suite() -> dict:
    """The smallest suite with every table the README queries: two seeds of one SAE (stability)."""
    raw = yaml.safe_load(TINY.read_text())
    return {**raw, "name": "readme", "dataset": {"params": {"n_images": 320, "seed": 0}},
            "model": {**raw["model"], "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2}},
            "activations": {**raw["activations"], "hooks": ["blocks.1.hook_resid_post"], "images_per_shard": 320},
            "dictionaries": {**small_training(batch_size=512, n_train_tokens=4096, dead_tokens=2048),
                             "seeds": [0, 1]},
            "transcoders": {}, "crosscoders": {},
            "evaluation": {"max_images": 64, "n_top": 4, "batch_images": 64}}


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    from analysis.stages.suite import parse_suite
    from conftest import suite_in_dagster

    spec = parse_suite(_readme_suite())
    with suite_in_dagster(spec, tmp_path_factory.mktemp("readme")) as (root, _):
        yield spec, root


def _run_python_block(line: int, code: str) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    # padded so that a traceback points at the README's own line
    exec(compile("\n" * line + code, str(README), "exec"), namespace)
    return namespace


def test_python_blocks_run_against_a_suites_outputs(suite_root, monkeypatch):
    from analysis.stages.dictionaries import dictionary_id

    spec, root = suite_root
    monkeypatch.setenv("SPECTRA_ROOT", str(root.root))
    blocks = _blocks("python")
    assert len(blocks) == 5
    browser = root.root / "reports" / "browser" / "index.html"
    assert browser.is_file(), "the feature_browser asset (report_job) builds it"
    on_dask, notebook, browse, models, toolkit = (_run_python_block(*block) for block in blocks)
    assert on_dask["result"].firing_fractions()[0] == on_dask["dead"]  # the catalog's, from the same split
    from analysis.activations.reader import ActivationStore

    streamed = ActivationStore.open(on_dask["store"]).stats  # the extraction's own statistics
    assert on_dask["stats"].mean_norm == pytest.approx(streamed.mean_norm, rel=1e-9)
    assert on_dask["stats"].n_tokens == streamed.n_tokens
    try:
        assert notebook["best"][0] in {dictionary_id(spec, m) for m in spec.members()}
        assert notebook["top"], "the best dictionary's top images"
        acts = notebook["acts"]
        assert acts.shape[0] == 8 and acts.shape[-1] == notebook["store"].d_model == 32
        assert notebook["patches"].shape[1] == 16  # the tiny mouse's 4x4 patch grid
        card = notebook["card"]
        assert card.feature == notebook["top"][0][0] and card.heatmaps.shape[1:] == (4, 4)
        assert (root.root / "reports" / "feature.png").stat().st_size > 0
        # the connection is still usable after the README's queries (fetchone would have left it busy)
        assert notebook["con"].sql("SELECT count(*) FROM evaluations").fetchall() == [(2,)]
    finally:
        notebook["con"].close()
    assert browse["index"] == browser and all(p.is_file() for p in browse["pages"]) and len(browse["pages"]) == 2
    assert all(f'href="{dict_id}/index.html"' in browser.read_text() for dict_id in browse["ids"])
    assert tuple(models["logits"].shape) == (2, 1000)
    assert models["resid_stack"].shape[0] == 13  # the embedding and each of the 12 blocks
    layers = {(r["layer"], r["token"]) for r in toolkit["lens_rows"]}
    assert layers == {(layer, token) for layer in range(3) for token in ("stream", "cls", "patches")}
    assert toolkit["attribution"].components[-1] == "L1_mlp"


def test_sql_blocks_run_on_the_catalog(suite_root):
    from analysis.catalog import connect_catalog

    _, root = suite_root
    code = "\n".join(line for _, block in _blocks("sql") for line in block.splitlines()
                     if not line.lstrip().startswith("--"))  # comments hold semicolons too
    statements = [s.strip() for s in code.split(";") if s.strip()]
    assert len(statements) == 11
    con = connect_catalog(root.catalog)
    try:
        results = {s: con.execute(s).fetchall() for s in statements}
    finally:
        con.close()
    [[(*member, n_seeds, cosine)]] = [rows for s, rows in results.items() if "FROM stability" in s]
    assert member == ["blocks.1.hook_resid_post", "topk", 8] and n_seeds == 2 and 0 < cosine <= 1
    assert all(rows for s, rows in results.items() if "density_histogram" in s or "feature_stats" in s)
    [selective] = [rows for s, rows in results.items() if "ORDER BY label_entropy" in s]
    entropies = [entropy for *_, entropy, _, _, _, _ in selective]
    assert len(selective) == 10 and entropies == sorted(entropies) and entropies[0] >= 0
    assert all(0 < share <= 1 and 0 <= patch_freq <= 1 and head_class is not None
               for _, _, _, share, _, _, patch_freq, _, head_class in selective)
    [samples] = [rows for s, rows in results.items() if "FROM feature_samples" in s]
    assert samples and [q for q, _, _ in samples] == sorted(q for q, _, _ in samples) and samples[-1][0] == 1
    [agree] = [rows for s, rows in results.items() if "JOIN images" in s]
    assert agree and all(0 < n_top <= 4 for *_, n_top in agree)  # the tiny suite keeps 4 top images
    [spread] = [rows for s, rows in results.items() if "FROM seed_spread" in s]
    assert {(r[1], r[2], r[3], r[4]) for r in spread} >= {("blocks.1.hook_resid_post", 8, "fvu", 2)}
    [factors] = [rows for s, rows in results.items() if "FROM feature_factors" in s]
    assert factors and {r[2] for r in factors} <= {"shape", "scale", "orientation", "pos_x", "pos_y"}
    assert all(0 < r[4] <= 1 and r[5] >= 5 for r in factors)
    [lens] = [rows for s, rows in results.items() if "FROM toolkit_identifiability" in s]
    assert [(layer, token) for layer, token, *_ in lens] == [(i, t) for t in ("cls", "patches") for i in range(3)]
    [lineage] = [rows for s, rows in results.items() if "JOIN datasets" in s]
    # every link found, up to code_version (code_modified is NULL where git is absent)
    assert len(lineage) == 1 and None not in lineage[0][:12]


def test_shell_blocks_run_or_are_named_with_a_reason(suite_root):
    _, root = suite_root
    skipped, ran = set(), 0
    for line, block in _blocks("bash"):
        reasons = [key for key in NOT_RUN if key in block]
        if reasons:
            skipped.update(reasons)
            continue
        if ".venv/bin/" in block and not (REPO / ".venv" / "bin" / "python").exists():
            pytest.skip("the README's commands run from a checkout set up by `make install` (.venv)")
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "SPECTRA_ROOT": str(root.root)}, timeout=300)
        assert proc.returncode == 0, f"README.md line {line}:\n{proc.stderr[-3000:]}"
        assert "blocks.1.hook_resid_post" in proc.stdout, proc.stdout  # it read this root's catalog
        ran += 1
    assert skipped == set(NOT_RUN), f"NOT_RUN names blocks the README no longer has: {set(NOT_RUN) - skipped}"
    assert ran == 1


def test_yaml_blocks_are_valid_suites():
    from analysis.stages.suite import parse_suite

    blocks = _blocks("yaml")
    assert len(blocks) == 3
    for line, block in blocks:
        spec = parse_suite(yaml.safe_load(block), name="readme")  # names an unknown key or a bad value
        assert spec.members(), f"README.md line {line}"


def test_every_dependency_has_a_tested_upper_bound():
    """A dependency's next major is untested: DuckDB 2.0 broke the README's notebook under `>=1.1`.
    The installed (tested) version must satisfy each bound."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(text)
        if req.name not in CALENDAR_VERSIONED:
            assert any(s.operator in ("<", "==") for s in req.specifier), f"{text}: no upper bound"
        assert req.specifier.contains(version(req.name), prereleases=True), f"{text}: installed {version(req.name)}"
