"""TinyOrion: ORION's detector contract, loss semantics, temporal memory, teacher training and checkpoints (CPU)."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mmcv import Config
from mmcv.datasets import SyntheticChatB2D
from mmcv.models.builder import build_model
from mmcv.models.detectors.grid_mask import GridMask
from mmcv.models.detectors.tiny_orion import TinyOrion
from mmcv.datasets import evaluate
from tools.train_tiny_teacher import ensure_tiny_teacher, load_tiny_teacher, train_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"
EXPECTED_LOSS_KEYS = {"loss_cls", "loss_bbox", "loss_iou", "loss_traffic", "loss_traffic_state", "loss_cls_lane",
                      "loss_dice_lane", "vlm_loss", "loss_plan_reg"}


def small_cfg(max_iters: int = 3, language_iters: int = 2) -> Config:
    """The shipped config with small splits and short stages."""
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict({"data.train.num_samples": 64, "data.val.num_samples": 16, "evaluation.max_samples": 16,
                         "runner.max_iters": max_iters, "language_stage.max_iters": language_iters,
                         "language_stage.samples_per_gpu": 4,
                         "lr_config.warmup_iters": 2, "log_config.interval": 1000})
    return cfg


@pytest.fixture(scope="module")
def cfg() -> Config:
    return small_cfg()


@pytest.fixture(scope="module")
def model(cfg) -> TinyOrion:
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.fixture
def fresh_model(cfg) -> TinyOrion:
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.fixture(scope="module")
def batch(cfg) -> dict:
    ds = SyntheticChatB2D(**{k: v for k, v in cfg.data.val.items() if k != "type"})
    return ds.collate_fn([ds[i] for i in range(3)])


def test_import_mmcv_does_not_import_transformers():
    code = ("import sys, mmcv, mmcv.models, mmcv.datasets; "
            "assert 'transformers' not in sys.modules, 'transformers imported by mmcv'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_model_has_orion_attributes_and_an_eva_backbone(model):
    for name in ("img_backbone", "img_neck", "pts_bbox_head", "map_head", "lm_head", "grid_mask", "use_grid_mask",
                 "tokenizer"):
        assert hasattr(model, name), name
    bb = model.img_backbone
    assert type(bb).__name__ == "EVAViT"
    assert bb.num_heads_per_layer == [16] * bb.depth
    windows = [block.window_size for block in bb.blocks]
    assert 0 in windows and any(w > 0 for w in windows)  # both global and window blocks
    assert model.img_neck is None
    keys = model.state_dict().keys()
    assert "img_backbone.blocks.0.attn.q_proj.weight" in keys and "lm_head.model.model.embed_tokens.weight" in keys


def test_extract_img_feat_reshapes_like_orion_and_masks_only_in_training(model, batch):
    model.eval()
    feats = model.extract_img_feat(batch["img"])
    assert feats.shape == (3, 2, 128, 10, 10)
    assert torch.equal(feats, model.extract_feat(batch["img"]))
    single = model.extract_img_feat(batch["img"][:1])
    assert torch.allclose(single, feats[:1], atol=1e-5)
    with pytest.raises(ValueError, match="img"):
        model.extract_img_feat(batch["img"][0, 0, 0])


def test_grid_mask_hides_squares_in_training_only():
    gm = GridMask(prob=1.0, ratio=0.5, d_min=8, d_max=9)
    x = torch.ones(2, 3, 64, 64)
    torch.manual_seed(0)
    masked = gm.train()(x)
    hidden = float((masked == 0).float().mean())
    assert 0.1 < hidden < 0.4  # (1 - ratio)^2 = 0.25 of the image
    assert torch.equal(masked[0], masked[1])  # one grid per batch by default
    assert torch.equal(gm.eval()(x), x)
    with pytest.raises(ValueError, match="ratio"):
        GridMask(ratio=1.0)


def test_forward_train_returns_orion_loss_keys_and_backpropagates(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model.forward_train(**batch)
    assert set(losses) == EXPECTED_LOSS_KEYS
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    out = model(batch, return_loss=True)
    assert set(out) == {"loss", "log_vars", "num_samples"} and out["num_samples"] == 3
    assert set(out["log_vars"]) == EXPECTED_LOSS_KEYS | {"loss"}
    assert out["log_vars"]["loss"] == pytest.approx(out["loss"].item())
    out["loss"].backward()
    for name in ("img_backbone.blocks.0.attn.q_proj.weight", "pts_bbox_head.cls_out.weight",
                 "map_head.out.weight", "lm_head.model.model.layers.0.self_attn.q_proj.weight",
                 "lm_head.plan_head.0.weight", "vl_proj.proj.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model(**batch)["num_samples"] == 3  # keyword form, as mmcv runners call it


def test_parse_losses_sums_every_key_containing_loss():
    losses = {"loss_a": torch.tensor([1.0, 3.0]), "aux_loss_diag": torch.tensor(0.25),
              "loss_parts": [torch.tensor(1.0), torch.tensor(0.5)], "acc": torch.tensor(0.9)}
    total, log_vars = TinyOrion._parse_losses(losses)
    assert total.item() == 2.0 + 0.25 + 1.5  # the diagnostic key containing 'loss' is summed too
    assert log_vars == {"loss_a": 2.0, "aux_loss_diag": 0.25, "loss_parts": 1.5, "acc": pytest.approx(0.9),
                        "loss": 3.75}
    assert list(log_vars)[-1] == "loss"
    with pytest.raises(TypeError, match="'bad'"):
        TinyOrion._parse_losses({"loss_a": torch.tensor(1.0), "bad": 3.0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PARSE_LOSSES_RANK = """
