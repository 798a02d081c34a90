from pathlib import Path

import pytest

from analysis.stages.members import SAEMember
from analysis.stages.suite import SuiteSpec, load_suite, parse_suite
from pipelines.definitions import SUITES_DIR, resolve_suite

TINY = Path(__file__).parent / "suites" / "tiny.yaml"


def test_default_suite_parses_and_has_a_grid_of_at_least_two_hooks_by_two_ks():
    spec = resolve_suite("default")
    members = spec.members()
    assert len({m.hook for m in members}) >= 2 and len({m.k for m in members}) >= 2
    assert len({m.key for m in members}) == len(members)


def test_ids_are_content_derived():
    a, b = load_suite(TINY), load_suite(TINY)
    assert (a.dataset_id, a.model_id, a.store_id) == (b.dataset_id, b.model_id, b.store_id)
    raw = {"name": "x", "dataset": {"params": {"n_images": 100}}}
    changed = parse_suite({"name": "x", "dataset": {"params": {"n_images": 101}}})
    same = parse_suite(raw)
    assert changed.dataset_id != same.dataset_id
    assert changed.model_id != same.model_id and changed.store_id != same.store_id  # ids chain downstream
    bigger_batch = parse_suite({**raw, "activations": {"batch_size": 64}})
    assert bigger_batch.store_id == same.store_id  # extraction batch size changes no stored value


def test_member_keys_are_readable_and_stable():
    m = SAEMember("blocks.1.hook_resid_post", "topk", 16, 32, 0)
    assert m.key == "b1_resid_post-topk-x16-k32-s0"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dataset": {"source": "dsprite"}}, "valid: shapes, folder, parquet"),
        ({"dataset": {"generator": "shapes"}}, "valid: source, params"),
        ({"model": {"kind": "clip"}}, "valid: mouse"),
        ({"dictionaries": {"architectures": ["topkk"]}}, "did you mean topk"),
        ({"activations": {"dtype": "float8"}}, "valid: float16, bfloat16, float32"),
        ({"activatons": {}}, "did you mean activations"),
        ({"dictionaries": {"ks": [0]}}, r"dictionaries.ks\[0\]=0: expected a positive int"),
        ({"activations": {"images_per_shard": 100, "images_per_chunk": 64}}, "multiple"),
    ],
)
def test_bad_names_fail_listing_valid_ones(raw, message):
    with pytest.raises(ValueError, match=message):
        spec = parse_suite({"name": "bad", **raw})
        spec.members()


def test_unknown_hook_is_rejected_before_work_with_valid_names():
    from analysis.stages.validate import validate_suite

    spec = parse_suite({"name": "bad", "activations": {"hooks": ["blocks.0.hook_resid_pots"]}})
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"):
        validate_suite(spec)


def test_penalty_architectures_take_a_coefficient_axis_and_keys_stay_distinct():
    spec = parse_suite({"name": "x", "dictionaries": {"architectures": ["topk", "relu"], "ks": [8],
                                                     "sparsity_coefs": [1.0, 5.0]}})
    keys = [m.key for m in spec.members()]
    assert "b0_resid_post-relu-x16-l5-s0" in keys and "b0_resid_post-topk-x16-k8-s0" in keys
    assert len(keys) == len(set(keys)) == 2 * 3
    with pytest.raises(ValueError, match="sparsity_coefs is empty"):
        parse_suite({"name": "x", "dictionaries": {"architectures": ["jumprelu"]}})


def test_dictionary_hook_must_be_captured():
    spec = parse_suite({"name": "bad", "activations": {"hooks": ["blocks.0.hook_resid_post"]},
                        "dictionaries": {"hooks": ["blocks.1.hook_resid_post"]}})
    with pytest.raises(ValueError, match="must be one of activations.hooks"):
        spec.members()


def test_unknown_suite_name_lists_suites():
    with pytest.raises(ValueError, match="default"):
        resolve_suite("nope")
    assert (SUITES_DIR / "default.yaml").exists()


