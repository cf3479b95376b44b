"""SyntheticChatB2D, its collate function and the miniature world's metrics (CPU, a few seconds)."""
from __future__ import annotations

import hashlib

import pytest
import torch

import numpy as np

from mmcv.datasets import (DATASETS, ChatB2DMetrics, ChatTokenizer, PriorBaseline, SyntheticChatB2D, build_dataset,
                           chance_levels, collate_chat_b2d, evaluate)
from mmcv.datasets.chat_b2d_metrics import box_iou, f1_score, match_detections
from mmcv.datasets.synthetic_chat_b2d import scene_flags


def _assert_samples_equal(a: dict, b: dict) -> None:
    assert a["img_metas"] == b["img_metas"]
    for key in ("img", "gt_lane_masks", "ego_fut_trajs", "vlm_question_ids", "vlm_answer_ids"):
        assert torch.equal(a[key], b[key]), key
    for key in ("gt_bboxes", "gt_labels", "gt_light_states"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key


# ----------------------------------------------------------------------------- dataset


def test_same_seed_gives_identical_samples_regardless_of_access_order():
    first = SyntheticChatB2D("train", num_samples=16, seed=3, cache=False)
    second = SyntheticChatB2D("train", num_samples=16, seed=3, cache=True)
    later = [second[i] for i in (9, 2, 7)]
    _assert_samples_equal(first[7], later[2])
    _assert_samples_equal(first[2], later[1])
    # sample 9, rendered first by the caching dataset, equals a lone rendering by a fresh one
    _assert_samples_equal(SyntheticChatB2D("train", num_samples=16, seed=3, cache=False)[9], later[0])
    pixels = (later[0]["img"] * torch.tensor(SyntheticChatB2D.IMG_STD).view(1, 3, 1, 1)
              + torch.tensor(SyntheticChatB2D.IMG_MEAN).view(1, 3, 1, 1)).mul(255).round().to(torch.uint8)
    # known answer (the rendering of this numpy/PCG64 stream): the image bytes as rendered, HWC uint8
    digest = hashlib.sha256(pixels.permute(0, 2, 3, 1).contiguous().numpy().tobytes()).hexdigest()
    assert digest == "e79191b1726948c4d0c5500cad1a1080431ba66393cd4af075c31527e2824323"
    assert later[0]["img_metas"]["answers"] == ["zero", "zero", "none", "go straight"]


def test_seed_and_split_change_the_data():
    base = SyntheticChatB2D("train", num_samples=4, seed=0)[0]["img"]
    assert not torch.equal(base, SyntheticChatB2D("train", num_samples=4, seed=1)[0]["img"])
    assert not torch.equal(base, SyntheticChatB2D("val", num_samples=4, seed=0)[0]["img"])


def test_sample_shapes_and_target_ranges():
    ds = SyntheticChatB2D("val", num_samples=8, img_size=(80, 80), num_cams=2)
    for i in range(len(ds)):
        s = ds[i]
        assert s["img"].shape == (2, 3, 80, 80) and s["img"].dtype == torch.float32
        assert s["gt_lane_masks"].shape == (2, 20, 20)
        assert set(s["gt_lane_masks"].unique().tolist()) <= {0.0, 1.0}
        assert s["ego_fut_trajs"].shape == (6, 2)
        assert s["vlm_question_ids"].shape == (4, 9) and s["vlm_answer_ids"].shape == (4, 3)
        assert len(s["gt_bboxes"]) == len(s["gt_labels"]) == len(s["gt_light_states"]) == 2
        for boxes, labels, states in zip(s["gt_bboxes"], s["gt_labels"], s["gt_light_states"]):
            assert boxes.shape == (len(labels), 4)
            if len(boxes):
                assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all()
                assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
                assert ((labels >= 0) & (labels < 3)).all()
                assert ((states >= 0) == (labels == 2)).all()
        assert s["img_metas"]["cam_names"] == ["CAM_FRONT", "CAM_BACK"]


def test_answers_and_plan_follow_the_scene():
    ds = SyntheticChatB2D("train", num_samples=48, seed=5, cache=False)
    tok = ChatTokenizer()
    numbers = ("zero", "one", "two", "three", "four")
    for i in range(len(ds)):
        s = ds[i]
        meta = s["img_metas"]
        labels = s["gt_labels"][0]
        assert meta["answers"][0] == numbers[int((labels == 0).sum())]
        assert meta["answers"][1] == numbers[int((labels == 1).sum())]
        assert [tok.decode(a) for a in s["vlm_answer_ids"]] == meta["answers"]
        if meta["light_state"] == "red":
            assert meta["action"] == "stop"
        if meta["action"] == "stop":
            assert float(s["ego_fut_trajs"][:, 0].max()) <= 2.5
        elif meta["action"] != "slow down":
            assert float(s["ego_fut_trajs"][-1, 0]) == pytest.approx(18.0)
        lights = int((labels == 2).sum())
        assert lights <= 1 and (meta["light_state"] != "none" or not lights)
        if meta["light_hidden"]:  # no pixel in view: no box either
            assert not lights and meta["light_state"] != "none"


def test_samples_are_consecutive_frames_of_scenes_with_orion_group_flags():
    ds = SyntheticChatB2D("train", num_samples=20, scene_len=8, frame_dt=0.5)
    metas = [ds[i]["img_metas"] for i in range(20)]
    assert ds.flag.tolist() == [i // 8 for i in range(20)]
    assert [m["frame_idx"] for m in metas] == [i % 8 for i in range(20)]
    for scene in range(3):
        frames = metas[scene * 8:(scene + 1) * 8]
        assert len({m["scene_token"] for m in frames}) == 1
        assert np.allclose(np.diff([m["timestamp"] for m in frames]), 0.5)
    assert metas[8]["scene_token"] != metas[7]["scene_token"] and metas[8]["timestamp"] - metas[7]["timestamp"] >= 2.0
    assert scene_flags(10, 4, seq_split_num=2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # ORION's pieces
    assert scene_flags(5, 4, seq_split_num="all").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="seq_mode=False"):
        SyntheticChatB2D(seq_mode=False)


def _light_boxes(ds: SyntheticChatB2D, scene: int) -> list:
    out = []
    for k in range(ds.scene_len):
        s = ds[scene * ds.scene_len + k]
        lights = s["gt_bboxes"][0][s["gt_labels"][0] == 2]
        out.append((lights[0] if len(lights) else None, s["img_metas"]))
    return out


def test_a_traffic_light_approaches_rises_out_of_view_and_its_state_stays_the_answer():
    ds = SyntheticChatB2D("train", num_samples=8 * 24, cache=False)
    hidden_later = 0
    for scene in range(24):
        frames = _light_boxes(ds, scene)
        state = frames[0][1]["light_state"]
        assert all(m["light_state"] == state and m["answers"][2] == state for _, m in frames)
        if state == "none":
            assert not any(m["light_hidden"] for _, m in frames)
            continue
        assert not frames[0][1]["light_hidden"]  # in view in the first frame of its scene
        visible = [box for box, m in frames if box is not None]
        hidden = [m["light_hidden"] for _, m in frames]
        assert hidden == sorted(hidden)  # once out of view, it stays out of view
        tops = [float(b[1]) for b in visible]
        widths = [float(b[2] - b[0]) for b in visible]
        assert tops == sorted(tops, reverse=True) and widths == sorted(widths)  # rising and growing as we approach
        hidden_later += hidden[-1]
        if state == "red":
            assert all(m["action"] == "stop" for _, m in frames)
    assert hidden_later >= 8  # most lit scenes end with the light out of view: only memory knows its state
    assert sum(frames[0][0] is not None for frames in [_light_boxes(ds, s) for s in range(6)]
               if frames[0][1]["light_state"] != "none") >= 2  # and usually a detection target at first


def test_objects_move_consistently_between_frames():
    ds = SyntheticChatB2D("train", num_samples=8 * 12, cache=False)
    for scene in range(12):
        script = ds.scene_script(scene)
        travel = [script.ego_travel(k * ds.frame_dt) for k in range(ds.scene_len)]
        assert np.all(np.diff(travel) >= 0)  # the ego never drives backwards
        if script.decel > 0:  # braking for a red or yellow light: it stops before the light
            assert script.light_distance(100.0) >= 3.4
        for thing in script.front:
            z = [thing.distance(k * ds.frame_dt, travel[k], rear=False) for k in range(ds.scene_len)]
            if thing.mode == "static":  # pedestrians and bushes come closer exactly as far as the ego drives
                assert np.allclose(np.array(z) + np.array(travel), z[0])
            elif thing.mode == "gap":
                assert min(z) >= 6.4  # the car ahead in the ego lane keeps its distance
        assert ds[scene * 8]["img_metas"]["curvature"] == ds[scene * 8 + 7]["img_metas"]["curvature"]


def test_collate_stacks_fixed_shapes_and_keeps_ragged_lists():
    ds = SyntheticChatB2D("val", num_samples=3)
    batch = ds.collate_fn([ds[i] for i in range(3)])
    assert ds.collate_fn is collate_chat_b2d
    assert batch["img"].shape == (3, 2, 3, 80, 80)
    assert batch["gt_lane_masks"].shape == (3, 2, 20, 20)
    assert batch["ego_fut_trajs"].shape == (3, 6, 2)
    assert batch["vlm_question_ids"].shape == (3, 4, 9)
    assert isinstance(batch["gt_bboxes"], list) and len(batch["gt_bboxes"]) == 3 and len(batch["gt_bboxes"][0]) == 2
    assert [m["sample_idx"] for m in batch["img_metas"]] == [0, 1, 2]
    small = SyntheticChatB2D("val", num_samples=1, img_size=(64, 64))[0]
    with pytest.raises(ValueError, match="'img'"):
        collate_chat_b2d([ds[0], small])


def test_build_dataset_from_config_and_clear_errors():
    ds = build_dataset(dict(type="SyntheticChatB2D", split="val", num_samples=5))
    assert isinstance(ds, SyntheticChatB2D) and len(ds) == 5
    assert DATASETS.get("SyntheticChatB2D") is SyntheticChatB2D
    with pytest.raises(ValueError, match="split"):
        SyntheticChatB2D("dev")
    with pytest.raises(ValueError, match="lane_mask_stride"):
        SyntheticChatB2D(img_size=(80, 80), lane_mask_stride=3)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(TypeError, match="type"):
        build_dataset(dict(split="val"))


def test_tokenizer_round_trip_and_closed_vocabulary():
    tok = ChatTokenizer()
    q = tok.encode_question("what is the traffic light state ?")
    assert len(q) == 9 and q[0] == tok.pad_id and tok.bos_id in q
    assert tok.decode(q) == "<bos> what is the traffic light state ?"
    a = tok.encode_answer("turn left")
    assert a == tok.encode("turn left") + [tok.eos_id]
    assert tok.decode(a) == "turn left"
    with pytest.raises(KeyError, match="banana"):
        tok.encode("banana")


# ----------------------------------------------------------------------------- metrics


def test_box_iou_on_hand_made_boxes():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1.0, 50.0 / 150.0, 0.0]]))


