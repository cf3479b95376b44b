"""EVAViTStudent: exact equivalence with ORION's arithmetic, exact pruning, loading, taps, training modes."""
from __future__ import annotations

import random

import pytest
import torch

from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_layers import SelectionMismatchError
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.builder import build_backbone
from tests.eva_reference import masked_teacher_mask, reference_forward

SMALL = dict(img_size=112, patch_size=16, embed_dim=128, depth=3, window_size=4, window_block_indexes=(0, 1),
             mlp_ratio=4 * 2 / 3, qkv_bias=True, pretrain_img_size=224)
HEADS = 8
ORION_L = dict(img_size=640, patch_size=16, window_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
               mlp_ratio=4 * 2 / 3, qkv_bias=True, drop_path_rate=0.3, flash_attn=True, with_cp=True, frozen=False,
               window_block_indexes=[i for i in range(24) if i % 3 != 2])


def make_teacher(seed: int = 0, **overrides) -> EVAViT:
    torch.manual_seed(seed)
    cfg = dict(SMALL, num_heads=HEADS, **overrides)
    model = EVAViT(**cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ref(model_sd, img, subln=False, head_mask=None):
    return reference_forward(model_sd, img, depth=SMALL["depth"], num_heads=HEADS, patch_size=16,
                             window_size=SMALL["window_size"], window_block_indexes=SMALL["window_block_indexes"],
                             subln=subln, head_mask=head_mask, img_size=SMALL["img_size"])


def random_selection(rng: random.Random, counts):
    return [sorted(rng.sample(range(HEADS), n)) for n in counts]


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(123)
    return torch.randn(2, 3, 112, 112)


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_teacher_equals_independent_reference_with_padding_and_pos_resize(image, attn_impl):
    teacher = make_teacher(attn_impl=attn_impl)
    out = teacher(image)
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (2, 128, 7, 7)
    expected = ref(teacher.state_dict(), image)
    assert (out[0].double() - expected).abs().max().item() <= 1e-5


def test_full_student_loads_orion_keys_unchanged_and_equals_the_reference(image):
    teacher = make_teacher()
    expected = ref(teacher.state_dict(), image)
    student = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS).eval()
    result = student.load_state_dict(teacher.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert (student(image)[0].double() - expected).abs().max().item() <= 1e-5
    other = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS).eval()
    report = other.load_from_teacher({"state_dict": {"module.img_backbone." + k: v
                                                     for k, v in teacher.state_dict().items()}})
    assert report["sliced"] == 0 and report["copied"] == len(teacher.state_dict())  # nothing to cut
    assert (other(image)[0].double() - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("counts", [[4, 4, 4], [1, 5, 7], [8, 2, 3]])
def test_pruned_student_equals_teacher_with_other_heads_masked(image, counts):
    teacher = make_teacher(seed=1)
    selection = random_selection(random.Random(sum(counts)), counts)
    student = EVAViTStudent(**SMALL, num_heads=counts, teacher_num_heads=HEADS,
                            selected_heads_per_layer=selection).eval()
    student.load_from_teacher(teacher.state_dict())
    assert student.selected_heads == selection
    out = student(image)[0].double()
    expected = ref(teacher.state_dict(), image, head_mask=masked_teacher_mask(3, HEADS, selection))
    assert (out - expected).abs().max().item() <= 1e-5
    mask = masked_teacher_mask(3, HEADS, selection).float()
    assert (out - teacher(image, head_mask=mask)[0].double()).abs().max().item() <= 1e-5


def test_subln_slices_inner_layernorm_and_matches_its_own_reference(image):
    teacher = make_teacher(seed=2, subln=True)
    selection = [[0, 3, 5, 6], [1, 2, 4, 7], [0, 1, 2, 3]]
    student = EVAViTStudent(**SMALL, subln=True, num_heads=4, teacher_num_heads=HEADS,
                            selected_heads_per_layer=selection).eval()
    student.load_from_teacher(teacher.state_dict())
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for layer, heads in enumerate(selection):
        rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in heads])
        for name in ("inner_attn_ln.weight", "inner_attn_ln.bias", "q_proj.weight", "v_bias"):
            key = f"blocks.{layer}.attn.{name}"
            assert torch.equal(s_sd[key], t_sd[key][rows])
        key = f"blocks.{layer}.attn.proj.weight"
        assert torch.equal(s_sd[key], t_sd[key][:, rows])
    assert (teacher(image)[0].double() - ref(t_sd, image, subln=True)).abs().max().item() <= 1e-5
    # With subln the inner LayerNorm normalises over the kept heads only, so the pruned block is
    # NOT the masked teacher (documented in README_KD.md): the outputs must differ.
    masked = ref(t_sd, image, subln=True, head_mask=masked_teacher_mask(3, HEADS, selection))
    assert (student(image)[0].double() - masked).abs().max().item() > 1e-3


