"""Depth pruning of EVAViTStudent: the kept blocks are the teacher's blocks (exactly), recorded and checked on load."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mmcv.models.backbones.eva_layers import SelectionMismatchError
from mmcv.models.backbones.eva_taps import default_block_map, resolve_block_maps
from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.eva_cost import analytic_backbone_macs

HEADS = 4
DEPTH = 6
WINDOWS = (0, 1, 3, 4)  # ORION's pattern in miniature: two window blocks, then a global one
SMALL = dict(img_size=64, patch_size=16, embed_dim=64, depth=DEPTH, window_size=2, window_block_indexes=WINDOWS,
             mlp_ratio=4 * 2 / 3, qkv_bias=True, pretrain_img_size=64, attn_impl="math")
KEPT = [0, 2, 3, 5]  # removes window block 1 and window block 4


class Skip(nn.Module):
    """Stands in for a removed teacher block: returns its input unchanged (same call signature as EVABlock)."""

    def forward(self, x, head_mask=None, taps=None, block_index=-1):
        return x


def make_teacher(seed: int = 0, **overrides) -> EVAViT:
    torch.manual_seed(seed)
    model = EVAViT(**dict(SMALL, num_heads=HEADS, **overrides)).eval()
    with torch.no_grad():  # non-trivial biases and norms so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def student(**kwargs) -> EVAViTStudent:
    return EVAViTStudent(**dict(SMALL, num_heads=kwargs.pop("num_heads", HEADS), teacher_num_heads=HEADS),
                         **kwargs).eval()


def skipping(model: EVAViTStudent, kept) -> EVAViTStudent:
    """``model`` with every block outside ``kept`` replaced by :class:`Skip`."""
    for i in range(len(model.blocks)):
        if i not in kept:
            model.blocks[i] = Skip()
    return model


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(7)
    return torch.randn(2, 3, 64, 64)


def test_all_blocks_kept_is_the_teacher_bit_for_bit(image):
    teacher = make_teacher()
    for blocks in (None, list(range(DEPTH))):
        model = student(selected_blocks=blocks)
        model.load_from_teacher(teacher.state_dict())
        assert model.kept_blocks == tuple(range(DEPTH)) and model.num_blocks == DEPTH and not model.prunes_blocks
        assert torch.equal(model(image)[0], teacher(image)[0])
        assert model.state_dict()["kept_blocks"].tolist() == list(range(DEPTH))
    assert "kept_blocks" not in teacher.state_dict()  # the teacher alias keeps ORION's keys exactly
    with pytest.raises(TypeError, match="EVAViT \\(the unpruned teacher\\) takes no 'selected_blocks'"):
        EVAViT(**SMALL, num_heads=HEADS, selected_blocks=[0, 1])


def test_depth_pruned_student_is_the_teacher_with_the_removed_blocks_skipped(image):
    teacher = make_teacher()
    model = student(selected_blocks=KEPT)
    report = model.load_from_teacher(teacher.state_dict())
    assert report["kept_blocks"] == KEPT and model.num_blocks == 4 and model.depth == DEPTH
    assert sorted(k.split(".")[1] for k in model.state_dict() if k.endswith("q_proj.weight")) == ["0", "1", "2", "3"]
    expected = skipping(make_teacher(), KEPT)(image)[0]
    assert torch.equal(model(image)[0], expected)
    for j, t in enumerate(KEPT):  # student block j is teacher block KEPT[j], tensor by tensor
        own = model.blocks[j].state_dict()
        for key, value in teacher.blocks[t].state_dict().items():
            assert torch.equal(own[key], value), (j, t, key)


def test_depth_heads_and_channels_pruned_together_equal_the_width_pruned_student_with_blocks_skipped(image):
    teacher = make_teacher(seed=3)
    heads = [[0, 2], [1], [0, 1, 3], [2, 3], [0], [1, 2]]
    channels = [sorted(torch.randperm(170, generator=torch.Generator().manual_seed(i))[:64].tolist())
                for i in range(DEPTH)]
    wide = student(num_heads=[len(h) for h in heads], selected_heads_per_layer=heads, mlp_hidden=64,
                   selected_channels_per_layer=channels)
    wide.load_from_teacher(teacher.state_dict())
    budgeted_heads = [h if i in KEPT else [] for i, h in enumerate(heads)]  # a budgeted file writes [] / 0 there
    budgeted_channels = [c if i in KEPT else [] for i, c in enumerate(channels)]
    model = student(num_heads=[len(h) for h in budgeted_heads], selected_heads_per_layer=budgeted_heads,
                    mlp_hidden=[len(c) for c in budgeted_channels], selected_channels_per_layer=budgeted_channels,
                    selected_blocks=KEPT)
    model.load_from_teacher(teacher.state_dict())
    assert model.selected_heads == [heads[t] for t in KEPT] and model.num_heads_per_layer == [2, 3, 2, 2]
    assert model.selected_channels == [channels[t] for t in KEPT] and model.mlp_hidden_per_layer == [64] * 4
    assert torch.equal(model(image)[0], skipping(wide, KEPT)(image)[0])
    with pytest.raises(ValueError, match=r"selected_heads_per_layer\[2\]: at least one head must be kept, got \[\]"):
        student(num_heads=2, selected_heads_per_layer=[[0, 1], [], [], [0, 1], [], [0, 1]],
                selected_blocks=KEPT)
    with pytest.raises(ValueError, match=r"num_heads\[3\]: expected 1..4 \(teacher_num_heads\), got 0"):
        student(num_heads=[2, 0, 2, 0, 0, 2], selected_blocks=KEPT)


def test_each_kept_block_keeps_its_teacher_kind_rope_and_drop_path_rate():
    model = student(selected_blocks=[1, 2, 5], drop_path_rate=0.5)
    teacher = make_teacher(drop_path_rate=0.5)
    assert [b.window_size for b in model.blocks] == [teacher.blocks[t].window_size for t in (1, 2, 5)] == [2, 0, 0]
    assert [b.attn.rope is model.rope_win for b in model.blocks] == [True, False, False]
    for j, t in enumerate((1, 2, 5)):
        assert model.blocks[j].drop_path.drop_prob == pytest.approx(teacher.blocks[t].drop_path.drop_prob)
        assert torch.equal(model.blocks[j].attn.rope.freqs_cos, teacher.blocks[t].attn.rope.freqs_cos)


def test_analytic_macs_count_the_kept_blocks_only():
    heads = [[0, 1]] * DEPTH
    model = student(num_heads=2, selected_heads_per_layer=heads, selected_blocks=KEPT)
    expected = analytic_backbone_macs((64, 64), 16, 3, 64, [170] * 4, 16, [2] * 4, [2, 0, 2, 0])
    assert model.analytic_macs() == expected
    full = student(num_heads=2, selected_heads_per_layer=heads)
    removed = analytic_backbone_macs((64, 64), 16, 3, 64, [170] * 2, 16, [2] * 2, [2, 2]) - \
        analytic_backbone_macs((64, 64), 16, 3, 64, [], 16, [], [])
    assert full.analytic_macs() - model.analytic_macs() == removed > 0


def test_kept_blocks_are_recorded_and_checked_on_load():
    a = student(selected_blocks=KEPT)
    sd = a.state_dict()
    assert sd["kept_blocks"].dtype == torch.int64 and sd["kept_blocks"].tolist() == KEPT
    other = student(selected_blocks=[0, 1, 2, 5])
    for strict in (True, False):  # raises even where a non-strict load would only collect the message
        with pytest.raises(SelectionMismatchError, match=r"^kept_blocks: checkpoint keeps teacher blocks \[0, 2, 3, 5\], "
                                                         r"this model keeps \[0, 1, 2, 5\]; build"):
            other.load_state_dict(sd, strict=strict)
    anonymous = {k: v for k, v in sd.items() if k != "kept_blocks"}
    for strict in (True, False):
        with pytest.raises(SelectionMismatchError, match=r"^kept_blocks: the checkpoint holds \* tensors without "
                                                         r"kept_blocks"):
            student(selected_blocks=KEPT).load_state_dict(anonymous, strict=strict)
    assert not student(selected_blocks=KEPT).load_state_dict(sd, strict=True).missing_keys
    full = student()  # every block kept: an older checkpoint (no kept_blocks) loads
    older = {k: v for k, v in full.state_dict().items() if k != "kept_blocks"}
    result = full.load_state_dict(older, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(SelectionMismatchError, match=r"^kept_blocks: checkpoint keeps teacher blocks \[0, 1, 2, 3, 4, "
                                                     r"5\], this model keeps \[0, 2, 3, 5\]"):
        student(selected_blocks=KEPT).load_state_dict(full.state_dict(), strict=False)


def test_load_from_teacher_refuses_a_depth_pruned_source_and_another_depth():
    pruned = student(selected_blocks=KEPT)
    with pytest.raises(ValueError, match=r"kept_blocks says this source keeps only blocks \[0, 2, 3, 5\]"):
        student(selected_blocks=KEPT).load_from_teacher(pruned.state_dict())
    deeper = EVAViT(**dict(SMALL, depth=7), num_heads=HEADS).state_dict()
    with pytest.raises(ValueError, match=r"the teacher backbone has 7 blocks, expected depth 6"):
        student(selected_blocks=KEPT).load_from_teacher(deeper)


@pytest.mark.parametrize("blocks, match", [
    ([], r"selected_blocks: at least one block must be kept, got \[\]"),
    ([0, 6], r"selected_blocks: expected indices in \[0, 6\) \(the teacher's depth\), got \[6\]"),
    ([2, 1], r"selected_blocks: expected sorted indices, got \[2, 1\]"),
    ([1, 1], r"selected_blocks: duplicate block indices in \[1, 1\]"),
    ([0, True], r"selected_blocks: expected integer block indices"),
    ("0,1", r"selected_blocks: expected a sorted list of teacher block indices or None, got str"),
])
def test_bad_block_selections_are_refused(blocks, match):
    with pytest.raises(ValueError, match=match):
        student(selected_blocks=blocks)


def test_default_block_map_and_overrides():
    assert default_block_map(6, KEPT) == {0: 0, 1: 0, 2: 2, 3: 3, 4: 3, 5: 5}
    assert default_block_map(4, [2, 3]) == {0: 2, 1: 2, 2: 2, 3: 3}  # nothing kept before: the first kept block
    hidden, attn = resolve_block_maps(6, KEPT, WINDOWS, {4: 0})
    assert hidden[4] == 0 and attn == {0: 0, 2: 2, 3: 3, 5: 5, 4: 0}
    with pytest.raises(ValueError, match=r"block_map\[4\] = 2: teacher block 4 is a window block, block 2 a global "
                                         r"block; their attention cannot be paired"):
        resolve_block_maps(6, KEPT, WINDOWS, {4: 2})
    with pytest.raises(ValueError, match=r"block_map\[4\]: expected one of the kept blocks \[0, 2, 3, 5\], got 1"):
        resolve_block_maps(6, KEPT, WINDOWS, {4: 1})
    with pytest.raises(ValueError, match=r"block_map: teacher block 9 out of range \[0, 6\)"):
        resolve_block_maps(6, KEPT, WINDOWS, {9: 0})


def test_taps_are_keyed_by_teacher_block(image):
    teacher = make_teacher()
    model = student(selected_blocks=KEPT, num_heads=2, selected_heads_per_layer=[[1, 3]] * DEPTH)
    model.load_from_teacher(teacher.state_dict())
    taps = model.forward_with_taps(image, hidden_blocks=[1, 2, 4, 5], attn_blocks=[1, 3, 4], num_query_samples=3)
    assert sorted(taps.hidden_states) == [1, 2, 4, 5] and taps.attn_blocks == (3,)  # removed 1 and 4: dropped
    reference = model.forward_with_taps(image, hidden_blocks=[0, 3])  # the kept blocks' own outputs
    assert torch.equal(taps.hidden_states[1], reference.hidden_states[0])  # 1 -> last kept block before it, 0
    assert torch.equal(taps.hidden_states[4], reference.hidden_states[3])
    assert taps.head_map[3] == [1, 3] and len(taps.head_map) == DEPTH
    mapped = model.forward_with_taps(image, attn_blocks=[3, 4], num_query_samples=3, block_map={4: 0},
                                     query_index={3: taps.query_index[3]})
    assert mapped.attn_blocks == (3, 4) and torch.equal(mapped.attn_logits[3], taps.attn_logits[3])
    own = model.forward_with_taps(image, attn_blocks=[0], query_index={0: mapped.query_index[4]})
    assert torch.equal(mapped.attn_logits[4], own.attn_logits[0])  # teacher block 4's attention from kept block 0
    full = teacher.forward_with_taps(image, attn_blocks=[1, 3, 4], query_index=taps.query_index)
    assert full.attn_blocks == (1, 3, 4) and full.head_map[3] == list(range(HEADS))  # the teacher records every block
    with pytest.raises(ValueError, match=r"hidden_blocks: expected teacher block indices in \[0, 6\), got \[6\]"):
        model.forward_with_taps(image, hidden_blocks=[6])
