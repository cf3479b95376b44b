"""TinyOrion: ORION's detector contract, loss semantics, teacher training and checkpoints (CPU, < 1 min)."""
from __future__ import annotations

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
from tools.train_tiny_teacher import ensure_tiny_teacher, load_tiny_teacher, lr_at, train_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"
EXPECTED_LOSS_KEYS = {"loss_cls", "loss_bbox", "loss_iou", "loss_traffic", "loss_cls_lane", "loss_dice_lane",
                      "vlm_loss", "loss_plan_reg"}


def small_cfg(max_iters: int = 3) -> Config:
    """The shipped config with small splits and a short run."""
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict({"data.train.num_samples": 64, "data.val.num_samples": 16, "evaluation.max_samples": 16,
                         "runner.max_iters": max_iters, "lr_config.warmup_iters": 2, "log_config.interval": 1000})
    return cfg


@pytest.fixture(scope="module")
def cfg() -> Config:
    return small_cfg()


@pytest.fixture(scope="module")
def model(cfg) -> TinyOrion:
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


def test_parse_losses_all_reduces_when_distributed_is_initialised():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        total, log_vars = TinyOrion._parse_losses({"loss_x": torch.tensor(1.5), "loss_y": torch.tensor(0.5)})
        assert total.item() == 2.0 and log_vars == {"loss_x": 1.5, "loss_y": 0.5, "loss": 2.0}
    finally:
        dist.destroy_process_group()


def test_vl_tokens_are_side_effect_free(model, batch):
    model.eval()
    feats = model.extract_img_feat(batch["img"])
    params = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    calls = model.pts_bbox_head.num_train_calls
    first = model.vl_tokens(feats, **batch)
    second = model.vl_tokens([feats], img_metas=batch["img_metas"])
    per_cam = math.ceil(10 / model.vl_proj.pool) ** 2 + 1  # local tokens + one global token
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


def test_lr_schedule_warms_up_then_decays():
    cfg = dict(warmup="linear", warmup_iters=10, warmup_ratio=0.1, min_lr_ratio=0.01)
    assert lr_at(0, 1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, cfg) == pytest.approx(0.01)


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
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
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