def test_orion_l_keys_shapes_and_counts_on_meta_device():
    from tests.eva_reference import reference_macs, reference_param_count
    with torch.device("meta"):
        teacher = build_backbone(dict(type="EVAViT", **ORION_L))
        student = build_backbone(dict(type="EVAViTStudent", teacher_num_heads=16, **dict(ORION_L, num_heads=8)))
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert len(t_sd) == 511
    head_keys = [k for k in s_sd if k.endswith(".attn.head_index")]
    channel_keys = [k for k in s_sd if k.endswith(".mlp.channel_index")]
    assert len(head_keys) == 24 and len(channel_keys) == 24
    assert set(s_sd) - set(head_keys) - set(channel_keys) - {"kept_blocks"} == set(t_sd)
    assert s_sd["kept_blocks"].shape == (24,) and "kept_blocks" not in t_sd  # the teacher alias: ORION's keys
    assert t_sd["pos_embed"].shape == (1, 197, 1024)
    assert t_sd["patch_embed.proj.weight"].shape == (1024, 3, 16, 16)
    assert t_sd["rope_win.freqs_cos"].shape == (256, 64) and t_sd["rope_glb.freqs_sin"].shape == (1600, 64)
    assert t_sd["blocks.0.attn.rope.freqs_cos"].shape == (256, 64)
    assert t_sd["blocks.2.attn.rope.freqs_cos"].shape == (1600, 64)
    assert t_sd["blocks.5.mlp.w1.weight"].shape == (2730, 1024) and t_sd["blocks.5.mlp.ffn_ln.bias"].shape == (2730,)
    assert t_sd["blocks.5.mlp.w3.weight"].shape == (1024, 2730)
    assert "blocks.0.attn.k_bias" not in t_sd
    assert s_sd["blocks.7.attn.q_proj.weight"].shape == (512, 1024)
    assert s_sd["blocks.7.attn.v_bias"].shape == (512,)
    assert s_sd["blocks.7.attn.proj.weight"].shape == (1024, 512)
    assert s_sd["blocks.7.attn.proj.bias"].shape == (1024,)
    geometry = dict(embed_dim=1024, depth=24, head_dim=64, mlp_hidden=int(1024 * 8 / 3), patch_size=16, pos_tokens=197)
    windows = [16 if i % 3 != 2 else 0 for i in range(24)]
    for model, heads in ((teacher, 16), (student, 8)):
        expected = reference_param_count(heads_per_block=[heads] * 24, **geometry)
        assert sum(p.numel() for p in model.parameters()) == expected
        macs = reference_macs(img_hw=(640, 640), patch_size=16, in_chans=3, embed_dim=1024, mlp_hidden=2730,
                              head_dim=64, heads_per_block=[heads] * 24, window_per_block=windows)
        assert model.analytic_macs() == macs
    # the contract's figures (303.4 M / 253.0 M parameters, 592.9 GMACs, 1.294x) follow from the same formulas
    assert round(reference_param_count(heads_per_block=[16] * 24, **geometry) / 1e6, 1) == 303.4
    assert round(reference_param_count(heads_per_block=[8] * 24, **geometry) / 1e6, 1) == 253.0


def test_rope_tables_equal_the_formula():
    from tests.eva_reference import rope_tables
    model = make_teacher()
    cos, sin = rope_tables(16, 4)
    assert torch.allclose(model.rope_win.freqs_cos.double(), cos, atol=1e-6)
    assert torch.allclose(model.rope_win.freqs_sin.double(), sin, atol=1e-6)
    assert model.blocks[0].attn.rope is model.rope_win and model.blocks[2].attn.rope is model.rope_glb


