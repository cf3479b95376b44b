"""Block importance: skipping a block is an exact identity swap, kd_loss equals the project's KD loss against a
teacher whose block is made an identity by zero weights, cosine equals its hand-written definition, the ranking
of the miniature teacher is deterministic, the record's files, and the CLI end to end on the tiny KD config."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent, resize_abs_pos_embed
from mmcv.models.losses.kd_losses import CombinedKDLoss, default_distill_blocks
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.head_importance import BlockImportance, ChannelImportance, HeadImportance, load_importance
from tests.head_pruning_fixtures import HEADS, SMALL, loader_of, make_teacher, orion_twin
from tools.head_pruning.block_importance import (SkippedBlock, analyze_block_importance, compute_block_importance,
                                                 compute_block_importance_cosine, compute_block_importance_kd_loss,
                                                 skipped_blocks)
from tools.head_pruning_utils import main

ROOT = Path(__file__).resolve().parents[1]
TINY_KD = ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py"


def made_identity(teacher, blocks):
    """A copy of ``teacher`` whose ``blocks`` add nothing to the residual stream (attn.proj and mlp.w3 zeroed)."""
    twin = copy.deepcopy(teacher)
    with torch.no_grad():
        for b in blocks:
            for linear in (twin.blocks[b].attn.proj, twin.blocks[b].mlp.w3):
                linear.weight.zero_()
                linear.bias.zero_()
    return twin


def explicit_kd_loss(teacher, student, loader, loss):
    """Mean over the (single-image) batches of CombinedKDLoss between the two backbones' own taps."""
    blocks = default_distill_blocks(len(teacher.blocks))
    values = []
    with torch.no_grad():
        for img in loader:
            s = student.forward_with_taps(img, hidden_blocks=blocks)
            t = teacher.forward_with_taps(img, hidden_blocks=blocks)
            values.append(float(loss(s, t)["backbone_distill_loss"]))
    return sum(values) / len(values)


def test_skipping_a_block_is_an_exact_identity_and_is_undone():
    teacher = make_teacher()
    img = loader_of(1)[0]
    originals = list(teacher.blocks)
    with torch.no_grad():
        full = teacher.forward_with_taps(img, hidden_blocks=[0, 1, 2])
        with teacher.tapping(hidden_blocks=[0, 1, 2]) as skipped, skipped_blocks(teacher, [1]):
            assert isinstance(teacher.blocks[1], SkippedBlock)
            teacher(img)  # blocks are called as block(x, mask, taps, i)
        identity = made_identity(teacher, [1])
        assert torch.equal(identity(img)[0], skipped.features[0])  # a block adding 0 is exactly the skipped block
    assert torch.equal(skipped.hidden_states[1], skipped.hidden_states[0])  # the tap of a skipped block: its input
    assert torch.equal(skipped.hidden_states[0], full.hidden_states[0])
    assert not torch.equal(skipped.features[0], full.features[0])
    assert list(teacher.blocks) == originals  # the same modules are back
    with pytest.raises(ValueError, match=r"expected indices in \[0, 3\), got \[3\]"):
        with skipped_blocks(teacher, [3]):
            pass
    assert list(teacher.blocks) == originals


def test_kd_loss_is_zero_for_an_identity_block_and_equals_the_kd_loss_of_the_zeroed_teacher():
    teacher = made_identity(make_teacher(seed=3), [1])
    loader = loader_of(2)
    imp = compute_block_importance_kd_loss(teacher, loader, progress=False)
    assert imp.method == "kd_loss" and imp.num_samples == 2 and imp.scores.shape == (3,)
    assert imp.scores[1].item() == 0.0
    assert imp.scores[0] > 0 and imp.scores[2] > 0
    loss = CombinedKDLoss(attention_distill_weight=0.0)
    # block 2's tap is its input either way; block 0's follows the student's block map (the depth-pruned test)
    assert imp.scores[2].item() == pytest.approx(explicit_kd_loss(teacher, made_identity(teacher, [2]), loader, loss),
                                                 rel=1e-6)
    parts = 0.5 * torch.tensor(imp.metadata["feature_loss"]) + 0.2 * torch.tensor(imp.metadata["output_loss"])
    assert torch.allclose(imp.scores, parts.double(), rtol=1e-12)
    assert imp.metadata["feature_blocks"] == [0, 1, 2] and imp.metadata["backbone"]["depth"] == 3
    assert teacher.training is False and all(p.requires_grad for p in teacher.parameters())  # state restored
    only_output = compute_block_importance(teacher, loader, kd_loss=dict(feature_distill_weight=0.0,
                                                                         output_distill_weight=1.0), progress=False)
    assert torch.allclose(only_output.scores, torch.tensor(imp.metadata["output_loss"], dtype=torch.float64))
    assert only_output.metadata["feature_blocks"] == []


