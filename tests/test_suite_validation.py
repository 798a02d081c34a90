"""A bad suite YAML fails before any work, in one line that names the file, the value as the user
wrote it, what was expected and the fix; a suite's report lists its own members, found by their
content ids whatever suite name their rows were written under."""

import re
from pathlib import Path

import pytest
import yaml

from analysis.stages.suite import load_suite, parse_suite
from conftest import small_training
from pipelines.run import main

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "suites" / "tiny.yaml"


def _cli(tmp_path, capsys, text: str) -> tuple[int, str, Path]:
    """`python -m pipelines.run --suite <file> --root <dir>`, in process; (exit code, stderr, root)."""
    suite, root = tmp_path / "suite.yaml", tmp_path / "root"
    suite.write_text(text)
    code = main(["--suite", str(suite), "--root", str(root)])
    return code, capsys.readouterr().err, root


@pytest.mark.parametrize("text, message", [
    ("name: x\ndataset: {params: [\n", r"suite\.yaml is not valid YAML at line 3, column 1: .*fix the syntax"),
    ("name: x\ndictionaries:\n\tks: [8]\n", r"not valid YAML at line 3, column 1: .*'\\t'"),
    ("name: x\ndictionaries: {ks: [8]}\ndictionaries: {ks: [4]}\n", r"line 3, column 1: duplicate key 'dictionaries'"),
    ("- a\n- b\n", r"top level of a suite must be a mapping of sections .*got a list \['a', 'b'\]"),
    ("just a string\n", r"top level of a suite must be a mapping of sections .*got the string 'just a string'"),
    ("", r"suite\.yaml is empty: a suite needs at least a `name:`"),
    ("# every line commented out\n", r"suite\.yaml is empty"),
    ("name: x\ndictionaries: 3\n", r"dictionaries must be a mapping of keys to values, got the int 3"),
    ('name: x\ndictionaries: {seeds: ["a"]}\n',
     r"dictionaries\.seeds\[0\]='a': expected an int, got the string 'a'; e\.g\. seeds: \[0\] \(the default\)"),
    ("name: x\ndictionaries: {seeds: 0}\n", r"dictionaries\.seeds=0: expected a list of ints, got the int 0"),
    ("name: x\ndictionaries: {seeds: []}\n", r"dictionaries\.seeds is empty: it would make no members"),
    ("name: x\ndictionaries: {expansions: [-8]}\n", r"dictionaries\.expansions\[0\]=-8: expected a positive int"),
    ("name: x\ndictionaries: {sparsity_coefs: [-1.0], architectures: [relu]}\n",
     r"dictionaries\.sparsity_coefs\[0\]=-1\.0: expected a positive penalty coefficient"),
    ("name: x\nactivations: {batch_size: true}\n", r"activations\.batch_size=true: expected an int, got the boolean"),
    ("name: x\nactivations: {hooks: blocks.0.hook_resid_post}\n",
     r"activations\.hooks='blocks\.0\.hook_resid_post': expected a list of strings"),
    ("name: x\nactivations: {max_store_gb: -1}\n", r"activations\.max_store_gb=-1: expected a positive number"),
    ("name: x\nevaluation: {max_images: 2.5}\n", r"evaluation\.max_images=2\.5: expected an int, got the number"),
    ("name: x\nevaluation: {n_top: 0}\n", r"evaluation\.n_top=0: expected a positive number; e\.g\. n_top: 16"),
    ('name: x\nmodel: {vit: {d_model: "64"}}\n', r"model\.vit\.d_model='64': expected an int.*without quotes"),
    ("name: x\nmodel: {vit: {pool: max}}\n", r"unknown model\.vit\.pool 'max'; valid: cls, mean"),
    ("name: x\nmodel: {train: {epochs: 1.5}}\n", r"model\.train\.epochs=1\.5: expected an int"),
    ("name: x\ndataset: {params: {n_images: ten}}\n", r"dataset\.params\.n_images='ten': expected an int"),
    ("name: x\ndictionaries: {train: {lr: 1e-3}}\n",
     r"dictionaries\.train\.lr='1e-3': expected a number.*write an exponent with a dot, e\.g\. 1\.0e-3"),
    ("name: x\ndictionaries: {train: {lr_decay: 1}}\n", r"dictionaries\.train\.lr_decay=1: expected true or false"),
    ("name: x\ncrosscoders: {hook_groups: [[blocks.0.hook_resid_post, blocks.1.hook_resid_post]], seeds: [-1]}\n",
     r"crosscoders\.seeds\[0\]=-1: expected an int >= 0"),
    ("name: x\ntranscoders: {pairs: [[blocks.0.hook_resid_post, blocks.1.hook_resid_post]], expansions: [0]}\n",
     r"transcoders\.expansions\[0\]=0: expected a positive int"),
    ("name: ../../escape\n", r"suite name '\.\./\.\./escape' is not allowed: .*must match "
                             r"\[A-Za-z0-9\]\[A-Za-z0-9_\.-\]\{0,63\} without '\.\.'"),
    ("name: a/b\n", r"suite name 'a/b' is not allowed"),
    ("name: 7\n", r"suite name 7 is not allowed"),
])
def test_a_bad_suite_fails_in_one_line_before_any_work(tmp_path, capsys, text, message):
    code, err, root = _cli(tmp_path, capsys, text)
    assert code == 2
    assert err.startswith("spectra: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    # the root may exist (its writability is checked first) but holds nothing: no dagster_home, no
    # data, and nothing beside it (a plot named by `../..` would land there)
    assert not root.exists() or not any(root.iterdir())
    assert {p.name for p in tmp_path.iterdir()} <= {"suite.yaml", "root"}


def test_a_file_named_outside_the_pattern_must_name_its_suite(tmp_path):
    (tmp_path / "my suite.yaml").write_text("dictionaries: {ks: [8]}\n")
    with pytest.raises(ValueError, match=r"suite name 'my suite' is not allowed.*set `name:` in the suite YAML"):
        load_suite(tmp_path / "my suite.yaml")
    (tmp_path / "named.yaml").write_text("name: mine\ndictionaries: {ks: [8]}\n")
    assert load_suite(tmp_path / "named.yaml").name == "mine"


@pytest.mark.parametrize("path", sorted((REPO / "pipelines" / "suites").glob("*.yaml"))
                         + sorted((REPO / "tests" / "suites").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_still_parses_under_its_declared_name(path):
    spec = load_suite(path)
    assert spec.name == yaml.safe_load(path.read_text()).get("name", path.stem)
    assert spec.members()


def test_lists_in_nested_entries_become_tuples_and_ids_do_not_depend_on_it():
    """Immutable specs: a transcoder pair or a crosscoder group given as a YAML list is a tuple."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    spec = parse_suite({"name": "x", "activations": {"hooks": hooks}, "transcoders": {"pairs": [hooks]},
                        "crosscoders": {"hook_groups": [hooks]}})
    assert spec.transcoders.pairs == (tuple(hooks),) and spec.crosscoders.hook_groups == (tuple(hooks),)
    assert spec.store_id == parse_suite({"name": "y", "activations": {"hooks": tuple(hooks)}}).store_id


# --- the report lists the suite's own members -------------------------------------------------

def _mini(name: str) -> dict:
    """The smallest whole suite: 320 images in one shard, a one-epoch mouse, two SAEs (two seeds)."""
    raw = yaml.safe_load(TINY.read_text())
    dictionaries = {**small_training(batch_size=512, n_train_tokens=4096, dead_tokens=2048), "seeds": [0, 1]}
    return {**raw, "name": name, "dataset": {"params": {"n_images": 320, "seed": 0}},
            "model": {**raw["model"], "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2}},
            "activations": {**raw["activations"], "hooks": ["blocks.1.hook_resid_post"], "images_per_shard": 320},
            "dictionaries": dictionaries, "transcoders": {}, "crosscoders": {},
            "evaluation": {"max_images": 64, "n_top": 4, "batch_images": 64}}


@pytest.fixture(scope="module")
def first_suite_run(tmp_path_factory):
    """Suite `first` run through Dagster; its members' evaluation rows carry suite='first'."""
    from conftest import suite_in_dagster

    tmp = tmp_path_factory.mktemp("shared_members")
    spec = parse_suite(_mini("first"))
    with suite_in_dagster(spec, tmp) as (root, _):
        yield tmp, spec, root


def test_a_suite_reports_members_first_evaluated_under_another_suites_name(first_suite_run, tmp_path, capsys,
                                                                           monkeypatch):
    from analysis.catalog import connect_catalog

    tmp, first, root = first_suite_run
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(_mini("second")))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))  # main points it at the root's; restored after
    code = main(["--suite", str(second), "--root", str(root.root)])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    keys = [m.key for m in load_suite(second).members()]
    assert keys == [m.key for m in first.members()] and len(keys) == 2
    summary = out[out.index("Suite 'second'"):]
    assert "(no evaluations)" not in summary
    assert summary.count("blocks.1.hook_resid_post") == 2  # one summary row per member
    con = connect_catalog(root.catalog)
    try:  # the members were reused, not retrained: their rows still carry the first suite's name
        assert {s for (s,) in con.execute("SELECT suite FROM evaluations").fetchall()} == {"first"}
    finally:
        con.close()
    assert (root.reports / "second_fvu_vs_l0.png").is_file()


def test_a_run_that_ends_with_members_missing_fails_naming_them(first_suite_run, capsys):
    from analysis.stages.report import missing_members, suite_evaluations
    from pipelines.run import report_missing

    _, first, root = first_suite_run
    more_seeds = parse_suite({**_mini("first"), "dictionaries": {**_mini("first")["dictionaries"], "seeds": [0, 1, 2]}})
    evals = suite_evaluations(more_seeds, root)
    assert evals.num_rows == 2 and missing_members(more_seeds, evals) == ["b1_resid_post-topk-x2-k8-s2"]
    assert report_missing(more_seeds, evals) == 1
    err = capsys.readouterr().err
    assert "1 of the suite's 3 members have no row" in err and "b1_resid_post-topk-x2-k8-s2" in err
    assert report_missing(first, suite_evaluations(first, root)) == 0
