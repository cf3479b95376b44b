"""The shipped tiny teacher: checksum, conversion to the ORION-format checkpoint, refusal of stale files."""
from __future__ import annotations

import shutil

import pytest
import torch

import tools.train_tiny_teacher as ttt
from tools import tiny_teacher_asset as asset

COUNT_QUESTIONS = ("qa_acc_count_cars", "qa_acc_count_pedestrians")


@pytest.fixture(scope="module")
def shipped():
    return asset.read_shipped_teacher()


def test_shipped_teacher_matches_its_checksum_and_is_small(shipped):
    assert shipped["sha256"] == asset.expected_sha256() == asset.file_sha256(asset.SHIPPED_TEACHER)
    assert asset.SHIPPED_TEACHER.stat().st_size < 8 * 2 ** 20


def test_shipped_teacher_beats_chance_on_every_task_and_question_type(shipped):
    """Detection, lanes, plan, traffic state and all four question types (the two counts too) beat the
    image-blind chance, and the validation curve covers both training stages."""
    metrics, chance = shipped["meta"]["metrics"], shipped["meta"]["chance"]
    for key in ("det_f1", "lane_iou", "qa_acc", "qa_acc_light_state", "qa_acc_next_action", "traffic_state_acc",
                "traffic_state_acc_hidden") + COUNT_QUESTIONS:
        assert metrics[key] > chance[key], key
    assert metrics["plan_l2"] < chance["plan_l2"]
    stages, curve = shipped["meta"]["stage_iters"], shipped["meta"]["curve"]
    assert len(stages) == 2 and sum(stages) == shipped["meta"]["iter"]
    assert curve[-1]["iter"] == shipped["meta"]["iter"] and len(curve) >= 10
    assert any(point["iter"] == stages[0] for point in curve)  # the end of stage 1 is on the curve


def test_materialized_checkpoint_holds_the_shipped_weights_and_loads_strictly(shipped, tmp_path):
    out = asset.materialize_teacher_checkpoint(tmp_path / "teacher.pth", verbose=False)
    model = ttt.load_tiny_teacher(out)
    state = model.state_dict()
    assert set(state) == set(shipped["state_dict"])
    assert all(torch.equal(state[k], shipped["state_dict"][k]) for k in state)
    asset.check_materialized(out)  # written from the current shipped file: accepted


def test_a_damaged_shipped_file_is_refused_with_the_fix(tmp_path):
    copy = tmp_path / "teacher.safetensors"
    shutil.copy(asset.SHIPPED_TEACHER, copy)
    with open(copy, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    with pytest.raises(asset.TeacherAssetError, match="does not match .*git checkout"):
        asset.verify_shipped_teacher(copy, asset.SHIPPED_CHECKSUM)
    with pytest.raises(asset.TeacherAssetError, match="missing"):
        asset.verify_shipped_teacher(tmp_path / "absent.safetensors", asset.SHIPPED_CHECKSUM)


def test_stale_cached_teacher_gets_a_one_line_error_naming_file_and_fix(tmp_path, monkeypatch):
    stale = tmp_path / "orion_tiny.pth"
    torch.save({"meta": {"config": "old"}, "state_dict": {"img_backbone.pos_embed": torch.zeros(1)}}, stale)
    monkeypatch.setattr(ttt, "MATERIALIZED_CHECKPOINT", stale)
    with pytest.raises(asset.TeacherAssetError) as err:
        ttt.ensure_tiny_teacher(stale, verbose=False)
    message = str(err.value)
    assert "\n" not in message and str(stale) in message and "delete it" in message
    stale.unlink()
    assert ttt.ensure_tiny_teacher(stale, verbose=False) == str(stale)  # missing: rewritten from the shipped file
    asset.check_materialized(stale)


def test_older_architecture_checkpoint_fails_to_load_in_one_line(shipped, tmp_path):
    state = dict(shipped["state_dict"])
    state.pop(next(iter(state)))
    path = tmp_path / "old.pth"
    torch.save({"meta": {"config": shipped["meta"]["config"]}, "state_dict": state}, path)
    with pytest.raises(ValueError, match="does not fit the TinyOrion of its config .*1 missing") as err:
        ttt.load_tiny_teacher(path)
    assert "\n" not in str(err.value)


def test_retrained_teacher_is_compared_with_the_shipped_one(shipped):
    same = asset.compare_with_shipped(shipped["state_dict"], shipped["meta"]["metrics"])
    assert same[0] == "identical to the shipped teacher"
    other = {k: v + 1 if v.is_floating_point() else v for k, v in shipped["state_dict"].items()}
    assert asset.compare_with_shipped(other, None)[0].startswith("differs from the shipped teacher")