def test_taps_record_block_outputs_and_scaled_rope_logits(image):
    teacher = make_teacher(seed=3)
    selection = [[1, 3, 4, 6], [0, 2, 5, 7], [2, 3, 4, 5]]
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, selected_heads_per_layer=selection).eval()
    student.load_from_teacher(teacher.state_dict())
    gen = torch.Generator().manual_seed(7)
    s_taps = student.forward_with_taps(image, hidden_blocks=(0, 2), attn_blocks=(1, 2), num_query_samples=5,
                                       generator=gen)
    t_taps = teacher.forward_with_taps(image, hidden_blocks=(0, 2), attn_blocks=(1, 2),
                                       query_index=s_taps.query_index)
    assert torch.equal(s_taps.features[0], student(image)[0])
    assert s_taps.hidden_states[2].shape == (2, 7, 7, 128)
    assert torch.allclose(s_taps.hidden_states[2].permute(0, 3, 1, 2), s_taps.features[0])
    # window block 1: 4 windows per image of 16 tokens (padding included); global block 2: 49 tokens
    assert s_taps.attn_logits[1].shape == (8, 4, 5, 16) and t_taps.attn_logits[1].shape == (8, 8, 5, 16)
    assert s_taps.attn_logits[2].shape == (2, 4, 5, 49)
    assert s_taps.head_map == selection
    # Block 0 is identical in both models except for pruned heads' outputs; block 1's input therefore
    # differs, so compare logits at block 0 via a dedicated tap where inputs are equal.
    s0 = student.forward_with_taps(image, attn_blocks=(0,), num_query_samples=6, generator=torch.Generator().manual_seed(1))
    t0 = teacher.forward_with_taps(image, attn_blocks=(0,), query_index=s0.query_index)
    assert torch.allclose(s0.attn_logits[0], t0.attn_logits[0][:, selection[0]], atol=1e-6)
    again = student.forward_with_taps(image, attn_blocks=(1, 2), num_query_samples=5,
                                      generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(again.query_index[b], s_taps.query_index[b]) for b in (1, 2))


def test_taps_logits_equal_reference_scores(image):
    from tests.eva_reference import apply_rope, layer_norm, rope_tables
    teacher = make_teacher(seed=4)
    taps = teacher.forward_with_taps(image, hidden_blocks=(1,), attn_blocks=(2,), num_query_samples=3,
                                     generator=torch.Generator().manual_seed(0))
    sd = {k: v.double() for k, v in teacher.state_dict().items()}
    x = taps.hidden_states[1][0].double().reshape(49, 128)
    y = layer_norm(x, sd["blocks.2.norm1.weight"], sd["blocks.2.norm1.bias"])
    cos, sin = rope_tables(16, 7)
    q = y @ sd["blocks.2.attn.q_proj.weight"].T + sd["blocks.2.attn.q_bias"]
    k = y @ sd["blocks.2.attn.k_proj.weight"].T
    rows = taps.query_index[2]
    for h in range(HEADS):
        sl = slice(16 * h, 16 * h + 16)
        logits = apply_rope(q[:, sl], cos, sin)[rows] @ apply_rope(k[:, sl], cos, sin).T / 4.0
        assert (taps.attn_logits[2][0, h].double() - logits).abs().max().item() <= 1e-5


def test_head_mask_is_differentiable(image):
    teacher = make_teacher()
    mask = torch.ones(3, HEADS, requires_grad=True)
    teacher(image, head_mask=mask)[0].pow(2).mean().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0 and mask.grad.shape == (3, HEADS)


def test_with_cp_gradients_reach_every_block_with_frozen_patch_embedding(image):
    plain = make_teacher(seed=5, drop_path_rate=0.0).train()
    ckpt = make_teacher(seed=5, drop_path_rate=0.0, with_cp=True).train()
    for model in (plain, ckpt):
        model.patch_embed.requires_grad_(False)
        model.pos_embed.requires_grad_(False)
        model(image)[0].pow(2).mean().backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if name.startswith("blocks."):
            assert q.grad is not None, name
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_drop_path_only_in_training_and_frozen_stays_eval(image):
    model = make_teacher(seed=6, drop_path_rate=0.9)
    model.eval()
    a, b = model(image)[0], model(image)[0]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(image)[0]
    assert not torch.allclose(a, c)
    frozen = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, drop_path_rate=0.9, frozen=True)
    frozen.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_bf16_forward_on_cpu(image):
    model = make_teacher()
    out32 = model(image)[0]
    out16 = model.to(torch.bfloat16)(image.to(torch.bfloat16))[0]
    assert out16.dtype == torch.bfloat16
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 0.05