def test_match_detections_counts_class_iou_and_duplicates():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    gt_labels = torch.tensor([0, 1])
    # exact box of class 0 (tp), duplicate of it (fp), right place wrong class for gt 1 (fp + fn)
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [20.0, 0.0, 30.0, 10.0]])
    tp, fp, fn = match_detections(pred, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 2]), gt, gt_labels)
    assert tp.tolist() == [1, 0, 0] and fp.tolist() == [1, 0, 1] and fn.tolist() == [0, 1, 0]
    # IoU just below 0.5 is a miss; at 0.5 it is a hit
    shifted = torch.tensor([[0.0, 0.0, 10.0, 10.0 * 0.49]])
    tp, fp, fn = match_detections(shifted, torch.ones(1), torch.zeros(1, dtype=torch.long), gt[:1], gt_labels[:1])
    assert (tp.sum(), fp.sum(), fn.sum()) == (0, 1, 1)
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0]])
    tp, _, _ = match_detections(half, torch.ones(1), torch.zeros(1, dtype=torch.long), gt[:1], gt_labels[:1])
    assert tp.sum() == 1
    assert f1_score(1, 1, 1) == pytest.approx(0.5) and f1_score(0, 0, 0) == 1.0


def _hand_made_batch_and_predictions():
    tok = ChatTokenizer()
    lane_gt = torch.zeros(1, 1, 2, 2)
    lane_gt[0, 0, 0] = 1.0  # two positive cells
    batch = dict(
        img_metas=[dict(qa_types=["count_cars", "light_state"])],
        gt_bboxes=[[torch.tensor([[0.0, 0.0, 10.0, 10.0]])]],
        gt_labels=[[torch.tensor([0])]],
        gt_lane_masks=lane_gt,
        vlm_answer_ids=torch.tensor([[tok.encode_answer("two"), tok.encode_answer("red")]]),
        ego_fut_trajs=torch.tensor([[[3.0, 0.0], [6.0, 0.0]]]),
    )
    lane_pred = torch.tensor([[[True, False], [True, False]]])  # 1 of 2 right, 1 wrong: IoU 1/3
    pred = dict(boxes=[torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])],
                scores=[torch.tensor([0.9, 0.8])], labels=[torch.tensor([0, 1])], lane_masks=lane_pred,
                answer_ids=[tok.encode("two"), tok.encode("green")],
                plan=torch.tensor([[3.0, 4.0], [6.0, 0.0]]))
    return batch, [pred]