import json, sys, torch, torch.distributed as dist
from mmcv.models.detectors.tiny_orion import TinyOrion
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=2)
losses = {"loss_x": torch.tensor(1.0 + 2.0 * rank), "loss_y": torch.tensor(0.5)}
total, log_vars = TinyOrion._parse_losses(losses)
result = dict(total=total.item(), log_vars=log_vars)
extra = {"loss_x": torch.tensor(1.0)} if rank == 0 else {"loss_x": torch.tensor(1.0), "loss_z": torch.tensor(1.0)}
try:
    TinyOrion._parse_losses(extra)
except AssertionError as exc:
    result["mismatch"] = str(exc)
json.dump(result, open(out, "w"))
dist.destroy_process_group()
"""


def test_parse_losses_averages_log_values_over_two_ranks_and_rejects_differing_keys(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _PARSE_LOSSES_RANK, str(r), port, str(tmp_path / f"{r}.json")],
                              cwd=REPO) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result["total"] == 1.0 + 2.0 * rank + 0.5  # the optimised loss stays this rank's own
        assert result["log_vars"] == {"loss_x": 2.0, "loss_y": 0.5, "loss": 2.5}  # logged values: the mean over ranks
        assert "every rank must produce the same loss keys" in result["mismatch"]


def test_vl_tokens_are_side_effect_free(model, batch):
    model.eval()
    model.reset_memory()
    feats = model.extract_img_feat(batch["img"])
    params = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    calls = model.pts_bbox_head.num_train_calls
    first = model.vl_tokens(feats, **batch)
    second = model.vl_tokens([feats], img_metas=batch["img_metas"])
    per_cam = math.ceil(10 / model.vl_proj.pool) ** 2 + 1 + 1  # local tokens, one global token, one count token
    assert model.vl_proj.count_tokens
    assert first.shape == (3, 2 * per_cam, 64) and torch.equal(first, second)
    assert model.pts_bbox_head.num_train_calls == calls
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    det_out = model.pts_bbox_head(feats.flatten(0, 1))  # the tokens forward_train feeds the LM are the same
    assert torch.allclose(model._vl_tokens_from(feats, det_out), first, atol=1e-6)


def test_test_path_returns_one_prediction_per_sample(model, batch):
    model.eval()
    preds = model(batch, return_loss=False)
    assert len(preds) == 3
    p = preds[0]
    assert len(p["boxes"]) == len(p["scores"]) == len(p["labels"]) == 2
    assert p["lane_masks"].shape == (2, 20, 20) and p["lane_masks"].dtype == torch.bool
    assert p["plan"].shape == (6, 2) and len(p["answer_ids"]) == 4 and len(p["answers"]) == 4
    no_questions = model({"img": batch["img"], "img_metas": batch["img_metas"]}, return_loss=False)
    assert len(no_questions[0]["answers"]) == 4  # the default questions


def _frames(scene_len: int = 4, num_scenes: int = 3) -> SyntheticChatB2D:
    return SyntheticChatB2D("val", num_samples=scene_len * num_scenes, scene_len=scene_len)


def _head_with_active_memory(model: TinyOrion):
    head = model.pts_bbox_head
    torch.manual_seed(1)
    torch.nn.init.normal_(head.memory_fuse[-1].weight, std=0.5)  # an untrained memory is the identity
    return head


def test_memory_carries_the_previous_frame_of_each_slot_and_resets_at_scene_change_or_2s_gap(fresh_model):
    model, ds = fresh_model, _frames()
    head = _head_with_active_memory(model).eval()
    feats = model.extract_img_feat(ds.collate_fn([ds[0], ds[4]])["img"]).flatten(0, 1)
    meta = lambda i, **kw: dict(ds[i]["img_metas"], **kw)  # noqa: E731
    with torch.no_grad():
        head.reset_memory()
        fresh = head(feats, [meta(1), meta(5)])["cls_logits"]
        head.reset_memory()
        head(feats, [meta(0), meta(4)])
        assert head.memory.kept_slots([meta(1), meta(8)]) == [True, False]  # slot 1 moved to another scene
        carried = head(feats, [meta(1), meta(8)])["cls_logits"]
        assert not torch.allclose(carried[:2], fresh[:2])  # slot 0 (2 cameras) used frame 0's memory
        assert torch.allclose(carried[2:], fresh[2:])  # slot 1 started from an empty memory
        late = meta(2, timestamp=meta(1)["timestamp"] + 2.0)
        assert head.memory.kept_slots([late, meta(9)]) == [False, True]  # 2 s apart: reset, as ORION's heads
        back = meta(1, timestamp=meta(1)["timestamp"] - 0.5)
        assert head.memory.kept_slots([back, meta(9)]) == [True, True]  # |dt| < 2 s, as ORION's check
    head.reset_memory()
    assert head.memory.kept_slots([meta(1), meta(5)]) == [False, False]


def test_memory_acts_in_training_mode_and_stays_out_of_the_state_dict(fresh_model):
    model, ds = fresh_model, _frames()
    head = _head_with_active_memory(model).train()
    batch0, batch1 = ds.collate_fn([ds[0]]), ds.collate_fn([ds[1]])
    feats = model.extract_img_feat(batch0["img"]).flatten(0, 1).detach()
    head.reset_memory()
    alone = head(feats, batch1["img_metas"])["cls_logits"]
    head.reset_memory()
    head(feats, batch0["img_metas"])
    after_frame0 = head(feats, batch1["img_metas"])["cls_logits"]
    assert not torch.allclose(alone, after_frame0)
    after_frame0.sum().backward()  # no gradient flows into the stored (detached) memory
    assert head.memory._memory.grad_fn is None and not head.memory._memory.requires_grad
    assert not any("memory" in k and "fuse" not in k for k in model.state_dict())


def test_a_training_step_runs_the_head_once_and_vl_tokens_reuse_its_memory(fresh_model):
    model, ds = fresh_model, _frames()
    _head_with_active_memory(model)
    model.train()
    frame0, frame1 = ds.collate_fn([ds[0], ds[4]]), ds.collate_fn([ds[1], ds[5]])
    model(frame0, return_loss=True)
    calls = model.pts_bbox_head.num_train_calls
    model(frame1, return_loss=True)
    assert model.pts_bbox_head.num_train_calls == calls + 1
    assert model.pts_bbox_head.memory._tokens == [m["scene_token"] for m in frame1["img_metas"]]
    model.eval()
    with torch.no_grad():
        feats = model.extract_img_feat(frame1["img"])
        model.pts_bbox_head(feats.flatten(0, 1), frame0["img_metas"])  # memory := frame 0 of both slots
        det_out = model.pts_bbox_head(feats.flatten(0, 1), frame1["img_metas"])  # frame 1, reading frame 0
        stored = model.pts_bbox_head.memory._memory.clone()
        tokens = model.vl_tokens(feats, **frame1)
        assert torch.allclose(tokens, model._vl_tokens_from(feats, det_out), atol=1e-6)  # the step's memory
        assert torch.equal(model.pts_bbox_head.memory._memory, stored)  # and no state change


class _RecordingModel(torch.nn.Module):
    """Records the order of the frames it is shown and every memory reset."""

    def __init__(self) -> None:
        super().__init__()
        self.seen, self.resets = [], 0

    def reset_memory(self) -> None:
        self.resets += 1

    def forward(self, data, return_loss=False):
        self.seen.append([(m["scene_token"], m["frame_idx"]) for m in data["img_metas"]])
        return [dict(boxes=[torch.zeros(0, 4)] * 2, scores=[torch.zeros(0)] * 2,
                     labels=[torch.zeros(0, dtype=torch.long)] * 2, lane_masks=torch.zeros(2, 20, 20, dtype=torch.bool),
                     answer_ids=[[], [], [], []], plan=torch.zeros(6, 2)) for _ in data["img_metas"]]


def test_evaluate_streams_scenes_per_slot_and_can_reset_the_memory_every_frame():
    ds = _frames(scene_len=4, num_scenes=4)
    model = _RecordingModel()
    evaluate(model, ds, batch_size=2)
    assert model.resets == 1 and len(model.seen) == 8
    for slot in range(2):
        walked = [step[slot] for step in model.seen]
        assert [f for _, f in walked] == [0, 1, 2, 3, 0, 1, 2, 3]
        assert len({t for t, _ in walked[:4]}) == 1 and walked[0][0] != walked[4][0]
    model = _RecordingModel()
    evaluate(model, ds, batch_size=2, reset_memory_each_frame=True)
    assert model.resets == 8


def test_same_seed_gives_the_same_teacher():
    a = train_tiny_teacher(small_cfg(2), seed=1, evaluate_at_end=False, verbose=False)["model"].state_dict()
    b = train_tiny_teacher(small_cfg(2), seed=1, evaluate_at_end=False, verbose=False)["model"].state_dict()
    c = train_tiny_teacher(small_cfg(2), seed=2, evaluate_at_end=False, verbose=False)["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "orion_tiny.pth"
    cfg = small_cfg(30)
    cfg.merge_from_dict({"data.train.num_samples": 128})
    return train_tiny_teacher(cfg, seed=0, out=out, verbose=False)


def test_short_teacher_training_lowers_the_loss(short_run):
    losses = short_run["losses"]
    assert len(losses) == 30 + 2 and short_run["meta"]["stage_iters"] == [30, 2]
    assert sum(losses[25:30]) / 5 < 0.8 * sum(losses[:5]) / 5  # 30 steps of stage 1: at least 20% lower
    meta = short_run["meta"]
    assert {"det_f1", "lane_iou", "qa_acc", "plan_l2"} <= set(meta["metrics"]) <= set(meta["chance"]) | {"num_samples"}


def test_checkpoint_has_orion_format_and_reloads_identically(short_run, batch):
    path = Path(short_run["path"])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}
    assert ckpt["meta"]["seed"] == 0 and "TinyOrion" in ckpt["meta"]["config"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    trained = short_run["model"].eval()
    reloaded = load_tiny_teacher(path)
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(trained.extract_img_feat(batch["img"]), reloaded.extract_img_feat(batch["img"]))
        p1, p2 = trained(batch, return_loss=False), reloaded(batch, return_loss=False)
    for a, b in zip(p1, p2):
        assert torch.equal(a["plan"], b["plan"]) and a["answer_ids"] == b["answer_ids"]
        assert torch.equal(a["lane_masks"], b["lane_masks"])
        assert all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"]))
    assert ensure_tiny_teacher(path) == str(path)  # present: returned as is, nothing retrained


def test_ensure_tiny_teacher_creates_a_missing_checkpoint(tmp_path):
    cfg_file = tmp_path / "tiny.py"
    small_cfg(1).dump(str(cfg_file))
    out = tmp_path / "sub" / "teacher.pth"
    assert ensure_tiny_teacher(out, seed=0, config=cfg_file, verbose=False) == str(out)
    assert out.is_file()


def test_load_tiny_teacher_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_teacher"):
        load_tiny_teacher(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="state_dict"):
        load_tiny_teacher(bad)
