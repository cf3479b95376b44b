"""Distillation losses: explicit-formula equality, zero on identical inputs, head pairing, fp32, errors."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn.functional as F

from mmcv.models.builder import LOSSES, build_loss
from mmcv.models.losses.kd_losses import (
    AttentionDistillLoss, CombinedKDLoss, FeatureDistillLoss, OutputDistillLoss, VLDistillLoss,
    default_distill_blocks)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).requires_grad_(requires_grad)


def _taps(depth: int = 4, heads: int = 4, seed: int = 0, B: int = 2, Hp: int = 4, Wp: int = 4,
          C: int = 8, Q: int = 5, K: int = 16, blocks=(1, 3)) -> SimpleNamespace:
    """A BackboneTaps-shaped object with random contents."""
    g = _gen(seed)
    return SimpleNamespace(
        features=[torch.randn(B, C, Hp, Wp, generator=g)],
        hidden_states={b: torch.randn(B, Hp, Wp, C, generator=g) for b in blocks},
        attn_logits={b: torch.randn(B, heads, Q, K, generator=g) for b in blocks},
        query_index={b: torch.arange(Q) for b in blocks},
    )


def _clone_taps(taps: SimpleNamespace, requires_grad: bool = False) -> SimpleNamespace:
    def c(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(requires_grad)
    return SimpleNamespace(
        features=[c(f) for f in taps.features],
        hidden_states={b: c(t) for b, t in taps.hidden_states.items()},
        attn_logits={b: c(t) for b, t in taps.attn_logits.items()},
        query_index={b: t.clone() for b, t in taps.query_index.items()},
    )


# ------------------------------------------------------------------ explicit references (float64)
def _explicit_attention_kl(s: torch.Tensor, t: torch.Tensor, heads: List[int], T: float) -> float:
    """Loops over heads and rows; probabilities and logs in float64."""
    s, t = s.double(), t.double()
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        for j, h in enumerate(heads):
            for q in range(s.shape[2]):
                ps = torch.exp(s[b, j, q] / T) / torch.exp(s[b, j, q] / T).sum()
                pt = torch.exp(t[b, h, q] / T) / torch.exp(t[b, h, q] / T).sum()
                total += float((pt * (torch.log(pt) - torch.log(ps))).sum())
                rows += 1
    return T * T * total / rows


def _explicit_cwd(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    s, t = s.double(), t.double()
    B, C = s.shape[:2]
    total = 0.0
    for b in range(B):
        for c in range(C):
            ps = torch.exp(s[b, c].flatten() / T)
            ps = ps / ps.sum()
            pt = torch.exp(t[b, c].flatten() / T)
            pt = pt / pt.sum()
            total += float((pt * torch.log(pt / ps)).sum())
    return T * T * total / (B * C)


def _explicit_ln_mse(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-5) -> float:
    s, t = s.double(), t.double()

    def ln(x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps)
    return float(((ln(s) - ln(t)) ** 2).mean())


def _explicit_cosine(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    vals = [1.0 - float(a @ b / (a.norm() * b.norm())) for a, b in zip(s, t)]
    return sum(vals) / len(vals)


# ------------------------------------------------------------------ equality with explicit formulas
def test_attention_kl_equals_explicit_loop_computation():
    s, t = _randn(2, 3, 4, 7, seed=1) * 2, _randn(2, 5, 4, 7, seed=2) * 2
    heads = [4, 0, 2]
    got = AttentionDistillLoss(temperature=3.0).block_loss(s, t, heads)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), _explicit_attention_kl(s, t, heads, 3.0), rel_tol=1e-5)
    got_t1 = AttentionDistillLoss(temperature=1.0)(s, t, heads)
    assert math.isclose(float(got_t1), _explicit_attention_kl(s, t, heads, 1.0), rel_tol=1e-5)


def test_attention_blocks_are_averaged_with_per_block_head_maps():
    s = {0: _randn(1, 2, 3, 5, seed=1), 2: _randn(1, 2, 3, 5, seed=2)}
    t = {0: _randn(1, 4, 3, 5, seed=3), 2: _randn(1, 4, 3, 5, seed=4)}
    head_map = [[1, 3], [0, 1], [2, 0]]
    got = AttentionDistillLoss(temperature=2.0)(s, t, head_map)
    want = 0.5 * (_explicit_attention_kl(s[0], t[0], [1, 3], 2.0)
                  + _explicit_attention_kl(s[2], t[2], [2, 0], 2.0))
    assert math.isclose(float(got), want, rel_tol=1e-5)


def test_cwd_equals_explicit_computation():
    s, t = _randn(2, 3, 4, 5, seed=1) * 3, _randn(2, 3, 4, 5, seed=2) * 3
    for T in (1.0, 4.0):
        got = OutputDistillLoss(mode="cwd", temperature=T)(s, t)
        assert math.isclose(float(got), _explicit_cwd(s, t, T), rel_tol=1e-5)
    got_list = OutputDistillLoss(mode="cwd", temperature=2.0)([s], [t])
    assert math.isclose(float(got_list), _explicit_cwd(s, t, 2.0), rel_tol=1e-5)


def test_output_mse_equals_explicit_mean_square():
    s, t = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
    got = OutputDistillLoss(mode="mse")(s, t)
    assert math.isclose(float(got), float(((s.double() - t.double()) ** 2).mean()), rel_tol=1e-6)


def test_feature_mse_is_on_layernormed_features():
    s, t = _randn(2, 3, 3, 8, seed=1) * 5 + 2, _randn(2, 3, 3, 8, seed=2)
    got = FeatureDistillLoss(mode="mse").block_loss(s, t)
    assert math.isclose(float(got), _explicit_ln_mse(s, t), rel_tol=1e-5)
    # normalisation makes it invariant to a per-token affine change of the student
    assert math.isclose(float(FeatureDistillLoss()(t * 3.0 + 1.5, t)), 0.0, abs_tol=1e-6)


def test_feature_cosine_equals_one_minus_cosine_similarity():
    s, t = _randn(2, 3, 3, 8, seed=1), _randn(2, 3, 3, 8, seed=2)
    got = FeatureDistillLoss(mode="cosine").block_loss(s, t)
    assert math.isclose(float(got), _explicit_cosine(s, t), rel_tol=1e-5)
    ref = float((1 - F.cosine_similarity(s, t, dim=-1)).mean())
    assert math.isclose(float(got), ref, rel_tol=1e-5)


def test_feature_block_weights_give_weighted_mean():
    s = {1: _randn(1, 2, 2, 4, seed=1), 5: _randn(1, 2, 2, 4, seed=2)}
    t = {1: _randn(1, 2, 2, 4, seed=3), 5: _randn(1, 2, 2, 4, seed=4)}
    l1, l5 = _explicit_ln_mse(s[1], t[1]), _explicit_ln_mse(s[5], t[5])
    got = FeatureDistillLoss(blocks=[1, 5], block_weights=[1.0, 3.0])(s, t)
    assert math.isclose(float(got), 0.25 * l1 + 0.75 * l5, rel_tol=1e-5)
    got_map = FeatureDistillLoss(block_weights={1: 1.0, 5: 3.0})(s, t)
    assert math.isclose(float(got_map), float(got), rel_tol=1e-6)
    only5 = FeatureDistillLoss(blocks=[5], loss_weight=2.0)(s, t)
    assert math.isclose(float(only5), 2.0 * l5, rel_tol=1e-5)


def test_vl_losses_equal_explicit_formulas():
    s, t = _randn(2, 6, 8, seed=1), _randn(2, 6, 8, seed=2)
    assert math.isclose(float(VLDistillLoss("mse")(s, t)),
                        float(((s.double() - t.double()) ** 2).mean()), rel_tol=1e-6)
    assert math.isclose(float(VLDistillLoss("cosine")(s, t)), _explicit_cosine(s, t), rel_tol=1e-5)


# ------------------------------------------------------------------ zero / positive
@pytest.mark.parametrize("feature_mode,output_mode", [("mse", "mse"), ("cosine", "cwd")])
def test_every_part_is_exactly_zero_on_identical_inputs(feature_mode, output_mode):
    taps = _taps()
    loss = CombinedKDLoss(feature_mode=feature_mode, output_mode=output_mode,
                          vl_distill_weight=0.1, vl_mode="cosine" if feature_mode == "cosine" else "mse")
    vl = _randn(2, 6, 8, seed=9)
    out = loss(taps, _clone_taps(taps), [[0, 1, 2, 3]] * 4, vl, vl.clone())
    assert set(out) == set(loss.output_keys)
    for key, value in out.items():
        assert value.dtype == torch.float32 and value.dim() == 0, key
        assert float(value) == 0.0, key


def test_every_part_is_positive_on_different_inputs():
    loss = CombinedKDLoss(vl_distill_weight=0.1, output_mode="cwd")
    out = loss(_taps(seed=0), _taps(seed=1), None, _randn(2, 6, 8, seed=1), _randn(2, 6, 8, seed=2))
    for key, value in out.items():
        assert float(value) > 0, key
    want = (0.5 * out["feature_distill_loss"] + 0.3 * out["attention_distill_loss"]
            + 0.2 * out["output_distill_loss"] + 0.1 * out["vl_distill_loss"])
    assert torch.allclose(out["backbone_distill_loss"], want)


def test_attention_is_zero_for_student_heads_sliced_from_the_teacher():
    teacher = _randn(2, 6, 4, 9, seed=3)
    heads = [5, 1, 3]
    student = teacher[:, heads].clone()
    assert float(AttentionDistillLoss()(student, teacher, heads)) == 0.0


# ------------------------------------------------------------------ head map
def test_head_map_pairs_each_student_head_with_its_teacher_head():
    teacher = _randn(1, 4, 3, 6, seed=1)
    student = _randn(1, 2, 3, 6, seed=2)
    heads = [3, 1]
    loss = AttentionDistillLoss()
    base = loss(student, teacher, heads)
    perm = [2, 0, 3, 1]  # teacher head h moves to position perm.index(h)
    permuted = teacher[:, perm]
    assert not math.isclose(float(loss(student, permuted, heads)), float(base), rel_tol=1e-3)
    followed = [perm.index(h) for h in heads]
    assert float(loss(student, permuted, followed)) == pytest.approx(float(base), rel=1e-6)


def test_combined_uses_the_head_map_of_each_block():
    s_taps, t_taps = _taps(heads=2, seed=0, blocks=(1,)), _taps(heads=4, seed=1, blocks=(1,))
    t_taps.attn_logits[1][:, 3] = s_taps.attn_logits[1][:, 0]
    t_taps.attn_logits[1][:, 2] = s_taps.attn_logits[1][:, 1]
    loss = CombinedKDLoss(feature_distill_weight=0, output_distill_weight=0)
    right = loss(s_taps, t_taps, [[0, 1], [3, 2]])
    wrong = loss(s_taps, t_taps, [[0, 1], [2, 3]])
    assert float(right["attention_distill_loss"]) == 0.0
    assert float(wrong["attention_distill_loss"]) > 0.0


def test_combined_falls_back_to_the_head_map_recorded_in_the_taps():
    s_taps, t_taps = _taps(heads=2, seed=0, blocks=(1,)), _taps(heads=4, seed=1, blocks=(1,))
    t_taps.attn_logits[1][:, 3] = s_taps.attn_logits[1][:, 0]
    t_taps.attn_logits[1][:, 2] = s_taps.attn_logits[1][:, 1]
    loss = CombinedKDLoss(feature_distill_weight=0, output_distill_weight=0)
    s_taps.head_map = [[0, 1], [3, 2]]
    t_taps.head_map = [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert float(loss(s_taps, t_taps)["attention_distill_loss"]) == 0.0
    # a teacher that itself keeps a subset: pairing goes through the original head indices
    t_taps.head_map = [[0, 1, 2, 3], [5, 7, 3, 9]]
    s_taps.head_map = [[0, 1], [9, 3]]
    assert float(loss(s_taps, t_taps)["attention_distill_loss"]) == 0.0
    s_taps.head_map = [[0, 1], [9, 4]]
    with pytest.raises(ValueError, match=r"block 1.*\[4\] are not among the teacher's heads"):
        loss(s_taps, t_taps)


# ------------------------------------------------------------------ precision and gradients
def test_losses_run_in_fp32_under_bf16_autocast():
    s_taps, t_taps = _taps(seed=0), _taps(seed=1)
    loss = CombinedKDLoss(output_mode="cwd")
    ref = loss(s_taps, t_taps, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(s_taps, t_taps, None)
    for key in ref:
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], ref[key]), key
    # bf16 inputs are promoted, not computed in bf16
    bf_s = _randn(2, 3, 4, 5, seed=1).bfloat16()
    bf_t = _randn(2, 3, 4, 5, seed=2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OutputDistillLoss("cwd", 2.0)(bf_s, bf_t)
    assert out.dtype == torch.float32
    assert math.isclose(float(out), _explicit_cwd(bf_s.float(), bf_t.float(), 2.0), rel_tol=1e-5)


def test_gradients_reach_student_inputs_only():
    s_taps = _clone_taps(_taps(seed=0), requires_grad=True)
    t_taps = _clone_taps(_taps(seed=1), requires_grad=True)
    s_vl, t_vl = _randn(2, 6, 8, seed=1, requires_grad=True), _randn(2, 6, 8, seed=2, requires_grad=True)
    out = CombinedKDLoss(vl_distill_weight=0.1, output_mode="cwd")(s_taps, t_taps, None, s_vl, t_vl)
    out["backbone_distill_loss"].backward()
    students = ([*s_taps.features, s_vl] + list(s_taps.hidden_states.values())
                + list(s_taps.attn_logits.values()))
    teachers = ([*t_taps.features, t_vl] + list(t_taps.hidden_states.values())
                + list(t_taps.attn_logits.values()))
    assert all(x.grad is not None and float(x.grad.abs().sum()) > 0 for x in students)
    assert all(x.grad is None for x in teachers)


# ------------------------------------------------------------------ combined config, taps, registry
def test_disabled_parts_are_not_computed_and_need_no_taps():
    s_taps = SimpleNamespace(features=[_randn(1, 4, 2, 2, seed=1)], hidden_states={}, attn_logits={},
                             query_index={})
    t_taps = SimpleNamespace(features=[_randn(1, 4, 2, 2, seed=2)], hidden_states={}, attn_logits={},
                             query_index={})
    loss = CombinedKDLoss(feature_distill_weight=0, attention_distill_weight=0, output_distill_weight=1)
    out = loss(s_taps, t_taps)
    assert "vl_distill_loss" not in out
    assert float(out["feature_distill_loss"]) == 0.0 and float(out["attention_distill_loss"]) == 0.0
    assert torch.equal(out["backbone_distill_loss"], out["output_distill_loss"])
    assert loss.tap_request(24) == ([], [], 64)


def test_tap_request_defaults_and_configured_blocks():
    assert default_distill_blocks(24) == [5, 11, 17, 23]
    assert default_distill_blocks(12) == [2, 5, 8, 11]
    assert default_distill_blocks(2) == [0, 1]
    assert CombinedKDLoss().tap_request(24) == ([5, 11, 17, 23], [5, 11, 17, 23], 64)
    loss = CombinedKDLoss(feature_blocks=[7, 3], attention_blocks=[23], num_query_samples=16)
    assert loss.tap_request(24) == ([3, 7], [23], 16)
    with pytest.raises(ValueError, match="out of range"):
        loss.tap_request(12)


def test_combined_only_uses_configured_blocks():
    s_taps, t_taps = _taps(seed=0, blocks=(1, 3)), _taps(seed=1, blocks=(1, 3))
    t_taps.hidden_states[3] = s_taps.hidden_states[3].clone()
    t_taps.attn_logits[3] = s_taps.attn_logits[3].clone()
    out = CombinedKDLoss(feature_blocks=[3], attention_blocks=[3])(s_taps, t_taps, None)
    assert float(out["feature_distill_loss"]) == 0.0 and float(out["attention_distill_loss"]) == 0.0


def test_taps_may_be_plain_dicts_and_registry_builds_every_loss():
    taps = _taps()
    as_dict = dict(vars(taps))
    out = build_loss(dict(type="CombinedKDLoss", output_mode="cwd"))(as_dict, dict(vars(_clone_taps(taps))))
    assert float(out["backbone_distill_loss"]) == 0.0
    for name in ("FeatureDistillLoss", "AttentionDistillLoss", "OutputDistillLoss", "VLDistillLoss",
                 "CombinedKDLoss"):
        assert LOSSES.get(name) is not None


# ------------------------------------------------------------------ errors
def test_vl_weight_without_tokens_is_a_configuration_error():
    with pytest.raises(ValueError, match="no side-effect-free vl_tokens"):
        CombinedKDLoss(vl_distill_weight=0.1)(_taps(seed=0), _taps(seed=1), None)


def test_mismatched_shapes_raise_with_block_and_shapes():
    with pytest.raises(ValueError, match=r"block 4.*\(1, 2, 2, 8\).*\(1, 2, 2, 6\)"):
        FeatureDistillLoss()({4: torch.zeros(1, 2, 2, 8)}, {4: torch.zeros(1, 2, 2, 6)})
    with pytest.raises(ValueError, match=r"block 2.*expected \[1, 4, 3, 5\], got \[1, 4, 3, 6\]"):
        AttentionDistillLoss()({2: torch.zeros(1, 2, 3, 5)}, {2: torch.zeros(1, 4, 3, 6)}, [[]] * 2 + [[0, 1]])
    with pytest.raises(ValueError, match="head map has 1 entries"):
        AttentionDistillLoss()(torch.zeros(1, 2, 3, 5), torch.zeros(1, 4, 3, 5), [0])
    with pytest.raises(ValueError, match="outside the teacher's 4 heads"):
        AttentionDistillLoss()(torch.zeros(1, 2, 3, 5), torch.zeros(1, 4, 3, 5), [0, 4])
    with pytest.raises(ValueError, match="a head map .* is required"):
        AttentionDistillLoss()(torch.zeros(1, 2, 3, 5), torch.zeros(1, 4, 3, 5))
    with pytest.raises(ValueError, match="OutputDistillLoss"):
        OutputDistillLoss("cwd")(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="VLDistillLoss"):
        VLDistillLoss()(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))


def test_missing_blocks_and_different_query_rows_raise():
    s_taps, t_taps = _taps(seed=0, blocks=(1, 3)), _taps(seed=1, blocks=(1,))
    with pytest.raises(ValueError, match="block 3 was not recorded for the teacher"):
        CombinedKDLoss(attention_distill_weight=0)(s_taps, t_taps)
    s_taps, t_taps = _taps(seed=0), _taps(seed=1)
    t_taps.query_index[3] = t_taps.query_index[3].flip(0)
    with pytest.raises(ValueError, match="block 3.*different query rows"):
        CombinedKDLoss()(s_taps, t_taps, None)
    empty = SimpleNamespace(features=s_taps.features, hidden_states={}, attn_logits={}, query_index={})
    with pytest.raises(ValueError, match="no hidden states"):
        CombinedKDLoss()(empty, empty)


@pytest.mark.parametrize("kwargs", [dict(feature_mode="l1"), dict(output_mode="kl"), dict(temperature=0),
                                    dict(feature_distill_weight=-1), dict(feature_blocks=[-1]),
                                    dict(num_query_samples=0)])
def test_invalid_configuration_raises(kwargs):
    with pytest.raises(ValueError):
        CombinedKDLoss(**kwargs)



def test_attention_kl_ignores_teacher_entries_with_zero_probability():
    """A teacher logit of -inf (probability 0) contributes exactly 0, never NaN."""
    from mmcv.models.losses.kd_losses import _kl_from_logits

    torch.manual_seed(0)
    s = torch.randn(4, 7, dtype=torch.float64)
    t = torch.randn(4, 7, dtype=torch.float64)
    t[1, 3] = float("-inf")
    p_s, p_t = torch.softmax(s / 3.0, -1), torch.softmax(t / 3.0, -1)
    expected = torch.where(p_t > 0, p_t * (p_t.log() - p_s.log()), torch.zeros_like(p_t)).sum(-1)
    got = _kl_from_logits(s, t, 3.0)
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=1e-12)