def test_chat_b2d_metrics_on_a_hand_made_case():
    batch, preds = _hand_made_batch_and_predictions()
    metrics = ChatB2DMetrics(qa_types=("count_cars", "light_state"), plan_dt=0.5)
    metrics.update(preds, batch)
    out = metrics.compute()
    assert out["det_precision"] == pytest.approx(0.5) and out["det_recall"] == pytest.approx(1.0)
    assert out["det_f1"] == pytest.approx(2 / 3)
    assert out["lane_iou"] == pytest.approx(1 / 3)
    assert out["qa_acc"] == pytest.approx(0.5)
    assert out["qa_acc_count_cars"] == 1.0 and out["qa_acc_light_state"] == 0.0
    assert out["plan_l2"] == pytest.approx(2.0)  # errors 5 and 0
    assert out["plan_l2_1s"] == pytest.approx(2.0) and "plan_l2_2s" not in out


def test_metrics_name_the_bad_prediction():
    batch, preds = _hand_made_batch_and_predictions()
    del preds[0]["plan"]
    with pytest.raises(KeyError, match="plan"):
        ChatB2DMetrics(qa_types=("count_cars", "light_state")).update(preds, batch)


class _Oracle(torch.nn.Module):
    """Returns the ground truth of the batch as its prediction."""

    def forward(self, data, return_loss=False):
        out = []
        for b in range(len(data["img_metas"])):
            out.append(dict(boxes=data["gt_bboxes"][b], scores=[torch.ones(len(x)) for x in data["gt_bboxes"][b]],
                            labels=data["gt_labels"][b], lane_masks=data["gt_lane_masks"][b] > 0.5,
                            answer_ids=[a.tolist() for a in data["vlm_answer_ids"][b]],
                            plan=data["ego_fut_trajs"][b]))
        return out


