"""SwiGLU-width pruning of EVAViTStudent: exactness with every channel kept, slicing against an independent
reference (ffn_ln over the kept channels), pruned != masked, the channel index on load, ORION-L counts."""
from __future__ import annotations

import random

import pytest
import torch

from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.builder import build_backbone
from tests.eva_reference import masked_teacher_mask, reference_forward, reference_macs, reference_param_count

SMALL = dict(img_size=112, patch_size=16, embed_dim=128, depth=3, window_size=4, window_block_indexes=(0, 1),
             mlp_ratio=4 * 2 / 3, qkv_bias=True, pretrain_img_size=224)
HEADS, HIDDEN = 8, 341  # int(128 * 8 / 3)


def make_teacher(seed: int = 0) -> EVAViT:
    torch.manual_seed(seed)
    model = EVAViT(**SMALL, num_heads=HEADS).eval()
    with torch.no_grad():  # non-trivial biases and norms so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_channels(seed: int, counts):
    rng = random.Random(seed)
    return [sorted(rng.sample(range(HIDDEN), n)) for n in counts]


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(11))


def test_every_channel_kept_is_exactly_todays_backbone(image):
    teacher = make_teacher()
    explicit = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, mlp_hidden=HIDDEN,
                             selected_channels_per_layer=[list(range(HIDDEN))] * 3).eval()
    explicit.load_from_teacher(teacher.state_dict())
    assert not explicit.prunes_channels and explicit.mlp_hidden_per_layer == [HIDDEN] * 3
    assert (explicit(image)[0] - teacher(image)[0]).abs().max().item() <= 1e-6
    # ORION's keys (no index buffers) load strictly into an unpruned student
    assert not explicit.load_state_dict(teacher.state_dict(), strict=True).missing_keys


@pytest.mark.parametrize("heads, channels", [
    ([8, 8, 8], [200, 200, 200]),
    ([4, 4, 4], [192, 192, 192]),
    ([2, 7, 5], [1, 300, 77]),
])
def test_pruned_channels_equal_an_independent_reference_with_ffn_ln_over_the_kept_channels(image, heads, channels):
    teacher = make_teacher(seed=1)
    head_sel = [sorted(random.Random(10 + i).sample(range(HEADS), n)) for i, n in enumerate(heads)]
    channel_sel = random_channels(sum(channels), channels)
    student = EVAViTStudent(**SMALL, num_heads=heads, teacher_num_heads=HEADS, selected_heads_per_layer=head_sel,
                            mlp_hidden=channels, selected_channels_per_layer=channel_sel).eval()
    report = student.load_from_teacher(teacher.state_dict())
    assert report["teacher_mlp_hidden"] == HIDDEN
    assert student.selected_channels == channel_sel and student.mlp_hidden_per_layer == channels
    expected = reference_forward(teacher.state_dict(), image, depth=3, num_heads=HEADS, patch_size=16, window_size=4,
                                 window_block_indexes=(0, 1), img_size=112, kept_channels=channel_sel,
                                 head_mask=masked_teacher_mask(3, HEADS, head_sel))
    assert (student(image)[0].double() - expected).abs().max().item() <= 1e-5


def test_pruned_is_not_masked_because_ffn_ln_sees_fewer_channels(image):
    teacher = make_teacher(seed=2)
    channel_sel = random_channels(3, [170, 170, 170])
    student = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, mlp_hidden=170,
                            selected_channels_per_layer=channel_sel).eval()
    student.load_from_teacher(teacher.state_dict())
    masks = []
    for kept in channel_sel:
        mask = torch.zeros(HIDDEN, dtype=torch.float64)
        mask[kept] = 1.0
        masks.append(mask)
    masked = reference_forward(teacher.state_dict(), image, depth=3, num_heads=HEADS, patch_size=16, window_size=4,
                               window_block_indexes=(0, 1), img_size=112, channel_mask=masks)
    assert (student(image)[0].double() - masked).abs().max().item() > 1e-2


def test_sliced_tensors_are_the_teachers_rows_entries_and_columns():
    teacher = make_teacher(seed=3)
    channel_sel = random_channels(4, [100, 50, 341])
    student = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, mlp_hidden=[100, 50, 341],
                            selected_channels_per_layer=channel_sel)
    student.load_from_teacher(teacher.state_dict())
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(s_sd) - set(t_sd) == {f"blocks.{i}.{kind}" for i in range(3)
                                     for kind in ("attn.head_index", "mlp.channel_index")} | {"kept_blocks"}
    for layer, kept in enumerate(channel_sel):
        p = f"blocks.{layer}.mlp."
        index = torch.tensor(kept)
        for name in ("w1.weight", "w1.bias", "w2.weight", "w2.bias", "ffn_ln.weight", "ffn_ln.bias"):
            assert torch.equal(s_sd[p + name], t_sd[p + name][index]), name
        assert torch.equal(s_sd[p + "w3.weight"], t_sd[p + "w3.weight"][:, index])
        assert torch.equal(s_sd[p + "w3.bias"], t_sd[p + "w3.bias"])  # shared by every channel
        assert s_sd[p + "channel_index"].tolist() == kept
        assert student.blocks[layer].mlp.ffn_ln.normalized_shape == (len(kept),)


