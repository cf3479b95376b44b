"""The pruning policy (ratio rounding, per-block normalisation, allocation), validation and the file formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from tests.head_pruning_fixtures import HEADS, SMALL, make_teacher
from tools.head_pruning_utils import (HeadImportance, PruningConfig, compute_head_importance,
                                      compute_head_importance_magnitude, create_pruning_config,
                                      validate_pruning_config)

# Six blocks, global attention in blocks 2 and 5 (ORION's pattern), 8 heads of 16 channels.
SIX = dict(img_size=112, patch_size=16, embed_dim=128, depth=6, num_heads=8, window_size=4,
           window_block_indexes=(0, 1, 3, 4), mlp_ratio=4 * 2 / 3, qkv_bias=True, pretrain_img_size=224,
           attn_impl="math")
DEAD_PER_BLOCK = [2, 6, 4, 6, 1, 5]  # 24 of 48 heads: ratio 0.5 keeps exactly the 24 live ones


def six_block_teacher_with_dead_heads() -> EVAViT:
    """Random teacher whose dead heads own only zeros (q/k/v rows, q/v bias entries, proj columns)."""
    torch.manual_seed(0)
    model = EVAViT(**SIX).eval()
    d = 16
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for layer, block in enumerate(model.blocks):
            for h in range(DEAD_PER_BLOCK[layer]):
                rows = slice(h * d, (h + 1) * d)
                attn = block.attn
                for weight in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.q_bias, attn.v_bias):
                    weight[rows] = 0.0
                attn.proj.weight[:, rows] = 0.0
    return model


def dead_heads_of(layer: int):
    return list(range(DEAD_PER_BLOCK[layer]))


def loss_on_features(outputs, batch):
    target = torch.linspace(-1, 1, outputs[0].numel()).view_as(outputs[0])
    return (outputs[0] - target).pow(2).mean()


@pytest.fixture(scope="module")
def importances():
    model = six_block_teacher_with_dead_heads()
    g = torch.Generator().manual_seed(3)
    loader = [torch.randn(1, 3, 112, 112, generator=g) for _ in range(2)]
    result = {"magnitude": compute_head_importance(model, "magnitude")}
    for method, extra in (("gradient", dict(loss_fn=loss_on_features)), ("entropy", dict(num_query_samples=None)),
                          ("activation", {})):
        result[method] = compute_head_importance(model, method, loader, progress=False, **extra)
    return result


@pytest.mark.parametrize("method", ["magnitude", "gradient", "entropy", "activation"])
def test_global_allocation_keeps_exactly_the_live_heads_with_every_method(importances, method):
    importance = importances[method]
    config = create_pruning_config(importance, pruning_ratio=0.5, strategy="global")
    for layer, kept in enumerate(config.selected_heads_per_layer):
        assert kept == [h for h in range(8) if h not in dead_heads_of(layer)], (method, layer)
    assert config.num_heads == [8 - n for n in DEAD_PER_BLOCK]


@pytest.mark.parametrize("method", ["magnitude", "gradient", "entropy", "activation"])
def test_global_allocation_ignores_each_block_s_score_scale_with_every_method(importances, method):
    """The ranking must follow importance within a block, not the block type (issue 14, defect 1)."""
    importance = importances[method]
    scores = importance.scores.clone()
    scores[:, :] += torch.rand(scores.shape, generator=torch.Generator().manual_seed(1)) * 1e-3  # no zeros, no ties
    scale = torch.tensor([1.0, 0.5, 40.0, 2.0, 0.1, 25.0], dtype=torch.float64)  # global blocks 2, 5 loudest
    plain = create_pruning_config(HeadImportance(scores, method), 0.5, "global")
    scaled = create_pruning_config(HeadImportance(scores * scale[:, None], method), 0.5, "global")
    assert scaled.selected_heads_per_layer == plain.selected_heads_per_layer
    assert scaled.metadata["block_normalization"] == "l2"
    normalized = scores / scores.norm(dim=1, keepdim=True)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for layer, heads in enumerate(plain.selected_heads_per_layer):
        kept[layer, heads] = True
    floor_blocks = [layer for layer, heads in enumerate(plain.selected_heads_per_layer) if len(heads) == 1]
    free = kept.clone()
    free[floor_blocks] = False  # outside the one-head floor every kept head outranks every removed one
    assert normalized[free].min() > normalized[~kept].max()


def test_global_allocation_without_normalisation_is_explicit_and_recorded():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    scores[2] *= 100.0
    raw = create_pruning_config(scores, 0.5, "global", block_normalization="none")
    assert raw.num_heads[2] == 16 and raw.metadata["block_normalization"] == "none"
    with pytest.raises(ValueError, match=r"block_normalization: expected one of \('l2', 'none'\), got 'max'"):
        create_pruning_config(scores, 0.5, "global", block_normalization="max")


def test_one_rounding_policy_for_non_integer_ratios():
    """0.3 of 16 heads: 11.2 kept per block rounds to 11 in every block (264 of 384 at depth 24)."""
    scores = torch.rand(24, 16, generator=torch.Generator().manual_seed(0))
    for strategy in ("uniform", "global"):
        with pytest.warns(UserWarning, match="not a whole number"):
            config = create_pruning_config(scores, 0.3, strategy)
        assert sum(config.num_heads) == 24 * 11
        assert validate_pruning_config(config, 24, 16, num_heads=config.num_heads, pruning_ratio=0.3) == list(config)
    with pytest.raises(ValueError, match=r"keeps 11 of 16 heads per block \(264 in total\), but the selection keeps 269"):
        validate_pruning_config([list(range(12))] * 5 + [list(range(11))] * 19, 24, 16, pruning_ratio=0.3)


def test_ratio_hint_names_the_other_reading_only_when_it_fits():
    twelve = [list(range(12))] * 4
    with pytest.raises(ValueError, match=r"that is pruning_ratio 0.25 in this code base"):
        validate_pruning_config(twelve, 4, 16, pruning_ratio=0.75)
    with pytest.raises(ValueError) as err:
        validate_pruning_config(twelve, 4, 16, pruning_ratio=0.5)
    assert "other reading" not in str(err.value)


# --------------------------------------------------------------------------- allocation and validation


def test_uniform_keeps_the_per_block_top_k():
    scores = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    scores[0, :] = 1.0  # ties go to the lower index
    for ratio, k in ((0.5, 8), (0.25, 12), (0.75, 4), (0.0, 16)):
        config = create_pruning_config(HeadImportance(scores, "test"), pruning_ratio=ratio)
        assert config.num_heads == [k] * 5 and config.strategy == "uniform"
        for l in range(1, 5):
            assert config.selected_heads_per_layer[l] == sorted(scores[l].topk(k).indices.tolist())
        assert config.selected_heads_per_layer[0] == list(range(k))
    assert config.to_model_kwargs()["num_heads"] == [16] * 5
    with pytest.warns(UserWarning, match="not a whole number"):
        rounded = create_pruning_config(scores, pruning_ratio=0.3)
    assert rounded.num_heads == [11] * 5 and rounded.metadata["effective_pruning_ratio"] == pytest.approx(5 / 16)


def test_global_keeps_the_exact_budget_and_the_floor():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 16, generator=g) * 0.01
    scores[:, :10] += 1.0  # five peaked blocks: 10 strong heads each (normalised ~0.32)
    scores[2] = 1.0 + torch.rand(16, generator=g) * 1e-3  # a flat block (normalised ~0.25): ranked below them
    for floor in (1, 3):
        config = create_pruning_config(scores, pruning_ratio=0.5, strategy="global", min_heads_per_layer=floor)
        assert sum(config.num_heads) == 6 * 8
        assert config.num_heads[2] == floor and min(config.num_heads) >= floor
        assert config.selected_heads_per_layer[2] == sorted(scores[2].topk(floor).indices.tolist())
        normalized = scores / scores.norm(dim=1, keepdim=True)
        kept = torch.zeros(6, 16, dtype=torch.bool)
        for l, hs in enumerate(config.selected_heads_per_layer):
            kept[l, hs] = True
        others = kept.clone()
        others[2] = False  # outside the floor block, kept heads outrank every removed head
        assert normalized[others].min() > normalized[~kept & (torch.arange(6)[:, None] != 2)].max()
    assert len(set(config.num_heads)) > 1  # non-uniform allocation


@pytest.mark.parametrize("selection, kwargs, match", [
    ([[0, 1]] * 2, {}, "expected 3 blocks"),
    ([[0, 1], [0, 8], [1, 2]], {}, r"indices in \[0, 8\)"),
    ([[0, 1], [-1, 2], [1, 2]], {}, r"indices in \[0, 8\)"),
    ([[0, 1], [2, 2], [1, 2]], {}, "duplicate"),
    ([[0, 1], [3, 2], [1, 2]], {}, "sorted"),
    ([[0, 1], [], [1, 2]], {}, "at least one head"),
    ([[0, 1], [0.5, 2], [1, 2]], {}, "integers"),
    ([[0, 1], 3, [1, 2]], {}, "list of head indices"),
    ("0,1", {}, "one list of head indices per block"),
    ([[0, 1], [0, 1], [1, 2]], dict(num_heads=3), "num_heads says 3"),
    ([[0, 1], [0, 1], [1, 2]], dict(num_heads=[2, 2]), "one count per block"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=0.75), "REMOVED"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=1.0), r"in \[0, 1\)"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=50), r"in \[0, 1\)"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=-0.1), r"in \[0, 1\)"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=True), r"in \[0, 1\)"),
])
def test_every_invalid_configuration_is_refused(selection, kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_pruning_config(selection, depth=3, teacher_num_heads=8, **kwargs)


def test_ratio_read_as_kept_fraction_fails_loudly_and_valid_ones_pass():
    twelve = [list(range(12))] * 24
    with pytest.raises(ValueError, match=r"REMOVED.*pruning_ratio 0.25.*other reading"):
        validate_pruning_config(twelve, depth=24, teacher_num_heads=16, num_heads=12, pruning_ratio=0.75)
    assert validate_pruning_config(twelve, 24, 16, num_heads=12, pruning_ratio=0.25) == twelve
    config = create_pruning_config(torch.rand(24, 16), 0.5, "global")
    assert validate_pruning_config(config, 24, 16, num_heads=config.num_heads, pruning_ratio=0.5) == list(config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pruning_ratio=0.97), "removes every head"),
    (dict(pruning_ratio=1.0), "REMOVED"),
    (dict(strategy="layerwise"), "strategy"),
    (dict(min_heads_per_layer=0), "min_heads_per_layer"),
    (dict(min_heads_per_layer=17), "min_heads_per_layer"),
    (dict(pruning_ratio=0.75, min_heads_per_layer=5), "fewer than min_heads_per_layer"),
    (dict(pruning_ratio=0.75, strategy="global", min_heads_per_layer=5), "fewer than the floor"),
])
def test_create_pruning_config_refuses_impossible_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_pruning_config(torch.rand(4, 16), **kwargs)


def test_scores_must_be_finite_and_two_dimensional():
    with pytest.raises(ValueError, match="NaN"):
        HeadImportance(torch.tensor([[1.0, float("nan")]]), "x")
    with pytest.raises(ValueError, match=r"\[layers, heads\]"):
        HeadImportance(torch.ones(4), "x")


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("ext", [".json", ".npz", ".pkl"])
def test_importance_save_load_round_trip(tmp_path, ext):
    imp = compute_head_importance_magnitude(make_teacher())
    path = tmp_path / f"sub/imp{ext}"
    imp.save(path)
    loaded = HeadImportance.load(path, allow_pickle=ext == ".pkl")
    assert torch.equal(loaded.scores, imp.scores)
    assert (loaded.method, loaded.num_samples, loaded.source) == (imp.method, imp.num_samples, imp.source)
    assert loaded.metadata["backbone"]["num_heads"] == HEADS
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_pickle_is_refused_without_the_flag_and_unknown_files_are_rejected(tmp_path):
    imp = HeadImportance(np.ones((2, 4)), "magnitude")
    imp.save(tmp_path / "imp.pkl")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        HeadImportance.load(tmp_path / "imp.pkl")
    with pytest.raises(ValueError, match="extension"):
        imp.save(tmp_path / "imp.txt")
    (tmp_path / "other.json").write_text(json.dumps({"scores": [[1]]}))
    with pytest.raises(ValueError, match="not a head importance file"):
        HeadImportance.load(tmp_path / "other.json")


def test_pruning_config_round_trip_builds_the_student(tmp_path):
    teacher = make_teacher()
    config = create_pruning_config(compute_head_importance_magnitude(teacher), 0.5, "global")
    config.save(tmp_path / "prune.json")
    loaded = PruningConfig.load(tmp_path / "prune.json")
    assert loaded == config
    student = EVAViTStudent(**SMALL, **loaded.to_model_kwargs())
    student.load_from_teacher(teacher.state_dict())
    assert student.selected_heads == config.selected_heads_per_layer
    payload = json.loads((tmp_path / "prune.json").read_text())
    payload["selected_heads_per_layer"][0] = [3, 3]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="duplicate"):
        PruningConfig.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------- kept blocks


def budgeted(**overrides) -> PruningConfig:
    """Four teacher blocks of 4 heads and 8 channels; blocks 1 and 2 removed ([] there, as the allocator writes)."""
    fields = dict(selected_heads_per_layer=[[0, 1], [], [], [2, 3]], teacher_num_heads=4, pruning_ratio=0.5,
                  selected_channels_per_layer=[[0, 5], [], [], [1, 7]], teacher_mlp_hidden=8, mlp_pruning_ratio=0.75,
                  selected_blocks=[0, 3])
    fields.update(overrides)
    return PruningConfig(**fields)


def test_kept_blocks_round_trip_and_older_files_keep_every_block(tmp_path):
    from mmcv.models.utils.pruning_config import load_pruning_selection
    config = budgeted()
    assert config.num_heads == [2, 0, 0, 2] and config.mlp_hidden == [2, 0, 0, 2] and config.kept_blocks == [0, 3]
    config.save(tmp_path / "budget.json")
    loaded = PruningConfig.load(tmp_path / "budget.json")
    assert loaded == config and loaded.to_model_kwargs()["selected_blocks"] == [0, 3]
    selection = load_pruning_selection(str(tmp_path / "budget.json"), teacher_num_heads=4, teacher_mlp_hidden=8)
    assert selection.blocks == [0, 3] and selection.heads == [[0, 1], [], [], [2, 3]]
    assert not selection.budgeted  # no metadata.budget: chosen by ratios, checked against kd_config's
    budget = budgeted(metadata=dict(budget=dict(target_speedup=2.0)))
    assert load_pruning_selection(budget).budgeted and load_pruning_selection(budget.to_dict()).budgeted
    payload = json.loads((tmp_path / "budget.json").read_text())
    del payload["selected_blocks"], payload["selected_channels_per_layer"]
    older = dict(payload, version=2, selected_heads_per_layer=[[0, 1]] * 4, num_heads=[2] * 4,
                 teacher_mlp_hidden=None, mlp_pruning_ratio=None, mlp_hidden=None)
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert PruningConfig.load(tmp_path / "older.json").selected_blocks is None
    assert load_pruning_selection(str(tmp_path / "older.json")).blocks is None
    assert "selected_blocks" not in PruningConfig.load(tmp_path / "older.json").to_model_kwargs()
    # a ratio counts the kept blocks only: 2 of 4 heads in each of the 2 kept blocks is 0.5
    assert validate_pruning_config(config, depth=4, teacher_num_heads=4, pruning_ratio=0.5) == \
        [[0, 1], [], [], [2, 3]]


@pytest.mark.parametrize("blocks, match", [
    ([3, 0], r"budget.json: selected_blocks: expected sorted indices, got \[3, 0\]"),
    ([0, 4], r"budget.json: selected_blocks: expected indices in \[0, 4\) \(the teacher's depth\), got \[4\]"),
    ([], r"budget.json: selected_blocks: at least one block must be kept, got \[\]"),
    ([0, 0, 3], r"budget.json: selected_blocks: duplicate block indices in \[0, 0, 3\]"),
    ("0,3", r"budget.json: selected_blocks: expected a sorted list of teacher block indices or None, got str"),
    ([0, 1, 3], r"budget.json: num_heads\[1\]: expected 1..4 \(teacher_num_heads\), got 0"),  # block 1 is kept now
])
def test_bad_kept_blocks_in_a_file_name_the_file_and_the_key(tmp_path, blocks, match):
    budgeted().save(tmp_path / "budget.json")
    payload = json.loads((tmp_path / "budget.json").read_text())
    (tmp_path / "budget.json").write_text(json.dumps(dict(payload, selected_blocks=blocks)))
    with pytest.raises(ValueError, match=match):
        PruningConfig.load(tmp_path / "budget.json")


def test_empty_entries_are_accepted_for_removed_blocks_only():
    from mmcv.models.utils.pruning_config import validate_channel_selection
    heads = [[0, 1], [], [], [2, 3]]
    with pytest.raises(ValueError, match=r"selected_heads_per_layer\[1\]: at least one head must be kept, got \[\]"):
        validate_pruning_config(heads, depth=4, teacher_num_heads=4)
    assert validate_pruning_config(heads, depth=4, teacher_num_heads=4, selected_blocks=[0, 3]) == heads
    assert validate_pruning_config([[0], [1], [2], [3]], depth=4, teacher_num_heads=4,
                                   selected_blocks=[0, 3]) == [[0], [], [], [3]]  # removed entries are ignored
    with pytest.raises(ValueError, match=r"selected_channels_per_layer\[3\]: at least one channel must be kept"):
        validate_channel_selection([[0], [], [], []], depth=4, teacher_hidden=8, selected_blocks=[0, 3])
    with pytest.raises(ValueError, match=r"pruning_ratio 0.5 is the fraction of heads REMOVED: it keeps 2 of 4 heads "
                                         r"per block \(4 in total\), but the selection keeps 3"):
        validate_pruning_config([[0, 1], [], [], [2]], depth=4, teacher_num_heads=4, pruning_ratio=0.5,
                                selected_blocks=[0, 3])