def test_evaluate_gives_perfect_scores_to_an_oracle_and_restores_mode():
    ds = SyntheticChatB2D("val", num_samples=6)
    oracle = _Oracle().train()
    out = evaluate(oracle, ds, batch_size=4)
    assert oracle.training
    assert out["det_f1"] == 1.0 and out["lane_iou"] == 1.0 and out["qa_acc"] == 1.0 and out["plan_l2"] == 0.0
    assert out["num_samples"] == 6.0
    assert evaluate(oracle, ds, max_samples=2)["num_samples"] == 2.0


def test_metrics_on_frames_with_the_light_out_of_view():
    batch, preds = _hand_made_batch_and_predictions()
    batch["img_metas"][0]["light_hidden"] = True
    metrics = ChatB2DMetrics(qa_types=("count_cars", "light_state"))
    metrics.update(preds, batch)
    out = metrics.compute()
    assert out["num_light_hidden"] == 1.0 and out["qa_acc_light_state_hidden"] == 0.0  # answered green, was red
    assert out["plan_l2_light_hidden"] == pytest.approx(2.0)


def test_image_blind_baseline_sets_low_chance_levels():
    train, val = SyntheticChatB2D("train", num_samples=96), SyntheticChatB2D("val", num_samples=32)
    chance = chance_levels(train, val, max_train_samples=96)
    assert chance["det_f1"] < 0.15
    assert 0.15 < chance["qa_acc"] < 0.5
    assert 0.0 < chance["lane_iou"] < 0.6
    assert chance["plan_l2"] > 1.0
    baseline = PriorBaseline().fit(train, 16)
    batch = val.collate_fn([val[0], val[1]])
    first, again = baseline(batch), baseline(batch)
    assert all(torch.equal(x, y) for x, y in zip(first[0]["boxes"], again[0]["boxes"]))
    with pytest.raises(RuntimeError, match="fit"):
        PriorBaseline()(batch)