def test_channel_index_is_checked_on_load_and_a_pruned_mlp_without_it_is_refused():
    sel_a = random_channels(5, [64, 64, 64])
    a = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, mlp_hidden=64, selected_channels_per_layer=sel_a)
    sd = a.state_dict()
    sel_b = [sel_a[0], random_channels(6, [64])[0], sel_a[2]]
    b = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, mlp_hidden=64, selected_channels_per_layer=sel_b)
    with pytest.raises(RuntimeError, match=r"blocks.1.mlp.channel_index: checkpoint keeps teacher channels 64 indices "
                                           r"\[\d+, \d+, \.\.\., \d+\] \(sum \d+\), this model keeps 64 indices"):
        b.load_state_dict(sd)
    anonymous = {k: v for k, v in sd.items() if k != "blocks.2.mlp.channel_index"}
    for strict in (True, False):  # refused by a non-strict load too
        with pytest.raises(RuntimeError, match=r"^blocks.2.mlp.channel_index: the checkpoint holds blocks.2.mlp.\* "
                                               r"tensors without blocks.2.mlp.channel_index"):
            a.load_state_dict(anonymous, strict=strict)
    assert not a.load_state_dict(sd, strict=True).missing_keys


def test_load_from_teacher_refuses_a_source_whose_mlps_are_already_pruned():
    pruned = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, mlp_hidden=[HIDDEN, HIDDEN, HIDDEN]
                           ).state_dict()
    pruned["blocks.1.mlp.channel_index"] = torch.arange(10)
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, mlp_hidden=64)
    with pytest.raises(ValueError, match=r"blocks.1.mlp.channel_index says this source is already pruned to 10 hidden "
                                         r"channels"):
        student.load_from_teacher(pruned)
    narrow = make_teacher().state_dict()
    narrow["blocks.0.mlp.w3.weight"] = narrow["blocks.0.mlp.w3.weight"][:, :300]
    with pytest.raises(ValueError, match=r"blocks.0.mlp.w3.weight: expected 341 channels along dim 1 \(teacher "
                                         r"layout\), got shape \(128, 300\)"):
        student.load_from_teacher(narrow)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mlp_hidden=0), r"mlp_hidden\[0\]: expected 1..341 \(the teacher's MLP width\), got 0"),
    (dict(mlp_hidden=[64, 64]), r"mlp_hidden: expected one count per block \(3\), got 2"),
    (dict(mlp_hidden=64, selected_channels_per_layer=[list(range(64))] * 2),
     r"selected_channels_per_layer: expected 3 blocks, got 2"),
    (dict(mlp_hidden=2, selected_channels_per_layer=[[0, 341]] * 3), r"expected indices in \[0, 341\)"),
    (dict(mlp_hidden=2, selected_channels_per_layer=[[5, 1]] * 3), "expected sorted indices"),
    (dict(mlp_hidden=2, selected_channels_per_layer=[[1, 1]] * 3), "duplicate channel indices"),
    (dict(mlp_hidden=3, selected_channels_per_layer=[[0, 1]] * 3), "keeps 2 channels but mlp_hidden says 3"),
    (dict(selected_channels_per_layer=[[0, 1]] * 3), "keeps 2 channels but mlp_hidden says 341"),
])
def test_invalid_channel_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, **kwargs)


def test_evavit_the_teacher_alias_takes_no_channel_selection():
    with pytest.raises(TypeError, match="takes no 'mlp_hidden'"):
        EVAViT(**SMALL, num_heads=HEADS, mlp_hidden=64)


def test_orion_l_joint_student_counts_and_the_issues_ceilings_on_meta_device():
    orion_l = dict(img_size=640, patch_size=16, window_size=16, embed_dim=1024, depth=24, mlp_ratio=4 * 2 / 3,
                   window_block_indexes=[i for i in range(24) if i % 3 != 2])
    with torch.device("meta"):
        teacher = build_backbone(dict(type="EVAViT", num_heads=16, **orion_l))
        student = build_backbone(dict(type="EVAViTStudent", num_heads=8, teacher_num_heads=16, mlp_hidden=1536,
                                      **orion_l))
    s_sd = student.state_dict()
    assert s_sd["blocks.3.mlp.w1.weight"].shape == (1536, 1024) and s_sd["blocks.3.mlp.w3.weight"].shape == (1024, 1536)
    assert s_sd["blocks.3.mlp.ffn_ln.bias"].shape == (1536,) and s_sd["blocks.3.mlp.w3.bias"].shape == (1024,)
    geometry = dict(embed_dim=1024, depth=24, head_dim=64, patch_size=16, pos_tokens=197)
    assert sum(p.numel() for p in student.parameters()) == reference_param_count(
        heads_per_block=[8] * 24, mlp_hidden=[1536] * 24, **geometry)
    windows = [16 if i % 3 != 2 else 0 for i in range(24)]
    macs = dict(img_hw=(640, 640), patch_size=16, in_chans=3, embed_dim=1024, head_dim=64, window_per_block=windows)
    assert student.analytic_macs() == reference_macs(heads_per_block=[8] * 24, mlp_hidden=1536, **macs)
    full = reference_macs(heads_per_block=[16] * 24, mlp_hidden=2730, **macs)
    assert teacher.analytic_macs() == full
    # the issue's analytic ceilings with 8 heads kept: MLP 2048 -> 1.57x, 1536 -> 1.87x, 1365 -> 2.00x
    for hidden, ceiling in ((2048, 1.57), (1536, 1.87), (1365, 2.00)):
        assert round(full / reference_macs(heads_per_block=[8] * 24, mlp_hidden=hidden, **macs), 2) == ceiling
