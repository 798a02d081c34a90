"""Token selection against a naive per-position list of token kinds."""

import itertools

import pytest
import torch

from analysis.activations.tokens import TOKEN_SELECTIONS, TokenGroups, select_tokens
from analysis.models.config import ViTConfig


def _config(class_token: bool, n_registers: int) -> ViTConfig:
    return ViTConfig(image_size=12, patch_size=4, in_chans=1, d_model=8, n_layers=1, n_heads=2, d_mlp=16,
                     n_classes=3, class_token=class_token, n_registers=n_registers,
                     pool="cls" if class_token else "mean")


def _kinds(cfg: ViTConfig) -> list[str]:
    """The model's token axis, one entry per position, as analysis.models.vit lays it out."""
    return ["cls"] * cfg.class_token + ["registers"] * cfg.n_registers + ["patches"] * 9


WANTED = {"all": {"cls", "registers", "patches"}, "cls": {"cls"}, "patches": {"patches"},
          "no_registers": {"cls", "patches"}}


@pytest.mark.parametrize("class_token,n_registers,selection",
                         list(itertools.product([True, False], [0, 1, 4], TOKEN_SELECTIONS)))
def test_kept_positions_and_groups_match_the_models_token_kinds(class_token, n_registers, selection):
    cfg = _config(class_token, n_registers)
    kinds = _kinds(cfg)
    if selection == "cls" and not class_token:
        with pytest.raises(ValueError, match="no class token.*'patches' or 'all'"):
            select_tokens(cfg, selection)
        return
    sel = select_tokens(cfg, selection)
    kept = list(range(len(kinds)))[sel.keep] if isinstance(sel.keep, slice) else list(sel.keep)
    assert kept == [i for i, k in enumerate(kinds) if k in WANTED[selection]]  # in model order
    stored = [kinds[i] for i in kept]
    g = sel.groups
    assert g.n_tokens == len(stored) and g.patch_grid == (3, 3)
    for kind in ("cls", "registers", "patches"):
        span = g.positions(kind)
        expected = [i for i, k in enumerate(stored) if k == kind]
        assert (list(range(len(stored)))[span] if span else []) == expected, kind


def test_registers_dropped_is_not_contiguous_only_with_a_class_token_and_registers():
    assert select_tokens(_config(True, 4), "no_registers").keep == (0, *range(5, 14))
    assert select_tokens(_config(False, 4), "no_registers").keep == slice(4, 13)
    assert select_tokens(_config(True, 0), "no_registers").keep == slice(0, 10)


def test_groups_round_trip_and_bad_names():
    g = select_tokens(_config(True, 2), "all").groups
    assert TokenGroups.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="token kind 'patch'"):
        g.positions("patch")
    with pytest.raises(ValueError, match="token selection 'registers_dropped'.*no_registers"):
        select_tokens(_config(True, 2), "registers_dropped")


def test_a_patch_sample_is_a_pure_function_of_the_image_index():
    vit = ViTConfig(image_size=64, patch_size=16, in_chans=1, d_model=32, n_layers=2, n_heads=2, d_mlp=64,
                    n_classes=3, n_registers=1)
    sel = select_tokens(vit, "all", patches_sample=5)
    assert sel.groups == TokenGroups((0, 1), (1, 2), (2, 7), (4, 4)) and sel.keep == slice(0, 18)
    rows = sel.positions_for([3, 8, 3])
    assert rows.shape == (3, 7) and torch.equal(rows[0], rows[2])  # the index alone decides
    assert torch.equal(sel.positions_for([8])[0], rows[1])  # whatever batch it comes in
    for row in rows:
        assert row[:2].tolist() == [0, 1]  # class token and register first
        patches = row[2:].tolist()
        assert patches == sorted(set(patches)) and all(2 <= p < 18 for p in patches)
    assert len({tuple(r) for r in sel.positions_for(range(50)).tolist()}) > 40  # images differ
    only = select_tokens(vit, "no_registers", patches_sample=3)
    assert only.groups.patches == (1, 4) and only.positions_for([0])[0, 0] == 0
    assert 1 not in only.positions_for(range(20)).flatten().tolist()  # the register stays out
    for bad in (0, 16):
        with pytest.raises(ValueError, match="sample between 1 and 15"):
            select_tokens(vit, "all", patches_sample=bad)
    with pytest.raises(ValueError, match="keeps patches"):
        select_tokens(vit, "cls", patches_sample=3)