def test_kd_loss_equals_the_kd_loss_of_the_depth_pruned_student_without_the_block():
    """The skip is what a student built without the block computes, taps included (default block map)."""
    teacher = make_teacher(seed=7)
    loader = loader_of(2)
    imp = compute_block_importance_kd_loss(teacher, loader, progress=False)
    loss = CombinedKDLoss(attention_distill_weight=0.0)
    for b in range(3):
        kept = [k for k in range(3) if k != b]
        student = EVAViTStudent(**dict(SMALL, num_heads=HEADS, teacher_num_heads=HEADS, selected_blocks=kept)).eval()
        student.load_from_teacher(teacher.state_dict())
        assert len(student.blocks) == 2
        assert imp.scores[b].item() == pytest.approx(explicit_kd_loss(teacher, student, loader, loss), rel=1e-5)
        with torch.no_grad(), skipped_blocks(teacher, [b]):
            img = loader[0]
            assert torch.equal(teacher(img)[0], student(img)[0])


def test_kd_loss_runs_on_orion_own_module_tree_with_the_same_scores():
    teacher = make_teacher(seed=4)
    loader = loader_of(2)
    ours = compute_block_importance_kd_loss(teacher, loader, progress=False)
    theirs = compute_block_importance_kd_loss(orion_twin(teacher), loader, progress=False)  # blocks called block(x)
    assert torch.allclose(ours.scores, theirs.scores, rtol=1e-4)


def test_cosine_equals_the_hand_computed_block_influence():
    teacher = make_teacher(seed=5)
    loader = loader_of(3, batch=2)
    imp = compute_block_importance_cosine(teacher, loader, progress=False)
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for img in loader:
            taps = teacher.forward_with_taps(img, hidden_blocks=[0, 1, 2])
            x0 = teacher.patch_embed(img)
            x0 = x0 + resize_abs_pos_embed(teacher.pos_embed, True, (x0.shape[1], x0.shape[2]))
            inputs = [x0, taps.hidden_states[0], taps.hidden_states[1]]
            for b in range(3):
                x, y = inputs[b].double(), taps.hidden_states[b].double()
                sums[b] += ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum()
            count += img.shape[0] * 7 * 7
    assert imp.method == "cosine" and imp.num_samples == 6
    assert torch.allclose(imp.scores, 1 - sums / count, rtol=1e-5, atol=1e-7)
    kd = compute_block_importance_kd_loss(teacher, loader, progress=False)
    assert torch.allclose(torch.tensor(kd.metadata["cosine"], dtype=torch.float64), imp.scores, rtol=1e-6)


def test_a_depth_pruned_backbone_and_bad_arguments_are_refused():
    teacher = make_teacher()
    del teacher.blocks[2]
    with pytest.raises(ValueError, match="needs the unpruned teacher: this backbone holds 2 of its 3 blocks"):
        compute_block_importance_cosine(teacher, loader_of(1), progress=False)
    teacher = make_teacher()
    with pytest.raises(ValueError, match="expected one of \\('kd_loss', 'cosine'\\), got 'magnitude'"):
        compute_block_importance(teacher, loader_of(1), method="magnitude")
    with pytest.raises(ValueError, match="both 0"):
        compute_block_importance(teacher, loader_of(1), kd_loss=CombinedKDLoss(feature_distill_weight=0,
                                                                               output_distill_weight=0))
    with pytest.raises(ValueError, match="kd_loss is used by method 'kd_loss' only"):
        compute_block_importance(teacher, loader_of(1), method="cosine", kd_loss=CombinedKDLoss())


