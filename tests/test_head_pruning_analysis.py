"""Impact analysis, plots and the command line of the head-pruning toolkit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmcv.datasets import DATASETS
from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.builder import MODELS, build_backbone
from tests.eva_reference import reference_macs, reference_param_count
from tests.head_pruning_fixtures import (HEADS, ORION_L, SMALL, TinyDetector, explicit_entropy_and_activation,
                                         loader_of, make_teacher)
from tools.head_pruning_utils import (HeadImportance, PruningConfig, analyze_pruning_impact,
                                      compute_head_importance_magnitude, create_pruning_config, describe_backbone,
                                      main, plot_fidelity_vs_ratio, plot_head_importance)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_analysis_of_orion_l_geometry_equals_the_architecture_counts():
    with torch.device("meta"):
        backbone = EVAViT(**ORION_L)
    geometry = describe_backbone(backbone)
    imp = HeadImportance(torch.rand(24, 16), "magnitude", metadata=dict(backbone=geometry))
    analysis = analyze_pruning_impact(imp, strategies=("uniform",), verbose=False)
    windows = [16 if i % 3 != 2 else 0 for i in range(24)]

    def macs(heads):
        return reference_macs(img_hw=(640, 640), patch_size=16, in_chans=3, embed_dim=1024, mlp_hidden=2730,
                              head_dim=64, heads_per_block=[heads] * 24, window_per_block=windows)

    def params(heads):
        return reference_param_count(embed_dim=1024, depth=24, heads_per_block=[heads] * 24, head_dim=64,
                                     mlp_hidden=2730, patch_size=16, pos_tokens=197)

    assert analysis["full"]["macs"] == macs(16) and geometry["num_params"] == params(16)
    for row, kept in zip(analysis["results"], (12, 8, 4)):  # ratios 0.25, 0.5, 0.75 of 16 heads
        assert row["heads_per_block"] == [kept] * 24
        assert row["speedup_ceiling"] == pytest.approx(macs(16) / macs(kept), rel=1e-12)
        assert geometry["num_params"] - row["attention_params_removed"] == params(kept)
    # the contract's ceilings for 12 / 8 / 4 heads follow from the same count
    assert [round(macs(16) / macs(k), 3) for k in (12, 8, 4)] == [1.128, 1.294, 1.517]


def test_measured_fidelity_equals_the_masked_backbone(tmp_path, capsys):
    teacher = make_teacher(seed=7)
    loader = loader_of(2)
    imp = compute_head_importance_magnitude(teacher)
    analysis = analyze_pruning_impact(imp, pruning_ratios=(0.0, 0.5), model=teacher, dataloader=loader,
                                      save_path=tmp_path / "analysis.json")
    assert "speedup<=" in capsys.readouterr().out
    zero, half = analysis["results"][0], analysis["results"][1]
    assert zero["cosine_similarity"] == pytest.approx(1.0) and zero["relative_l2_error"] == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(3, HEADS)
    for l, hs in enumerate(half["selected_heads_per_layer"]):
        mask[l, hs] = 1.0
    with torch.no_grad():
        cos = [F.cosine_similarity(teacher(x, head_mask=mask)[0].flatten(1).double(),
                                   teacher(x)[0].flatten(1).double()).item() for x in loader]
    assert half["cosine_similarity"] == pytest.approx(float(np.mean(cos)), abs=1e-6)
    assert json.loads((tmp_path / "analysis.json").read_text())["results"][1]["heads_kept"] == 12
    plot_fidelity_vs_ratio(analysis, tmp_path / "fid.png")
    plot_head_importance(imp, tmp_path / "heat.png", pruning_config=create_pruning_config(imp, 0.5))
    for name in ("fid.png", "heat.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- command line


if "HPUTestDetector" not in MODELS.module_dict:
    @MODELS.register_module(name="HPUTestDetector")
    class _CliDetector(TinyDetector):
        def __init__(self, img_backbone, train_cfg=None, test_cfg=None):
            super().__init__(build_backbone(img_backbone))

if "HPURandomViews" not in DATASETS.module_dict:
    @DATASETS.register_module(name="HPURandomViews")
    class _RandomViews(torch.utils.data.Dataset):
        def __init__(self, length=4, seed=0):
            self.items = [torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(seed + i))
                          for i in range(length)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return dict(img=self.items[i], target=torch.ones(1))


def magnitude_from_checkpoint(state, depth=3, heads=HEADS, head_dim=16):
    """The magnitude formula evaluated on the checkpoint's tensors, written out in the test."""
    scores = torch.zeros(depth, heads, dtype=torch.float64)
    for l in range(depth):
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            scores[l, h] = sum(state[f"img_backbone.blocks.{l}.attn.{n}_proj.weight"][rows].double().pow(2).sum()
                               for n in "qkv").sqrt()
    return scores


def test_cli_end_to_end_on_a_tiny_student_config(tmp_path, capsys):
    teacher = make_teacher(seed=8)
    ckpt = tmp_path / "teacher.pth"
    state = {"img_backbone." + k: v for k, v in teacher.state_dict().items()}
    torch.save({"state_dict": state}, ckpt)
    backbone_cfg = dict(SMALL, type="EVAViTStudent", num_heads=4, teacher_num_heads=HEADS)
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(f"model = dict(type='HPUTestDetector', img_backbone={backbone_cfg!r})\n"
                   f"data = dict(train=dict(type='HPURandomViews', length=4))\n")
    common = ["--config", str(cfg), "--checkpoint", str(ckpt), "--num-batches", "2", "--device", "cpu"]
    for method in ("magnitude", "activation", "gradient"):
        assert main(["importance", *common, "--method", method, "--out", str(tmp_path / f"{method}.json")]) == 0
    magnitude = HeadImportance.load(tmp_path / "magnitude.json")
    assert torch.allclose(magnitude.scores, magnitude_from_checkpoint(state), rtol=1e-6)
    activation = HeadImportance.load(tmp_path / "activation.json")
    views = [torch.stack([_RandomViews(4).items[i]]).flatten(0, 1) for i in range(2)]  # the loader's first 2 batches
    assert torch.allclose(activation.scores, explicit_entropy_and_activation(teacher, views)[1], rtol=1e-4)
    assert activation.metadata["backbone"]["num_heads"] == HEADS  # the teacher architecture, not the student's
    gradient = HeadImportance.load(tmp_path / "gradient.json")
    assert gradient.num_samples == 2 and torch.allclose(gradient.scores.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert main(["analyze", *common, "--importance", str(tmp_path / "magnitude.json"), "--pruning-ratios", "0.5",
                 "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    assert "cosine_similarity" in json.loads((tmp_path / "a.json").read_text())["results"][0]
    assert main(["plot", "--importance", str(tmp_path / "magnitude.json"), "--out", str(tmp_path / "h.png")]) == 0
    # as a script, from another directory: the sys.path fix makes the repository importable
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "head_pruning_utils.py"), "prune-config",
                             "--importance", str(tmp_path / "gradient.json"), "--pruning-ratio", "0.5",
                             "--strategy", "global", "--out", str(tmp_path / "p.json")],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sum(PruningConfig.load(tmp_path / "p.json").num_heads) == 3 * 4


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["prune-config", "--importance", str(missing), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: head importance file not found: {missing}\n"
    HeadImportance(torch.rand(2, 4), "x").save(tmp_path / "imp.json")
    assert main(["prune-config", "--importance", str(tmp_path / "imp.json"), "--pruning-ratio", "0.9",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "removes every head" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