def test_spec_is_frozen():
    spec = SuiteSpec(name="x")
    with pytest.raises(Exception):
        spec.name = "y"


def test_transcoder_grid_makes_members_with_readable_keys_and_its_own_ids():
    spec = load_suite(TINY)
    (tc,) = [m for m in spec.members() if m.kind == "transcoder"]
    assert tc.key == "tc-b1_resid_mid-b1_mlp_out-x4-k8-skip-s0"
    assert spec.member(tc.key) == tc
    from analysis.stages.dictionaries import dictionary_id

    ids = {dictionary_id(spec, m) for m in spec.members()}
    assert len(ids) == len(spec.members()) and dictionary_id(spec, tc).startswith("transcoder-")
    import dataclasses

    longer = dataclasses.replace(spec, transcoders=dataclasses.replace(
        spec.transcoders, train={**spec.transcoders.train, "n_train_tokens": 81920}))
    assert dictionary_id(longer, tc) != dictionary_id(spec, tc)  # the training config is in the id
    sae = next(m for m in spec.members() if m.kind == "sae")
    assert dictionary_id(longer, sae) == dictionary_id(spec, sae)


@pytest.mark.parametrize(
    "transcoders, message",
    [
        ({"pairs": [["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_ot"]]}, "did you mean blocks.1.hook_mlp_out"),
        ({"pairs": [["blocks.1.hook_resid_mid", "blocks.1.hook_resid_mid"]]}, "two different hooks"),
        ({"pairs": [["blocks.1.hook_resid_mid"]]}, "two different hooks"),
        ({"pairs": [["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]], "ks": [0]}, r"transcoders.ks\[0\]=0"),
        ({"pairs": [["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]], "skip": ["yes"]}, "expected true or false"),
        ({"pairs": [["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]], "train": {"batch_sise": 8}},
         "did you mean batch_size"),
    ],
)
def test_bad_transcoder_grids_fail_before_any_work(transcoders, message):
    from analysis.stages.validate import validate_suite

    hooks = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]
    with pytest.raises(ValueError, match=message):
        validate_suite(parse_suite({"name": "bad", "activations": {"hooks": hooks}, "transcoders": transcoders}))


@pytest.mark.parametrize("name, missing", [("clip_folder", "/path/to/"),
                                           ("dinov2_parquet", "/path/to/")])
def test_example_suites_parse_and_name_the_paths_to_set(name, missing):
    """The example suites for real models are valid YAML with every key known; only their
    placeholder paths stop them, and the error names the path to set."""
    from analysis.stages.validate import validate_suite

    spec = load_suite(Path(__file__).parents[1] / "pipelines" / "suites" / f"{name}.yaml")
    assert spec.members() and spec.vit_config().d_model in (384, 768)
    with pytest.raises((ValueError, FileNotFoundError), match=missing):
        validate_suite(spec)


def test_a_suite_over_its_store_size_limit_is_refused_naming_the_size():
    from analysis.stages.activations import store_bytes
    from analysis.stages.validate import validate_suite

    spec = load_suite(TINY)
    assert store_bytes(spec) == 800 * 18 * 32 * 2 * 4  # images x tokens (CLS, register, 16) x d x fp16 x hooks
    small = parse_suite({**_raw_tiny(), "activations": {**_raw_tiny()["activations"], "max_store_gb": 0.001}})
    assert small.store_id == spec.store_id  # the limit changes no stored value
    with pytest.raises(ValueError, match=r"would take 0.00369 GB .* over activations.max_store_gb=0.001"):
        validate_suite(small)


def _raw_tiny() -> dict:
    import yaml

    return {"name": "tiny", **{k: v for k, v in yaml.safe_load(TINY.read_text()).items() if k != "name"}}


def test_the_frontiers_suite_reuses_the_default_store_and_sweeps_every_architecture():
    """benchmarks/bench_frontiers.py --suite relies on it: nothing upstream of the dictionaries is
    redone after `make run`, and each architecture has at least four sparsities on both hooks."""
    from analysis.stages.validate import validate_suite

    suites = Path(__file__).parents[1] / "pipelines" / "suites"
    default, frontiers = load_suite(suites / "default.yaml"), load_suite(suites / "frontiers.yaml")
    assert (frontiers.dataset_id, frontiers.model_id, frontiers.store_id) == \
        (default.dataset_id, default.model_id, default.store_id)
    validate_suite(frontiers)
    members = frontiers.members()
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
            assert len([m for m in members if m.architecture == arch and m.hook == hook]) >= 4


def test_a_changed_default_learning_rate_or_warm_up_makes_new_dictionary_ids(monkeypatch):
    """Ids hash the learning rate and warm-up training uses, not the `None` a suite leaves them
    at: a changed default must retrain, never reuse weights trained under the old one."""
    from analysis.dictionaries.training import sae, schedule
    from analysis.stages.dictionaries import dictionary_id

    spec = load_suite(TINY)
    before = [dictionary_id(spec, m) for m in spec.members()]
    for module in (schedule, sae):  # TopK SAEs' default is a multiple of it (sae.topk_default_lr)
        monkeypatch.setattr(module, "default_lr", lambda width: 1e-3)
    after_lr = [dictionary_id(spec, m) for m in spec.members()]
    assert all(a != b for a, b in zip(before, after_lr))
    monkeypatch.undo()
    assert [dictionary_id(spec, m) for m in spec.members()] == before
    raw = _raw_tiny()
    raw["dictionaries"]["train"] = {k: v for k, v in raw["dictionaries"]["train"].items() if k != "warmup_steps"}
    unset = parse_suite(raw)
    warmup = {m.key: dictionary_id(unset, m) for m in unset.members() if m.kind == "sae"}
    raw["dictionaries"]["train"]["warmup_steps"] = 2  # what unset means here: 5 % of 40 steps
    explicit = parse_suite(raw)
    assert {m.key: dictionary_id(explicit, m) for m in explicit.members() if m.kind == "sae"} == warmup


def test_the_default_suites_saes_keep_their_measured_rate_and_init_not_topks_defaults():
    """TopK's defaults (4x rate, least-squares init) leave 28-40 % of the default suite's k = 8
    latents dead, so its suite files set the rate and init measured there: the shared default
    rate at width 256 and W_dec.T, which leaves their ids as they were before TopK's changed."""
    from analysis.dictionaries.training.sae import topk_default_lr
    from analysis.dictionaries.training.schedule import default_lr
    from analysis.stages.saes import train_config

    for name in ("default",):
        spec = load_suite(SUITES_DIR / f"{name}.yaml")
        for member in (m for m in spec.members() if m.kind == "sae"):
            cfg = train_config(spec, member, spec.vit_config().d_model)
            assert cfg.width == 256 and cfg.base_lr() == default_lr(256) == 0.0032
            assert cfg.encoder_init == "transpose" and "encoder_init" not in cfg.resolved()
            unset = type(cfg)(**{**spec.dictionaries.train, "lr": None, "encoder_init": None, "width": 256,
                                 "architecture": member.architecture, "k": member.k,
                                 "sparsity_coef": member.sparsity_coef})
            if member.architecture == "topk":  # what the suite would get without its settings
                assert unset.base_lr() == topk_default_lr(256) and unset.encoder_init == "least_squares"


def test_the_frontiers_suite_runs_every_architecture_at_its_own_defaults():
    """Its frontier is each architecture's as a user gets it: no rate or init is set."""
    from analysis.stages.saes import train_config

    spec = load_suite(SUITES_DIR / "frontiers.yaml")
    assert not {"lr", "encoder_init", "threshold_init"} & set(spec.dictionaries.train)
    for member in spec.members():
        cfg = train_config(spec, member, spec.vit_config().d_model)
        default = type(cfg)(width=cfg.width, architecture=member.architecture, k=member.k,
                            sparsity_coef=member.sparsity_coef)
        assert (cfg.base_lr(), cfg.encoder_init) == (default.base_lr(), default.encoder_init), member.key