def test_skip_analysis_equals_the_zeroed_teacher_and_the_analytic_costs():
    teacher = make_teacher(seed=6)
    train, val = loader_of(2, seed=1), loader_of(2, seed=2)
    imp = compute_block_importance_kd_loss(teacher, train, progress=False)
    analysis = analyze_block_importance(imp, model=teacher, dataloader=val, verbose=False)
    assert list(analysis["methods"]) == ["kd_loss", "cosine"]  # the kd_loss record brings its cosine along
    order = imp.order()
    assert analysis["methods"]["kd_loss"]["order"] == order
    rows = analysis["skip"]["kd_loss"]
    assert [r["k"] for r in rows] == [0, 1, 2] and rows[0]["speedup_ceiling"] == 1.0
    geometry = imp.metadata["backbone"]
    for row in rows[1:]:
        assert row["skipped"] == sorted(order[:row["k"]])
        twin = made_identity(teacher, row["skipped"])
        with torch.no_grad():
            cos = [torch.nn.functional.cosine_similarity(twin(img)[0].flatten(1).double(),
                                                         teacher(img)[0].flatten(1).double()).item() for img in val]
        assert row["cosine_similarity"] == pytest.approx(sum(cos) / len(cos), rel=1e-9)
        kept = [b not in row["skipped"] for b in range(3)]
        macs = analytic_backbone_macs((112, 112), 16, 3, 128, [341 * k for k in kept], 16, [8 * k for k in kept],
                                      geometry["window_per_block"])
        assert row["macs"] == macs and row["speedup_ceiling"] == pytest.approx(rows[0]["macs"] / macs)
    assert analysis["fidelity_images"] == 2