def test_head_index_is_saved_and_checked_on_load():
    selection = [[0, 1, 2, 3]] * 3
    a = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, selected_heads_per_layer=selection)
    sd = a.state_dict()
    assert sd["blocks.1.attn.head_index"].tolist() == [0, 1, 2, 3]
    b = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS,
                      selected_heads_per_layer=[[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]])
    for strict in (True, False):  # a non-strict load would only collect the message: it raises instead
        with pytest.raises(SelectionMismatchError, match=r"^blocks.1.attn.head_index: checkpoint keeps teacher heads "
                                                         r"\[0, 1, 2, 3\], this model keeps \[4, 5, 6, 7\]; build"):
            b.load_state_dict(sd, strict=strict)
    # a pruned block's tensors without the index could hold any 4 heads: refused, not guessed
    anonymous = {k: v for k, v in sd.items() if k != "blocks.2.attn.head_index"}
    same = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, selected_heads_per_layer=selection)
    for strict in (True, False):
        with pytest.raises(SelectionMismatchError, match=r"^blocks.2.attn.head_index: the checkpoint holds "
                                                         r"blocks.2.attn.\* tensors without blocks.2.attn.head_index"):
            same.load_state_dict(anonymous, strict=strict)
    assert not same.load_state_dict({}, strict=False).unexpected_keys  # holding none of its tensors: left as it is
    full = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS)
    orion_keys = {k: v for k, v in full.state_dict().items() if not k.endswith("head_index")}
    assert not full.load_state_dict(orion_keys, strict=True).missing_keys  # ORION's keys: every head, no index


def test_load_from_teacher_path_uses_weights_only(tmp_path):
    teacher = make_teacher()
    path = tmp_path / "orion.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": {"img_backbone." + k: v for k, v in teacher.state_dict().items()}},
               path)
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS)
    report = student.load_from_teacher(str(path))
    assert report["source"] == str(path)
    assert torch.equal(student.state_dict()["blocks.0.attn.q_proj.weight"],
                       teacher.state_dict()["blocks.0.attn.q_proj.weight"][:64])
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": random.Random()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        student.load_from_teacher(str(bad))


def test_load_errors_name_key_expected_and_got(tmp_path):
    teacher = make_teacher()
    sd = teacher.state_dict()
    shallow = EVAViTStudent(**dict(SMALL, depth=2, window_block_indexes=(0,)), num_heads=4, teacher_num_heads=HEADS)
    with pytest.raises(ValueError, match=r"^<state dict>: the teacher backbone has 3 blocks, expected depth 2 \(the "
                                         r"teacher's depth; the student keeps blocks \[0, 1\]\)$"):
        shallow.load_from_teacher(sd)
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.w3.bias"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\), e.g. \['blocks.1.mlp.w3.bias'\]"):
        student.load_from_teacher(missing)
    wide = dict(sd)
    wide["blocks.0.mlp.w1.weight"] = torch.zeros(99, 128)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.w1.weight: expected shape \(341, 128\), got \(99, 128\)"):
        student.load_from_teacher(wide)
    narrow = dict(sd)
    narrow["blocks.2.attn.q_proj.weight"] = torch.zeros(64, 128)
    with pytest.raises(ValueError, match=r"blocks.2.attn.q_proj.weight: expected 128 = 8 heads x 16 along dim 0"):
        student.load_from_teacher(narrow)
    pruned = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS).state_dict()
    pruned["blocks.0.attn.head_index"] = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="already pruned"):
        student.load_from_teacher(pruned)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth"):
        student.load_from_teacher(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no tensors found"):
        student.load_from_teacher({"state_dict": {"meta": 1}})


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=4, selected_heads_per_layer=[[0, 1, 2, 3]] * 2), "expected 3 blocks, got 2"),
    (dict(num_heads=4, selected_heads_per_layer=[[0, 1, 2, 9]] * 3), r"expected indices in \[0, 8\)"),
    (dict(num_heads=4, selected_heads_per_layer=[[0, 1, 1, 2]] * 3), "duplicate head indices"),
    (dict(num_heads=4, selected_heads_per_layer=[[3, 1, 2, 0]] * 3), "expected sorted indices"),
    (dict(num_heads=2, selected_heads_per_layer=[[0, 1, 2]] * 3), "keeps 3 heads but num_heads says 2"),
    (dict(num_heads=[4, 4], selected_heads_per_layer=None), r"one count per block \(3\), got 2"),
    (dict(num_heads=0), r"expected 1..8 \(teacher_num_heads\), got 0"),
    (dict(num_heads=[4, [], 4], selected_heads_per_layer=None), "expected an int or one int per block"),
    (dict(num_heads=4, selected_heads_per_layer=[[0, 1, 2, 3], [], [0, 1, 2, 3]]), "at least one head"),
    (dict(num_heads=4, attn_impl="flash"), "attn_impl"),
])
def test_invalid_head_configurations_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EVAViTStudent(**SMALL, teacher_num_heads=HEADS, **kwargs)


def test_bf16_weights_take_an_fp32_image_as_orions_evavit_does(image):
    """ORION's EVAViT casts its input to the weights' dtype; bf16 weights + fp32 images must work."""
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS).eval().to(torch.bfloat16)
    out = student(image)[0]
    assert out.dtype == torch.bfloat16 and out.shape == (2, 128, 7, 7) and torch.isfinite(out.float()).all()
    assert torch.equal(out, student(image.to(torch.bfloat16))[0])
# --------------------------------------------------------------------------- head_mask indexing


def test_head_mask_is_indexed_by_kept_head(image):
    teacher = make_teacher(seed=8)
    selection = [[0, 3, 5, 6], [1, 2, 4, 7], [2, 3, 4, 5]]
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, selected_heads_per_layer=selection).eval()
    student.load_from_teacher(teacher.state_dict())
    kept_mask = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    teacher_mask = torch.zeros(3, HEADS, dtype=torch.float64)  # the same mask, written by teacher head
    for layer, heads in enumerate(selection):
        teacher_mask[layer, heads] = kept_mask[layer].double()
    expected = ref(teacher.state_dict(), image, head_mask=teacher_mask)
    assert (student(image, head_mask=kept_mask)[0].double() - expected).abs().max().item() <= 1e-5
    per_block = [row for row in kept_mask]  # a list of per-block rows works too (needed when counts differ)
    assert torch.equal(student(image, head_mask=per_block)[0], student(image, head_mask=kept_mask)[0])


def test_a_head_mask_indexed_by_teacher_head_is_refused_by_a_pruned_student(image):
    selection = [[0, 3, 5, 6], [1, 2, 4, 7], [2, 3, 4, 5]]
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, selected_heads_per_layer=selection)
    with pytest.raises(ValueError, match=r"head_mask\[0\]: expected 4 entries, one per kept head \(teacher heads "
                                         r"\[0, 3, 5, 6\]\), got 8; a mask indexed by teacher head converts with "
                                         r"mask\[layer\]\[selected_heads\[layer\]\]"):
        student(image, head_mask=torch.ones(3, HEADS))
    with pytest.raises(ValueError, match=r"head_mask\[1\]: expected a 1-D row of 4 entries, got shape \(2, 2\)"):
        student(image, head_mask=[torch.ones(4), torch.ones(2, 2), torch.ones(4)])
    with pytest.raises(ValueError, match=r"head_mask: expected 3 rows \(one per kept block, teacher blocks "
                                         r"\[0, 1, 2\]\), got 2"):
        student(image, head_mask=torch.ones(2, 4))


# --------------------------------------------------------------------------- ORION's EVAViT arguments


def test_orion_evavit_arguments_with_a_clear_meaning_are_accepted(image):
    from functools import partial
    teacher = make_teacher(seed=9)
    orion_args = dict(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), act_layer=torch.nn.GELU, use_rel_pos=False,
                      rope=True, residual_block_indexes=(), out_feature="last_feat")
    student = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, **orion_args).eval()
    student.load_state_dict(teacher.state_dict())
    assert (student(image)[0].double() - ref(teacher.state_dict(), image)).abs().max().item() <= 1e-5
    assert student._out_features == ["last_feat"] and student._out_feature_channels == {"last_feat": 128}
    assert student._out_feature_strides == {"last_feat": 16}
    eps5 = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS,
                         norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))
    assert {m.eps for m in eps5.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    assert EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, norm_layer=torch.nn.LayerNorm).blocks[0] \
        .norm1.eps == 1e-5  # nn.LayerNorm's own default, as ORION would build it


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_rel_pos=True), r"use_rel_pos=True: ORION's EVAViT accepts it but builds no relative position"),
    (dict(rope=False), r"rope=False: ORION's EVAViT always applies rotary embeddings"),
    (dict(residual_block_indexes=[1]), r"residual_block_indexes=\[1\]: the convolutional residual blocks"),
    (dict(norm_layer=torch.nn.BatchNorm1d), r"norm_layer: expected nn.LayerNorm or a partial of it"),
    (dict(out_feature=3), r"out_feature: expected a string"),
    (dict(rel_pos_zero_init=True, use_lpe=1), r"unexpected arguments \['rel_pos_zero_init', 'use_lpe'\]"),
])
def test_orion_evavit_arguments_without_a_clear_meaning_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, **kwargs)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), "sdpa"),  # ORION's default flash_attn=True
    (dict(flash_attn=True), "sdpa"),
    (dict(flash_attn=False), "math"),  # ORION's explicit-softmax path
    (dict(flash_attn=True, attn_impl="math"), "math"),  # an explicit attn_impl wins
    (dict(flash_attn=False, attn_impl="sdpa"), "sdpa"),
])
def test_flash_attn_picks_the_attention_path_unless_attn_impl_is_given(kwargs, expected):
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, **kwargs)
    assert student.attn_impl == expected
    assert {block.attn.attn_impl for block in student.blocks} == {expected}