@pytest.fixture(scope="module")
def tiny_teacher_checkpoint():
    from tools.train_tiny_teacher import DEFAULT_CHECKPOINT, ensure_tiny_teacher
    return Path(ensure_tiny_teacher(DEFAULT_CHECKPOINT, verbose=False))


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_checkpoint):
    """The miniature teacher's backbone (ORION's EVAViT layout: 4 blocks, window blocks 0 and 2)."""
    from mmcv import Config
    from mmcv.models.builder import build_backbone
    from mmcv.models.utils.eva_surgery import extract_backbone_state_dict
    backbone = build_backbone(Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py")).model.img_backbone)
    backbone.load_state_dict(extract_backbone_state_dict(str(tiny_teacher_checkpoint)), strict=True)
    return backbone.eval()


def tiny_frames(split: str, count: int):
    from mmcv import Config
    from mmcv.datasets import build_dataset
    cfg = Config.fromfile(str(TINY_KD))
    dataset = build_dataset(dict(cfg.data[split].to_dict(), num_samples=count))
    return [dataset.collate_fn([dataset[i]]) for i in range(count)]


def test_the_ranking_of_the_miniature_teacher_is_deterministic(tiny_teacher):
    teacher = tiny_teacher
    frames = tiny_frames("train", 2)
    for method in ("kd_loss", "cosine"):
        first = compute_block_importance(teacher, frames, method=method, progress=False)
        again = compute_block_importance(teacher, frames, method=method, progress=False)
        assert torch.equal(first.scores, again.scores) and first.order() == again.order()
        assert first.num_blocks == 4 and first.order()[0] == 3 and first.order()[-1] == 0  # last block least
    assert first.source == "EVAViT"


def test_the_record_round_trips_through_json_and_bad_files_are_refused(tmp_path):
    record = BlockImportance(torch.tensor([0.5, 0.25, 1.0]), "kd_loss", num_samples=4, source="x",
                             metadata=dict(backbone=dict(depth=3), cosine=[0.1, 0.2, 0.3]))
    record.save(tmp_path / "b.json")
    loaded = BlockImportance.load(tmp_path / "b.json")
    assert torch.equal(loaded.scores, record.scores) and loaded.scores.dtype == torch.float64
    assert (loaded.method, loaded.num_samples, loaded.source, loaded.metadata) == ("kd_loss", 4, "x", record.metadata)
    assert loaded.order() == [1, 0, 2] and BlockImportance.coerce([1, 1, 0]).order() == [2, 0, 1]
    assert isinstance(load_importance(tmp_path / "b.json"), BlockImportance)
    assert BlockImportance.coerce(record) is record and BlockImportance.coerce(torch.ones(2)).num_blocks == 2
    with pytest.raises(ValueError, match="expected block importance"):
        BlockImportance.coerce(HeadImportance(torch.ones(3, 2), "x"))
    with pytest.raises(ValueError, match="expected heads importance"):
        HeadImportance.coerce(record)
    with pytest.raises(ValueError, match="it holds block importance"):
        HeadImportance.load(tmp_path / "b.json")
    HeadImportance(torch.ones(3, 2), "x").save(tmp_path / "h.json")
    ChannelImportance(torch.ones(3, 2), "x").save(tmp_path / "c.json")
    for name, found in (("h.json", "head"), ("c.json", "channel")):
        with pytest.raises(ValueError, match=f"h?c?.json: not a block importance file .*it holds {found} importance"):
            BlockImportance.load(tmp_path / name)
    bad = {"scores": ({"format": BlockImportance.FORMAT}, "'scores': missing"),
           "shape": (dict(record.to_dict(), scores=[[1.0]]), r"expected a \[depth\] array .* got shape \(1, 1\)"),
           "nan": (dict(record.to_dict(), scores=[1.0, float("nan"), 0.0]), "NaN or inf"),
           "text": (dict(record.to_dict(), scores=["a", 1, 2]), "expected one number per block"),
           "depth": (dict(record.to_dict(), scores=[1.0, 2.0]), "metadata.backbone.depth is 3 but there are 2"),
           "method": (dict(record.to_dict(), method=3), "'method': expected a string, got 3"),
           "samples": (dict(record.to_dict(), num_samples="4"), "'num_samples': expected an integer")}
    for name, (payload, message) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=f"{name}.json: .*{message}"):
            BlockImportance.load(path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        BlockImportance.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="block importance file not found: .*missing.json"):
        BlockImportance.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"b.npz: block importance files are .json, got extension '.npz'"):
        record.save(tmp_path / "b.npz")


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_end_to_end_on_the_tiny_kd_config(tiny_teacher_checkpoint, tiny_teacher, tmp_path, capsys):
    common = ["--config", str(TINY_KD), "--checkpoint", str(tiny_teacher_checkpoint), "--num-batches", "2",
              "--device", "cpu"]
    assert main(["importance", "--unit", "blocks", *common, "--out", str(tmp_path / "kd.json")]) == 0
    assert main(["importance", "--unit", "blocks", "--method", "cosine", *common, "--out", str(tmp_path / "cos.json")]) == 0
    out = capsys.readouterr().out
    assert "kd_loss importance of 4 blocks (4 samples" in out and "3 | global | " in out
    kd = BlockImportance.load(tmp_path / "kd.json")
    assert kd.metadata["feature_distill_weight"] == 0.5 and kd.metadata["output_distill_weight"] == 0.2  # kd_config
    assert kd.metadata["backbone"]["num_heads"] == 16  # the teacher, not the 8-head student of the config
    frames = tiny_frames("train", 2)
    assert torch.allclose(kd.scores, compute_block_importance_kd_loss(tiny_teacher, frames, progress=False).scores,
                          rtol=1e-5)
    assert main(["importance", *common, "--out", str(tmp_path / "heads.json")]) == 0
    assert main(["analyze", *common, "--split", "val", "--importance", str(tmp_path / "heads.json"),
                 "--block-importance", str(tmp_path / "kd.json"), str(tmp_path / "cos.json"),
                 "--pruning-ratios", "0.5", "--out", str(tmp_path / "a.json")]) == 0
    analysis = json.loads((tmp_path / "a.json").read_text())
    assert "cosine_similarity" in analysis["results"][0] and set(analysis["blocks"]["skip"]) == {"kd_loss", "cosine"}
    rows = analysis["blocks"]["skip"]["kd_loss"]
    assert len(rows) == 4 and rows[0]["cosine_similarity"] == pytest.approx(1.0) and rows[3]["speedup_ceiling"] > 1
    assert "Skipping the k least important blocks (teacher feature cosine on 4 images" in capsys.readouterr().out
    assert main(["analyze", "--block-importance", str(tmp_path / "kd.json"), "--out", str(tmp_path / "b.json")]) == 0
    assert "cosine_similarity" not in json.loads((tmp_path / "b.json").read_text())["blocks"]["skip"]["kd_loss"][1]
    assert main(["plot", "--importance", str(tmp_path / "kd.json"), "--out", str(tmp_path / "blocks.png")]) == 0
    assert main(["plot", "--importance", str(tmp_path / "heads.json"), "--block-importance", str(tmp_path / "kd.json"),
                 "--out", str(tmp_path / "heads.png")]) == 0
    for png in ("blocks.png", "heads.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    one_line_error(capsys, ["importance", "--unit", "blocks", "--method", "gradient", *common, "--out",
                            str(tmp_path / "x.json")], "--unit blocks: expected --method kd_loss or cosine, got 'gradient'")
    one_line_error(capsys, ["importance", *common, "--method", "cosine", "--out", str(tmp_path / "x.json")],
                   "--method cosine: scores whole blocks (importance --unit blocks)")
    one_line_error(capsys, ["analyze", "--block-importance", str(tmp_path / "heads.json"), "--out",
                            str(tmp_path / "x.json")], "not a block importance file (expected format")
    one_line_error(capsys, ["plot", "--importance", str(tmp_path / "kd.json"), "--block-importance",
                            str(tmp_path / "kd.json"), "--out", str(tmp_path / "x.png")],
                   "--block-importance: drawn beside a head importance heat map, but --importance holds block")
    assert not (tmp_path / "x.json").exists()
